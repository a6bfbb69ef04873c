//! A store in a PostgreSQL table, shared by every replica that connects to it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;

use super::StoreError;
#[cfg(doc)]
use super::{Begin, IdempotencyStore, OwnerToken};

mod headers;
mod records;
mod sql;

use self::sql::Statements;

/// An [`IdempotencyStore`] in a PostgreSQL table, over a [`deadpool_postgres`] pool.
///
/// Every server replica that uses the same table shares its records. Clones share the
/// pool.
///
/// ```no_run
/// # async fn run() -> Result<(), tower_safe_retry::idempotency::store::StoreError> {
/// use std::time::Duration;
/// use tower_safe_retry::{IdempotencyLayer, PostgresStore};
///
/// let store = PostgresStore::connect("postgres://app@127.0.0.1/app")
///     .await?
///     .table("idempotency_records");
/// store.migrate().await?;
///
/// // Delete expired records once a minute, for as long as the server runs.
/// let sweeper = store.clone();
/// tokio::spawn(async move {
///     let mut interval = tokio::time::interval(Duration::from_secs(60));
///     loop {
///         interval.tick().await;
///         if let Err(error) = sweeper.sweep().await {
///             tracing::warn!(%error, "idempotency sweep failed");
///         }
///     }
/// });
///
/// let layer = IdempotencyLayer::new(store);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
///
/// # Guarantees
///
/// - One claim per key. Each record's primary key is `(scope, key)` and a claim is one
///   `INSERT ... ON CONFLICT` statement, so however many replicas race for a key, one
///   gets [`Begin::Claimed`].
/// - Compare-and-set on the owner. [`complete`](IdempotencyStore::complete),
///   [`release`](IdempotencyStore::release) and [`renew`](IdempotencyStore::renew) change
///   a row only while it is in flight for the given [`OwnerToken`], and otherwise return a
///   stale-owner error.
/// - One clock. Expiry uses the database's `now()`, so replicas whose clocks disagree
///   still agree on when a lease or a replay record expires.
/// - Durability. A completed record lasts as long as a committed row does, so it outlives
///   restarts of the servers.
///
/// The claim relies on READ COMMITTED, PostgreSQL's default isolation level. On
/// connections set to REPEATABLE READ or SERIALIZABLE, a claim that races another can
/// fail with a serialization error, which the store returns as a backend error.
///
/// The store does not join a handler's transaction. It commits the completion in its own
/// statement after the handler returns, and there is no API yet to write a handler's
/// effect and the completion in one transaction. A crash or a lost connection between the
/// two leaves the claim in flight until its lease expires, and a retry after that runs the
/// handler again. Keeping the table in the database of the effect narrows this gap, since
/// both then fail and recover together, but it does not close it. An effect that must
/// never repeat needs its own guard too, such as a unique constraint on the idempotency
/// key in the effect's table.
///
/// # TTLs
///
/// [`IdempotencyLayer`](crate::IdempotencyLayer) renews the lease every third of the lock
/// TTL while the handler runs, so the lock TTL bounds how long a key stays locked after
/// its server died. A duplicate that arrives after a lease expired unrenewed takes the key
/// over and runs the handler a second time. The replay TTL
/// should cover the longest time a client keeps retrying one request; 24 hours is the
/// common choice. Each TTL is capped at 30 years.
///
/// # Sweeping
///
/// An expired row is reused when its key is claimed again, and otherwise stays in the
/// table. Call [`sweep`](Self::sweep) periodically, for example from a
/// [`tokio::time::interval`] as above, to delete expired rows. The store spawns no task
/// of its own. An expired claim whose owner has not finished still belongs to that owner
/// until another request takes it over or a sweep deletes it.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    statements: Arc<Statements>,
}

/// Rows deleted per statement by [`PostgresStore::sweep`], so that a sweep locks at most
/// this many rows at a time.
const SWEEP_BATCH: i64 = 1000;

/// The pool's time limits for a new connection, a free connection and a health check.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);

impl PostgresStore {
    /// The default table name.
    pub const DEFAULT_TABLE: &'static str = "idempotency_records";

    /// Creates a store with a pool of plain TCP connections (no TLS) to the database at
    /// `url`, and checks that one connection can be opened.
    ///
    /// `url` is a libpq connection string, as a URL (`postgres://user@host/db`) or in
    /// key-value form. The pool has deadpool's default size (in deadpool 0.13, two
    /// connections per logical CPU) and waits at most 5 seconds to open or hand out a
    /// connection. For TLS or other
    /// settings, build a [`Pool`] and use [`from_pool`](Self::from_pool).
    ///
    /// # Errors
    ///
    /// A backend error when `url` is invalid or the database cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = url.parse().map_err(StoreError::backend)?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = Manager::from_config(config, NoTls, manager_config);
        let timeouts = Timeouts {
            wait: Some(POOL_TIMEOUT),
            create: Some(POOL_TIMEOUT),
            recycle: Some(POOL_TIMEOUT),
        };
        let pool = Pool::builder(manager)
            .runtime(Runtime::Tokio1)
            .timeouts(timeouts)
            .build()
            .map_err(StoreError::backend)?;

        // Opening one connection now makes a wrong URL or an unreachable database fail
        // here rather than on the first request. The connection goes back to the pool.
        let connection = pool.get().await.map_err(StoreError::backend)?;
        drop(connection);
        Ok(Self::from_pool(pool))
    }

    /// Creates a store that takes connections from `pool`. Opens no connection.
    pub fn from_pool(pool: Pool) -> Self {
        let statements = Statements::new(Self::DEFAULT_TABLE).expect("the default is valid");
        PostgresStore {
            pool,
            statements: Arc::new(statements),
        }
    }

    /// Sets the table, `name` or `schema.name`, in place of [`DEFAULT_TABLE`](Self::DEFAULT_TABLE).
    ///
    /// # Panics
    ///
    /// If a part of `name` is empty, starts with a digit, or contains anything but
    /// lowercase ASCII letters, digits and underscores. Also if a part is too long: the
    /// maximum is 63 bytes for the schema and 52 for the table, so that the name of the
    /// table's index fits.
    pub fn table(mut self, name: &str) -> Self {
        let statements = Statements::new(name).unwrap_or_else(|message| panic!("{message}"));
        self.statements = Arc::new(statements);
        self
    }

    /// Returns the pool the store takes connections from.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Creates the table and its index on `expires_at` unless they exist.
    ///
    /// Safe to run on every start and from several replicas at once: a transaction-level
    /// advisory lock on the table name makes concurrent runs take turns. The schema of a
    /// `schema.name` table must exist.
    ///
    /// # Errors
    ///
    /// A backend error when the database fails, for instance because the role may not
    /// create tables.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(StoreError::backend)?;
        transaction
            .execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))",
                &[&format!(
                    "tower-safe-retry migrate {}",
                    self.statements.table
                )],
            )
            .await
            .map_err(StoreError::backend)?;
        transaction
            .batch_execute(&self.statements.create_table)
            .await
            .map_err(StoreError::backend)?;
        transaction
            .batch_execute(&self.statements.create_index)
            .await
            .map_err(StoreError::backend)?;
        transaction.commit().await.map_err(StoreError::backend)
    }

    /// Deletes every row that expired, in batches of 1,000, and returns how many it
    /// deleted. Skips rows that a request has locked at that moment.
    ///
    /// # Errors
    ///
    /// A backend error when the database fails. Batches deleted before the failure stay
    /// deleted.
    pub async fn sweep(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&self.statements.sweep)
            .await
            .map_err(StoreError::backend)?;
        let mut deleted = 0;
        loop {
            let batch = client
                .execute(&statement, &[&SWEEP_BATCH])
                .await
                .map_err(StoreError::backend)?;
            deleted += batch;
            if batch < SWEEP_BATCH.unsigned_abs() {
                break;
            }
        }
        tracing::debug!(table = %self.statements.table, deleted, "swept expired idempotency records");
        Ok(deleted)
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(StoreError::backend)
    }

    /// Runs `sql` with `params` and returns the number of rows it changed.
    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(StoreError::backend)?;
        client
            .execute(&statement, params)
            .await
            .map_err(StoreError::backend)
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.pool.status();
        f.debug_struct("PostgresStore")
            .field("table", &self.statements.table)
            .field("connections", &status.size)
            .field("idle_connections", &status.available)
            .field("max_connections", &status.max_size)
            .finish()
    }
}
