//! A store in Redis, shared by every replica of a server.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Value};

use self::codec::{encode_head, parse_begin};
use self::scripts::Scripts;
use super::{Begin, IdempotencyStore, OwnerToken, RecordKey, StoreError, StoredResponse};
use crate::idempotency::Fingerprint;

mod codec;
mod scripts;

/// An [`IdempotencyStore`] in Redis, shared by every replica that connects to it.
///
/// # Layout
///
/// Each record is one Redis hash named `<prefix>:{<scope length>:<scope>:<key>}`, for
/// instance `idem:{4:acme:order-42}`. The scope length keeps scopes that contain `:`
/// apart. Each operation is one Lua script that touches only that key, so the layout works
/// on Redis Cluster. The braces are a hash tag, so any key added to a record later lands
/// in the same slot. Even the claim is a script rather than `SET key value NX PX ttl`,
/// because a claim on a live key must return its state and stored response in the same
/// atomic step. The hash contains the fingerprint and, while the request runs, the
/// owner token, and once it completed the status, headers and body. The key's expiry is
/// the lease while the record is in flight and the replay TTL once it is completed, so
/// Redis removes expired records by itself.
///
/// # Guarantees
///
/// On one Redis server, every operation is atomic: of many concurrent claims on a key
/// exactly one gets [`Begin::Claimed`], and only the owner of a claim can complete,
/// release or renew it.
///
/// These do not hold across a failover. Redis replicates asynchronously, so a replica
/// promoted after a crash can lack a claim or completion that the old primary confirmed,
/// and a retry then runs its request again. `WAIT` narrows this window but does not close
/// it. A server whose `maxmemory-policy` evicts keys (any policy but `noeviction`) can
/// drop a live record with the same effect, so run the store on a Redis server with
/// `maxmemory-policy noeviction`. With that policy a full server rejects new claims:
/// [`begin`](IdempotencyStore::begin) returns a backend error, so the layer responds with
/// `503` by default. Replays and completions of running requests still succeed.
///
/// Unlike [`MemoryStore`](super::MemoryStore), an expired lease is gone at once: its owner
/// can no longer complete or release it even when no other request took it over.
///
/// # Sizing the TTLs
///
/// [`IdempotencyLayer`] renews the lease every third of the lock TTL while the handler
/// runs, so the lock TTL bounds how long a key stays locked after its server died, not how
/// long a handler may run. Make it a few times longer than a slow round trip to Redis.
/// Make the replay TTL longer than the longest time over which clients retry. Memory is about the replay
/// TTL times the rate of keyed requests times the size of a record (key, headers and
/// body), plus Redis's own overhead per key.
///
/// # Connection
///
/// [`ConnectionManager`] reconnects by itself after Redis restarts. While Redis is down,
/// each operation fails with a backend error ([`StoreError::is_backend`]) with the
/// [`redis::RedisError`] as its source. Clones share the connection.
///
/// # Example
///
/// ```no_run
/// use axum::{Router, routing::post};
/// use tower_safe_retry::{IdempotencyLayer, RedisStore};
///
/// # async fn run() -> Result<(), tower_safe_retry::idempotency::store::StoreError> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379/0")
///     .await?
///     .prefix("payments");
/// let app: Router = Router::new()
///     .route("/charges", post(|| async { "charged" }))
///     .layer(IdempotencyLayer::new(store));
/// # Ok(())
/// # }
/// ```
///
/// [`IdempotencyLayer`]: crate::IdempotencyLayer
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    prefix: Arc<str>,
    scripts: Arc<Scripts>,
}

impl RedisStore {
    /// The default prefix of record keys.
    pub const DEFAULT_PREFIX: &'static str = "idem";

    /// Creates a store on an existing connection, with the default prefix.
    pub fn new(connection: ConnectionManager) -> Self {
        RedisStore {
            connection,
            prefix: Arc::from(Self::DEFAULT_PREFIX),
            scripts: Arc::new(Scripts::new()),
        }
    }

    /// Connects to the Redis server at `url`, such as `redis://127.0.0.1:6379/0`.
    ///
    /// The connection times out a connection attempt after 1 s and a command after
    /// 500 ms. A reconnect gives up after three attempts, with backoff delays of at most
    /// 300 ms in total, so a request during an outage fails fast instead of waiting for
    /// Redis. The next operation starts a new reconnect. For other settings, build a [`ConnectionManager`]
    /// and pass it to [`new`](Self::new).
    ///
    /// # Errors
    ///
    /// A backend error when `url` is invalid or the server cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = Client::open(url).map_err(StoreError::backend)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200));
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(StoreError::backend)?;
        Ok(Self::new(connection))
    }

    /// Sets the prefix of record keys (default `"idem"`), so several applications can
    /// share one Redis database.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Arc::from(prefix.into());
        self
    }

    /// Returns the connection.
    pub fn get_ref(&self) -> &ConnectionManager {
        &self.connection
    }

    /// Returns the name of the Redis key that stores the record for `key`.
    pub fn record_name(&self, key: &RecordKey) -> String {
        record_name(&self.prefix, key)
    }
}

fn record_name(prefix: &str, key: &RecordKey) -> String {
    let scope = key.scope();
    format!("{prefix}:{{{}:{scope}:{}}}", scope.len(), key.key())
}

/// Converts a TTL to whole milliseconds for `PEXPIRE`, rounded up and at least 1 ms,
/// because `PEXPIRE key 0` would delete the record at once.
fn milliseconds(ttl: Duration) -> u64 {
    let rounded_up = ttl.as_nanos().div_ceil(1_000_000).max(1);
    u64::try_from(rounded_up)
        .unwrap_or(u64::MAX)
        .min(i64::MAX as u64)
}

/// Maps the 0 or 1 that the owner-checking scripts return.
fn owner_checked(outcome: i64) -> Result<(), StoreError> {
    if outcome == 1 {
        Ok(())
    } else {
        Err(StoreError::stale_owner())
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl IdempotencyStore for RedisStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lock_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        let mut connection = self.connection.clone();
        let reply: Value = self
            .scripts
            .begin
            .key(self.record_name(key))
            .arg(&fingerprint.as_bytes()[..])
            .arg(owner.as_str())
            .arg(milliseconds(lock_ttl))
            .invoke_async(&mut connection)
            .await
            .map_err(StoreError::backend)?;
        parse_begin(reply)
    }

    async fn complete(
        &self,
        key: &RecordKey,
        owner: &OwnerToken,
        response: StoredResponse,
        replay_ttl: Duration,
    ) -> Result<(), StoreError> {
        let head = encode_head(response.status, &response.headers);
        let name = self.record_name(key);
        let mut invocation = self.scripts.complete.key(name);
        invocation
            .arg(owner.as_str())
            .arg(milliseconds(replay_ttl))
            .arg(head);
        if let Some(body) = &response.body {
            invocation.arg(&body[..]);
        }

        let mut connection = self.connection.clone();
        let outcome: i64 = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(StoreError::backend)?;
        owner_checked(outcome)
    }

    async fn release(&self, key: &RecordKey, owner: &OwnerToken) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let outcome: i64 = self
            .scripts
            .release
            .key(self.record_name(key))
            .arg(owner.as_str())
            .invoke_async(&mut connection)
            .await
            .map_err(StoreError::backend)?;
        owner_checked(outcome)
    }

    async fn renew(
        &self,
        key: &RecordKey,
        owner: &OwnerToken,
        lock_ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let outcome: i64 = self
            .scripts
            .renew
            .key(self.record_name(key))
            .arg(owner.as_str())
            .arg(milliseconds(lock_ttl))
            .invoke_async(&mut connection)
            .await
            .map_err(StoreError::backend)?;
        owner_checked(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_milliseconds() {
        assert_eq!(milliseconds(Duration::ZERO), 1);
        assert_eq!(milliseconds(Duration::from_micros(1)), 1);
        assert_eq!(milliseconds(Duration::from_micros(1500)), 2);
        assert_eq!(milliseconds(Duration::from_secs(60)), 60_000);
        assert_eq!(milliseconds(Duration::MAX), i64::MAX as u64);
    }

    #[test]
    fn record_names_keep_scopes_apart() {
        let plain = record_name("idem", &RecordKey::new("acme", "order-42"));
        assert_eq!(plain, "idem:{4:acme:order-42}");

        let colon_in_scope = record_name("idem", &RecordKey::new("a:b", "c"));
        let colon_in_key = record_name("idem", &RecordKey::new("a", "b:c"));
        assert_ne!(colon_in_scope, colon_in_key);
    }
}
