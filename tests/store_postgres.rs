//! `PostgresStore` against the PostgreSQL server that `DATABASE_URL` names, on its own
//! and behind `IdempotencyLayer` on a real axum server.
//!
//! Each test creates a table with a unique name and drops it when it ends. Without
//! `DATABASE_URL` the tests print a line and pass, unless `REQUIRE_BACKENDS` is set:
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test REQUIRE_BACKENDS=1 \
//!     cargo test --features postgres --test store_postgres
//! ```

#[cfg(feature = "postgres")]
#[path = "store_postgres/server.rs"]
mod server;
#[cfg(feature = "postgres")]
#[path = "store_postgres/store.rs"]
mod store;
#[cfg(feature = "postgres")]
#[path = "store_postgres/support.rs"]
mod support;

#[cfg(not(feature = "postgres"))]
#[test]
fn postgres_feature_off() {
    use std::io::Write as _;

    // Written to stderr directly, because the test harness hides `eprintln!` output of
    // passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "skipped: the postgres feature is off, so the PostgresStore tests did not run; \
         run cargo test --features postgres"
    );
}

#[cfg(feature = "postgres")]
mod conformance;

/// The store conformance suite, on one shared table: every case uses random keys.
#[cfg(feature = "postgres")]
mod postgres_conformance {
    use tower_safe_retry::PostgresStore;

    use crate::support;

    /// Returns a store on the conformance table, or `None` when the tests are skipped.
    pub(crate) async fn postgres_store() -> Option<PostgresStore> {
        let url = support::database_url()?;
        let store = support::connect(&url)
            .await
            .table("idempotency_conformance");
        store
            .migrate()
            .await
            .expect("failed to create the conformance table");
        Some(store)
    }

    crate::conformance::store_tests!(postgres_store);
}
