//! The store conformance suite and Redis-specific checks against `RedisStore`.
//!
//! The tests connect to `REDIS_URL`. Without it they print why they are skipped and
//! pass, unless `REQUIRE_BACKENDS=1` is set, as in CI, where a missing or unreachable
//! Redis fails them.

#[cfg(not(feature = "redis"))]
#[test]
fn redis_store_skipped() {
    // Written to stderr directly, because the test harness captures `eprintln!`.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "skipped: the redis feature is off, so the RedisStore tests did not run \
         (run `cargo test --features redis` with REDIS_URL set)"
    );
}

#[cfg(feature = "redis")]
mod conformance;

#[cfg(feature = "redis")]
mod redis_store {
    use std::io::Write;
    use std::time::Duration;

    use redis::AsyncCommands;
    use tower_safe_retry::IdempotencyStore;
    use tower_safe_retry::RedisStore;
    use tower_safe_retry::idempotency::store::{Begin, OwnerToken, RecordKey};

    use crate::conformance::{
        self, LONG_LOCK_TTL, LONG_REPLAY_TTL, fingerprint, response, unique_key,
    };

    /// Returns a store on `REDIS_URL`, or `None` when the tests should be skipped.
    ///
    /// # Panics
    ///
    /// When `REDIS_URL` is set but Redis cannot be reached, or when `REQUIRE_BACKENDS=1`
    /// and `REDIS_URL` is not set.
    pub(crate) async fn redis_store() -> Option<RedisStore> {
        let url = redis_url()?;
        match RedisStore::connect(&url).await {
            Ok(store) => Some(store),
            Err(error) => {
                let cause = std::error::Error::source(&error)
                    .map_or_else(String::new, |source| format!(": {source}"));
                panic!(
                    "failed to connect to Redis at REDIS_URL={url}{cause}. Start Redis there, \
                     or unset REDIS_URL and REQUIRE_BACKENDS to skip these tests"
                )
            }
        }
    }

    fn redis_url() -> Option<String> {
        if let Some(url) = std::env::var_os("REDIS_URL") {
            return Some(url.into_string().expect("REDIS_URL is not valid UTF-8"));
        }
        if std::env::var_os("REQUIRE_BACKENDS").is_some_and(|value| value == "1") {
            panic!(
                "REDIS_URL is not set, but REQUIRE_BACKENDS=1 requires the RedisStore tests to run"
            );
        }
        // Written to stderr directly, because the test harness captures `eprintln!`.
        let _ = writeln!(
            std::io::stderr(),
            "skipped: REDIS_URL is not set, so the RedisStore tests did not run"
        );
        None
    }

    async fn raw_connection() -> redis::aio::MultiplexedConnection {
        let url = redis_url().expect("checked by redis_store");
        let client = redis::Client::open(url).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    }

    conformance::store_tests!(redis_store);

    #[tokio::test]
    async fn record_key_layout() {
        let Some(store) = redis_store().await else {
            return;
        };
        let prefix = format!("test-{}", uuid::Uuid::new_v4().simple());
        let store = store.prefix(prefix.clone());
        let key = RecordKey::new("acme", "order:42");
        let name = store.record_name(&key);
        assert_eq!(name, format!("{prefix}:{{4:acme:order:42}}"));

        let owner = OwnerToken::generate();
        let begin = store
            .begin(&key, &fingerprint(1), &owner, LONG_LOCK_TTL)
            .await;
        assert!(matches!(begin, Ok(Begin::Claimed)), "{begin:?}");

        let mut redis = raw_connection().await;
        let fields: Vec<String> = redis.hkeys(&name).await.unwrap();
        assert_eq!(fields, ["fingerprint", "owner"]);
        let lease: i64 = redis.pttl(&name).await.unwrap();
        assert!(lease > 0, "lease PTTL {lease}");
        assert!(lease <= 60_000, "lease PTTL {lease}");

        store
            .complete(&key, &owner, response(b"{}"), LONG_REPLAY_TTL)
            .await
            .unwrap();
        let mut fields: Vec<String> = redis.hkeys(&name).await.unwrap();
        fields.sort();
        assert_eq!(fields, ["body", "fingerprint", "head"]);
        let replay: i64 = redis.pttl(&name).await.unwrap();
        assert!(replay > 60_000, "replay PTTL {replay}");
        assert!(replay <= 600_000, "replay PTTL {replay}");

        let _: () = redis.del(&name).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replicas_share_claims() {
        let Some(first) = redis_store().await else {
            return;
        };
        // Four connections, as four server replicas would have.
        let mut replicas = vec![first];
        for _ in 0..3 {
            replicas.push(redis_store().await.unwrap());
        }
        let key = unique_key();
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(100));
        let mut tasks = Vec::new();
        for task in 0..100 {
            let store = replicas[task % replicas.len()].clone();
            let key = key.clone();
            let barrier = std::sync::Arc::clone(&barrier);
            tasks.push(tokio::spawn(async move {
                let owner = OwnerToken::generate();
                barrier.wait().await;
                store
                    .begin(&key, &fingerprint(1), &owner, LONG_LOCK_TTL)
                    .await
            }));
        }

        let mut claimed = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(Begin::Claimed) => claimed += 1,
                Ok(Begin::InFlight { .. }) => {}
                other => panic!("expected Claimed or InFlight, got {other:?}"),
            }
        }
        assert_eq!(claimed, 1);
    }

    #[tokio::test]
    async fn prefixes_isolated() {
        let Some(store) = redis_store().await else {
            return;
        };
        let first = store
            .clone()
            .prefix(format!("test-{}", uuid::Uuid::new_v4().simple()));
        let second = store.prefix(format!("test-{}", uuid::Uuid::new_v4().simple()));
        let key = unique_key();

        for store in [&first, &second] {
            let begin = store
                .begin(
                    &key,
                    &fingerprint(1),
                    &OwnerToken::generate(),
                    LONG_LOCK_TTL,
                )
                .await;
            assert!(matches!(begin, Ok(Begin::Claimed)), "{begin:?}");
        }
    }

    #[tokio::test]
    async fn corrupt_record_is_backend_error() {
        let Some(store) = redis_store().await else {
            return;
        };
        let key = unique_key();
        let name = store.record_name(&key);
        let mut redis = raw_connection().await;
        let _: () = redis
            .hset_multiple(
                &name,
                &[("fingerprint", &[1u8; 32][..]), ("head", b"\x09garbage")],
            )
            .await
            .unwrap();
        let _: () = redis.pexpire(&name, 60_000).await.unwrap();

        let error = store
            .begin(
                &key,
                &fingerprint(1),
                &OwnerToken::generate(),
                LONG_LOCK_TTL,
            )
            .await
            .unwrap_err();

        assert!(error.is_backend(), "{error}");
        let source = std::error::Error::source(&error).expect("a source");
        assert!(source.to_string().contains("format version"), "{source}");
    }

    #[tokio::test]
    async fn connect_invalid_url_fails() {
        if redis_url().is_none() {
            return;
        }
        let error = RedisStore::connect("not a url").await.unwrap_err();

        assert!(error.is_backend(), "{error}");
        assert!(std::error::Error::source(&error).is_some());
    }

    #[tokio::test]
    async fn connect_unreachable_fails() {
        if redis_url().is_none() {
            return;
        }
        // A port this test bound and released, so nothing listens on it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);

        let started = std::time::Instant::now();
        let error = RedisStore::connect(&format!("redis://127.0.0.1:{port}"))
            .await
            .unwrap_err();
        let elapsed = started.elapsed();

        assert!(error.is_backend(), "{error}");
        assert!(elapsed < Duration::from_secs(3), "connect took {elapsed:?}");
    }
}
