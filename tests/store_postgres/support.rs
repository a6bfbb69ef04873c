//! A fresh table per test in the database that `DATABASE_URL` names, dropped when the test
//! ends, even when it fails.
//!
//! With `DATABASE_URL` unset, each test prints one line to stderr and passes, unless
//! `REQUIRE_BACKENDS` is set (as CI sets it), which makes it fail.

use std::error::Error;
use std::fmt::Write as _;
use std::io::Write as _;

use tokio_postgres::NoTls;
use tower_safe_retry::PostgresStore;
use tower_safe_retry::idempotency::store::deadpool_postgres::{Manager, Pool};

/// A store on its own table, which is dropped with this value.
pub struct TestTable {
    pub store: PostgresStore,
    pub url: String,
    /// The table name, without a schema.
    pub name: String,
    /// A schema to drop with the table, if the test made one.
    schema: Option<String>,
}

impl TestTable {
    /// Runs one statement on a connection of its own and returns the rows it changed.
    pub async fn execute(&self, sql: &str) -> u64 {
        let client = connect_client(&self.url).await;
        client
            .execute(sql, &[])
            .await
            .unwrap_or_else(|error| panic!("statement {sql:?} failed: {}", chain(&error)))
    }

    /// Returns the number of rows in the table.
    pub async fn count(&self) -> i64 {
        let client = connect_client(&self.url).await;
        let sql = format!("SELECT count(*) FROM {}", self.qualified());
        let row = client.query_one(&sql, &[]).await.unwrap();
        row.get(0)
    }

    pub fn qualified(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{schema}.{}", self.name),
            None => self.name.clone(),
        }
    }
}

impl Drop for TestTable {
    fn drop(&mut self) {
        let url = self.url.clone();
        let sql = match &self.schema {
            Some(schema) => format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
            None => format!("DROP TABLE IF EXISTS {}", self.name),
        };
        // Drop runs inside the test's runtime, which cannot block on a future, so the
        // cleanup gets a thread and a runtime of its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let client = connect_client(&url).await;
                if let Err(error) = client.batch_execute(&sql).await {
                    eprintln!("cleanup {sql:?} failed: {}", chain(&error));
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Returns `DATABASE_URL`, or `None` after printing why the test is skipped.
///
/// # Panics
///
/// When `DATABASE_URL` is unset and `REQUIRE_BACKENDS` is set.
pub fn database_url() -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if backends_required() => panic!(
            "DATABASE_URL is not set but REQUIRE_BACKENDS is, so the PostgresStore tests \
             cannot run; set DATABASE_URL, for example to \
             postgres://postgres@127.0.0.1:5432/test"
        ),
        _ => {
            // Written to stderr directly, because the test harness hides `eprintln!`
            // output of passing tests.
            let _ = writeln!(
                std::io::stderr(),
                "skipped: DATABASE_URL is not set, so the PostgresStore tests did not run"
            );
            None
        }
    }
}

fn backends_required() -> bool {
    std::env::var_os("REQUIRE_BACKENDS").is_some_and(|value| !value.is_empty() && value != "0")
}

/// Connects to `DATABASE_URL` and creates a fresh table, or returns `None` when the
/// tests are skipped.
///
/// # Panics
///
/// When the database cannot be reached or the table cannot be created.
pub async fn table(test: &str) -> Option<TestTable> {
    let url = database_url()?;
    let store = connect(&url).await;
    Some(migrated(store, url, test, None).await)
}

/// Like [`table`], without creating the table.
pub async fn unmigrated_table(test: &str) -> Option<TestTable> {
    let url = database_url()?;
    let name = unique_name(test);
    let store = connect(&url).await.table(&name);
    Some(TestTable {
        store,
        url,
        name,
        schema: None,
    })
}

/// Like [`table`], with a pool of at most `max_connections` connections.
pub async fn table_with_pool(test: &str, max_connections: usize) -> Option<TestTable> {
    let url = database_url()?;
    let config: tokio_postgres::Config = url.parse().expect("DATABASE_URL is a valid URL");
    let manager = Manager::new(config, NoTls);
    let pool = Pool::builder(manager)
        .max_size(max_connections)
        .build()
        .unwrap();
    Some(migrated(PostgresStore::from_pool(pool), url, test, None).await)
}

/// Like [`table`], with the table in a fresh schema that is dropped with it.
pub async fn table_in_schema(test: &str) -> Option<TestTable> {
    let url = database_url()?;
    let store = connect(&url).await;
    let schema = unique_name("store_schema");
    let client = connect_client(&url).await;
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    Some(migrated(store, url, test, Some(schema)).await)
}

async fn migrated(
    store: PostgresStore,
    url: String,
    test: &str,
    schema: Option<String>,
) -> TestTable {
    let name = unique_name(test);
    let store = match &schema {
        Some(schema) => store.table(&format!("{schema}.{name}")),
        None => store.table(&name),
    };
    let table = TestTable {
        store,
        url,
        name,
        schema,
    };
    if let Err(error) = table.store.migrate().await {
        panic!(
            "migrate failed on table {}: {}",
            table.qualified(),
            chain(&error)
        );
    }
    table
}

/// Returns `prefix` and 12 random hex digits, a name no other test run uses.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..12])
}

pub async fn connect(url: &str) -> PostgresStore {
    match PostgresStore::connect(url).await {
        Ok(store) => store,
        Err(error) => panic!(
            "cannot connect to PostgreSQL at {}: {}; start it, fix DATABASE_URL, or unset \
             DATABASE_URL to skip these tests",
            describe(url),
            chain(&error)
        ),
    }
}

async fn connect_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = match tokio_postgres::connect(url, NoTls).await {
        Ok(pair) => pair,
        Err(error) => panic!(
            "cannot connect to PostgreSQL at {}: {}",
            describe(url),
            chain(&error)
        ),
    };
    tokio::spawn(connection);
    client
}

/// Describes the database `url` names without its password.
fn describe(url: &str) -> String {
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return "an invalid DATABASE_URL".to_owned();
    };
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|host| format!("{host:?}"))
        .collect();
    format!(
        "hosts {hosts:?}, ports {:?}, user {:?}, database {:?}",
        config.get_ports(),
        config.get_user(),
        config.get_dbname()
    )
}

/// Formats `error` and each of its sources.
pub fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}
