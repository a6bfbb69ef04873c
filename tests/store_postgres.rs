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
