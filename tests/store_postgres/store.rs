//! `PostgresStore` called directly, each test on its own table.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, LINK};
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::sync::Barrier;
use tokio_postgres::NoTls;
use tower_safe_retry::PostgresStore;
use tower_safe_retry::idempotency::Fingerprint;
use tower_safe_retry::idempotency::store::deadpool_postgres::{Manager, Pool};
use tower_safe_retry::idempotency::store::{
    Begin, IdempotencyStore, OwnerToken, RecordKey, StoredResponse,
};

use crate::support;

const LOCK_TTL: Duration = Duration::from_secs(60);
const REPLAY_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// A TTL short enough to wait out in a test.
const SHORT_TTL: Duration = Duration::from_millis(300);
/// A sleep that outlasts [`SHORT_TTL`].
const PAST_SHORT_TTL: Duration = Duration::from_millis(400);

fn key(name: &str) -> RecordKey {
    RecordKey::new("scope-a", name)
}

fn fingerprint(byte: u8) -> Fingerprint {
    Fingerprint::from_bytes([byte; 32])
}

fn response(body: &'static [u8]) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    StoredResponse {
        status: StatusCode::CREATED,
        headers,
        body: Some(Bytes::from_static(body)),
    }
}

async fn begin(store: &PostgresStore, key: &RecordKey, fingerprint_byte: u8) -> Begin {
    let owner = OwnerToken::generate();
    match store
        .begin(key, &fingerprint(fingerprint_byte), &owner, LOCK_TTL)
        .await
    {
        Ok(begin) => begin,
        Err(error) => panic!("begin failed: {}", support::chain(&error)),
    }
}

async fn claim(store: &PostgresStore, key: &RecordKey, owner: &OwnerToken, ttl: Duration) {
    let begin = store.begin(key, &fingerprint(1), owner, ttl).await;
    assert!(matches!(begin, Ok(Begin::Claimed)), "{begin:?}");
}

async fn replayed(store: &PostgresStore, key: &RecordKey) -> StoredResponse {
    match begin(store, key, 1).await {
        Begin::Completed(stored) => stored,
        other => panic!("expected Completed, got {other:?}"),
    }
}

#[tokio::test]
async fn claim_absent_key() {
    let Some(table) = support::table("claim").await else {
        return;
    };
    let store = &table.store;

    claim(store, &key("k"), &OwnerToken::generate(), LOCK_TTL).await;
    assert_eq!(table.count().await, 1);
}

#[tokio::test]
async fn duplicate_in_flight() {
    let Some(table) = support::table("in_flight").await else {
        return;
    };
    let store = &table.store;
    claim(store, &key("k"), &OwnerToken::generate(), LOCK_TTL).await;

    match begin(store, &key("k"), 1).await {
        Begin::InFlight { expires_in } => {
            assert!(expires_in <= LOCK_TTL, "{expires_in:?}");
            assert!(
                expires_in > LOCK_TTL - Duration::from_secs(5),
                "{expires_in:?}"
            );
        }
        other => panic!("expected InFlight, got {other:?}"),
    }
}

#[tokio::test]
async fn mismatch_in_flight_and_completed() {
    let Some(table) = support::table("mismatch").await else {
        return;
    };
    let store = &table.store;
    let owner = OwnerToken::generate();
    claim(store, &key("k"), &owner, LOCK_TTL).await;

    let in_flight = begin(store, &key("k"), 2).await;
    assert!(matches!(in_flight, Begin::Mismatch), "{in_flight:?}");

    store
        .complete(&key("k"), &owner, response(b"{}"), REPLAY_TTL)
        .await
        .unwrap();
    let completed = begin(store, &key("k"), 2).await;
    assert!(matches!(completed, Begin::Mismatch), "{completed:?}");
}

#[tokio::test]
async fn complete_then_replay() {
    let Some(table) = support::table("replay").await else {
        return;
    };
    let store = &table.store;
    let owner = OwnerToken::generate();
    claim(store, &key("k"), &owner, LOCK_TTL).await;

    let mut headers = HeaderMap::new();
    headers.append(LINK, HeaderValue::from_static("</a>; rel=next"));
    headers.append(LINK, HeaderValue::from_static("</b>; rel=prev"));
    headers.insert("x-raw", HeaderValue::from_bytes(b"caf\xe9").unwrap());
    let body: Vec<u8> = (0..=255).collect();
    let stored = StoredResponse {
        status: StatusCode::ACCEPTED,
        headers,
        body: Some(Bytes::from(body.clone())),
    };
    store
        .complete(&key("k"), &owner, stored.clone(), REPLAY_TTL)
        .await
        .unwrap();

    let replay = replayed(store, &key("k")).await;
    assert_eq!(replay.status, StatusCode::ACCEPTED);
    let links: Vec<_> = replay.headers.get_all(LINK).iter().collect();
    assert_eq!(links, ["</a>; rel=next", "</b>; rel=prev"]);
    assert_eq!(replay.headers["x-raw"].as_bytes(), b"caf\xe9");
    assert_eq!(replay.body.as_deref(), Some(&body[..]));
    assert_eq!(replay, stored);
}

#[tokio::test]
async fn completed_without_body() {
    let Some(table) = support::table("no_body").await else {
        return;
    };
    let store = &table.store;
    let owner = OwnerToken::generate();
    claim(store, &key("none"), &owner, LOCK_TTL).await;
    let mut without_body = response(b"");
    without_body.body = None;
    store
        .complete(&key("none"), &owner, without_body, REPLAY_TTL)
        .await
        .unwrap();

    let owner = OwnerToken::generate();
    claim(store, &key("empty"), &owner, LOCK_TTL).await;
    store
        .complete(&key("empty"), &owner, response(b""), REPLAY_TTL)
        .await
        .unwrap();

    let replay = replayed(store, &key("none")).await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.headers[CONTENT_TYPE], "application/json");
    assert_eq!(replay.body, None);
    // An empty body is a body, distinct from none.
    let replay = replayed(store, &key("empty")).await;
    assert_eq!(replay.body, Some(Bytes::new()));
}

#[tokio::test]
async fn large_body_round_trips() {
    let Some(table) = support::table("large").await else {
        return;
    };
    let store = &table.store;
    let owner = OwnerToken::generate();
    claim(store, &key("k"), &owner, LOCK_TTL).await;
    let body: Vec<u8> = (0..4 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    let mut large = response(b"");
    large.body = Some(Bytes::from(body.clone()));
    store
        .complete(&key("k"), &owner, large, REPLAY_TTL)
        .await
        .unwrap();

    let replay = replayed(store, &key("k")).await;
    assert_eq!(replay.body.as_deref(), Some(&body[..]));
}

#[tokio::test]
async fn release_frees_key() {
    let Some(table) = support::table("release").await else {
        return;
    };
    let store = &table.store;
    let owner = OwnerToken::generate();
    claim(store, &key("k"), &owner, LOCK_TTL).await;

    store.release(&key("k"), &owner).await.unwrap();
    assert_eq!(table.count().await, 0);
    claim(store, &key("k"), &OwnerToken::generate(), LOCK_TTL).await;
}

#[tokio::test]
async fn release_by_stranger_rejected() {
    let Some(table) = support::table("stranger").await else {
        return;
    };
    let store = &table.store;
    claim(store, &key("k"), &OwnerToken::generate(), LOCK_TTL).await;

    let error = store
        .release(&key("k"), &OwnerToken::generate())
        .await
        .unwrap_err();
    assert!(error.is_stale_owner(), "{error}");
    let error = store
        .complete(
            &key("k"),
            &OwnerToken::generate(),
            response(b"{}"),
            REPLAY_TTL,
        )
        .await
        .unwrap_err();
    assert!(error.is_stale_owner(), "{error}");
    let after = begin(store, &key("k"), 1).await;
    assert!(matches!(after, Begin::InFlight { .. }), "{after:?}");
}

#[tokio::test]
async fn stale_owner_on_absent_key() {
    let Some(table) = support::table("absent").await else {
        return;
    };
    let store = &table.store;
    let owner = OwnerToken::generate();

    let error = store
        .complete(&key("k"), &owner, response(b"{}"), REPLAY_TTL)
        .await
        .unwrap_err();
    assert!(error.is_stale_owner(), "{error}");
    let error = store.release(&key("k"), &owner).await.unwrap_err();
    assert!(error.is_stale_owner(), "{error}");
    let error = store.renew(&key("k"), &owner, LOCK_TTL).await.unwrap_err();
    assert!(error.is_stale_owner(), "{error}");
    assert_eq!(table.count().await, 0);
}

#[tokio::test]
async fn expired_lease_taken_over() {
    let Some(table) = support::table("takeover").await else {
        return;
    };
    let store = &table.store;
    claim(store, &key("k"), &OwnerToken::generate(), SHORT_TTL).await;

    let before = begin(store, &key("k"), 1).await;
    assert!(matches!(before, Begin::InFlight { .. }), "{before:?}");

    tokio::time::sleep(PAST_SHORT_TTL).await;
    // A takeover does not compare fingerprints: the old claim never completed.
    let fresh = OwnerToken::generate();
    let after = store
        .begin(&key("k"), &fingerprint(2), &fresh, LOCK_TTL)
        .await;
    assert!(matches!(after, Ok(Begin::Claimed)), "{after:?}");
    let duplicate = begin(store, &key("k"), 2).await;
    assert!(matches!(duplicate, Begin::InFlight { .. }), "{duplicate:?}");
}

#[tokio::test]
async fn stale_owner_rejected_after_takeover() {
    let Some(table) = support::table("stale").await else {
        return;
    };
    let store = &table.store;
    let stale = OwnerToken::generate();
    claim(store, &key("k"), &stale, SHORT_TTL).await;
    tokio::time::sleep(PAST_SHORT_TTL).await;
    let fresh = OwnerToken::generate();
    claim(store, &key("k"), &fresh, LOCK_TTL).await;

    let error = store
        .complete(&key("k"), &stale, response(b"late"), REPLAY_TTL)
        .await
        .unwrap_err();
    assert!(error.is_stale_owner(), "{error}");
    let error = store.renew(&key("k"), &stale, LOCK_TTL).await.unwrap_err();
    assert!(error.is_stale_owner(), "{error}");
    let error = store.release(&key("k"), &stale).await.unwrap_err();
    assert!(error.is_stale_owner(), "{error}");

    store
        .complete(&key("k"), &fresh, response(b"fresh"), REPLAY_TTL)
        .await
        .unwrap();
    let replay = replayed(store, &key("k")).await;
    assert_eq!(replay.body.as_deref(), Some(&b"fresh"[..]));
}

#[tokio::test]
async fn expired_claim_still_owned() {
    let Some(table) = support::table("expired_owned").await else {
        return;
    };
    let store = &table.store;
    let owner = OwnerToken::generate();
    claim(store, &key("k"), &owner, SHORT_TTL).await;
    tokio::time::sleep(PAST_SHORT_TTL).await;

    // No other request took the key over, so the slow owner may still complete it.
    store
        .complete(&key("k"), &owner, response(b"slow"), REPLAY_TTL)
        .await
        .unwrap();
    let replay = replayed(store, &key("k")).await;
    assert_eq!(replay.body.as_deref(), Some(&b"slow"[..]));
}

#[tokio::test]
async fn renew_extends_lease() {
    let Some(table) = support::table("renew").await else {
        return;
    };
    let store = &table.store;
    let owner = OwnerToken::generate();
    claim(store, &key("k"), &owner, SHORT_TTL).await;

    tokio::time::sleep(Duration::from_millis(200)).await;
    store
        .renew(&key("k"), &owner, Duration::from_millis(800))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // 400 ms after the claim, past its first 300 ms lease, the renewed lease holds.
    match begin(store, &key("k"), 1).await {
        Begin::InFlight { expires_in } => {
            assert!(expires_in <= Duration::from_millis(600), "{expires_in:?}");
            assert!(expires_in >= Duration::from_millis(300), "{expires_in:?}");
        }
        other => panic!("expected InFlight, got {other:?}"),
    }
    let error = store
        .renew(&key("k"), &OwnerToken::generate(), LOCK_TTL)
        .await
        .unwrap_err();
    assert!(error.is_stale_owner(), "{error}");
}

#[tokio::test]
async fn complete_after_complete_rejected() {
    let Some(table) = support::table("twice").await else {
        return;
    };
    let store = &table.store;
    let owner = OwnerToken::generate();
    claim(store, &key("k"), &owner, LOCK_TTL).await;
    store
        .complete(&key("k"), &owner, response(b"one"), REPLAY_TTL)
        .await
        .unwrap();

    let error = store
        .complete(&key("k"), &owner, response(b"two"), REPLAY_TTL)
        .await
        .unwrap_err();
    assert!(error.is_stale_owner(), "{error}");
    let error = store.renew(&key("k"), &owner, LOCK_TTL).await.unwrap_err();
    assert!(error.is_stale_owner(), "{error}");
    let error = store.release(&key("k"), &owner).await.unwrap_err();
    assert!(error.is_stale_owner(), "{error}");
    let replay = replayed(store, &key("k")).await;
    assert_eq!(replay.body.as_deref(), Some(&b"one"[..]));
}

#[tokio::test]
async fn replay_ttl_expires() {
    let Some(table) = support::table("replay_ttl").await else {
        return;
    };
    let store = &table.store;
    let owner = OwnerToken::generate();
    claim(store, &key("k"), &owner, LOCK_TTL).await;
    store
        .complete(&key("k"), &owner, response(b"{}"), SHORT_TTL)
        .await
        .unwrap();

    let before = begin(store, &key("k"), 1).await;
    assert!(matches!(before, Begin::Completed(_)), "{before:?}");

    tokio::time::sleep(PAST_SHORT_TTL).await;
    // An expired record is gone, so even another fingerprint claims the key.
    let after = begin(store, &key("k"), 2).await;
    assert!(matches!(after, Begin::Claimed), "{after:?}");
}

/// Runs `claimers` concurrent `begin` calls for one key from separate tasks and returns
/// the number of `Claimed` and of `InFlight` results.
async fn race(store: &PostgresStore, claimers: usize) -> (usize, usize) {
    let barrier = Arc::new(Barrier::new(claimers));
    let mut tasks = Vec::new();
    for _ in 0..claimers {
        let store = store.clone();
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            let owner = OwnerToken::generate();
            barrier.wait().await;
            store
                .begin(&key("k"), &fingerprint(1), &owner, LOCK_TTL)
                .await
        }));
    }

    let mut claimed = 0;
    let mut in_flight = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(Begin::Claimed) => claimed += 1,
            Ok(Begin::InFlight { .. }) => in_flight += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(error) => panic!("begin failed: {}", support::chain(&error)),
        }
    }
    (claimed, in_flight)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_one_winner() {
    let Some(table) = support::table_with_pool("race", 20).await else {
        return;
    };

    let (claimed, in_flight) = race(&table.store, 100).await;
    assert_eq!(claimed, 1);
    assert_eq!(in_flight, 99);
    assert_eq!(table.count().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_takeovers_one_winner() {
    let Some(table) = support::table_with_pool("takeover_race", 20).await else {
        return;
    };
    claim(&table.store, &key("k"), &OwnerToken::generate(), SHORT_TTL).await;
    tokio::time::sleep(PAST_SHORT_TTL).await;

    let (claimed, in_flight) = race(&table.store, 100).await;
    assert_eq!(claimed, 1);
    assert_eq!(in_flight, 99);
}

#[tokio::test]
async fn scopes_isolated() {
    let Some(table) = support::table("scopes").await else {
        return;
    };
    let store = &table.store;
    let alice = RecordKey::new("alice", "k");
    let bob = RecordKey::new("bob", "k");
    let owner = OwnerToken::generate();
    claim(store, &alice, &owner, LOCK_TTL).await;
    store
        .complete(&alice, &owner, response(b"alice"), REPLAY_TTL)
        .await
        .unwrap();

    // Bob's request with the same key and another fingerprint runs as his own.
    let bob_owner = OwnerToken::generate();
    let bob_begin = store
        .begin(&bob, &fingerprint(2), &bob_owner, LOCK_TTL)
        .await;
    assert!(matches!(bob_begin, Ok(Begin::Claimed)), "{bob_begin:?}");
    let error = store.release(&alice, &bob_owner).await.unwrap_err();
    assert!(error.is_stale_owner(), "{error}");
    let replay = replayed(store, &alice).await;
    assert_eq!(replay.body.as_deref(), Some(&b"alice"[..]));
}

#[tokio::test]
async fn sweep_deletes_only_expired() {
    let Some(table) = support::table("sweep").await else {
        return;
    };
    let store = &table.store;
    let expired_claim = OwnerToken::generate();
    claim(store, &key("expired-claim"), &expired_claim, SHORT_TTL).await;
    let owner = OwnerToken::generate();
    claim(store, &key("expired-record"), &owner, LOCK_TTL).await;
    store
        .complete(&key("expired-record"), &owner, response(b"{}"), SHORT_TTL)
        .await
        .unwrap();
    claim(store, &key("live-claim"), &OwnerToken::generate(), LOCK_TTL).await;
    let owner = OwnerToken::generate();
    claim(store, &key("live-record"), &owner, LOCK_TTL).await;
    store
        .complete(&key("live-record"), &owner, response(b"{}"), REPLAY_TTL)
        .await
        .unwrap();
    tokio::time::sleep(PAST_SHORT_TTL).await;

    assert_eq!(store.sweep().await.unwrap(), 2);
    assert_eq!(table.count().await, 2);
    assert_eq!(store.sweep().await.unwrap(), 0);
    let live_claim = begin(store, &key("live-claim"), 1).await;
    assert!(
        matches!(live_claim, Begin::InFlight { .. }),
        "{live_claim:?}"
    );
    let live_record = begin(store, &key("live-record"), 1).await;
    assert!(
        matches!(live_record, Begin::Completed(_)),
        "{live_record:?}"
    );
    // The swept claim's owner lost it.
    let error = store
        .complete(
            &key("expired-claim"),
            &expired_claim,
            response(b"{}"),
            REPLAY_TTL,
        )
        .await
        .unwrap_err();
    assert!(error.is_stale_owner(), "{error}");
}

#[tokio::test]
async fn sweep_runs_in_batches() {
    let Some(table) = support::table("sweep_batches").await else {
        return;
    };
    // 2,500 expired rows take three batches of at most 1,000.
    let sql = format!(
        "INSERT INTO {} (scope, key, fingerprint, owner, state, expires_at) \
         SELECT 's', 'k' || i, '\\x00', 'o', 'in_flight', now() - interval '1 second' \
         FROM generate_series(1, 2500) AS i",
        table.qualified()
    );
    assert_eq!(table.execute(&sql).await, 2500);
    claim(
        &table.store,
        &key("live"),
        &OwnerToken::generate(),
        LOCK_TTL,
    )
    .await;

    assert_eq!(table.store.sweep().await.unwrap(), 2500);
    assert_eq!(table.count().await, 1);
}

#[tokio::test]
async fn migrate_is_idempotent() {
    let Some(table) = support::table("migrate").await else {
        return;
    };
    let store = &table.store;
    claim(store, &key("k"), &OwnerToken::generate(), LOCK_TTL).await;

    // `support::table` ran it once already.
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    assert_eq!(table.count().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_succeed() {
    let Some(table) = support::unmigrated_table("migrate_race").await else {
        return;
    };

    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = table.store.clone();
        tasks.push(tokio::spawn(async move { store.migrate().await }));
    }
    for task in tasks {
        if let Err(error) = task.await.unwrap() {
            panic!("migrate failed: {}", support::chain(&error));
        }
    }
    claim(&table.store, &key("k"), &OwnerToken::generate(), LOCK_TTL).await;
}

#[tokio::test]
async fn schema_qualified_table() {
    let Some(table) = support::table_in_schema("qualified").await else {
        return;
    };
    let store = &table.store;
    let owner = OwnerToken::generate();
    claim(store, &key("k"), &owner, LOCK_TTL).await;
    store
        .complete(&key("k"), &owner, response(b"{}"), REPLAY_TTL)
        .await
        .unwrap();

    assert_eq!(table.count().await, 1);
    let replay = replayed(store, &key("k")).await;
    assert_eq!(replay.status, StatusCode::CREATED);
}

#[tokio::test]
async fn corrupt_headers_are_backend_error() {
    let Some(table) = support::table("corrupt").await else {
        return;
    };
    let store = &table.store;
    let owner = OwnerToken::generate();
    claim(store, &key("k"), &owner, LOCK_TTL).await;
    store
        .complete(&key("k"), &owner, response(b"{}"), REPLAY_TTL)
        .await
        .unwrap();
    let sql = format!("UPDATE {} SET headers = '\\x09'", table.qualified());
    assert_eq!(table.execute(&sql).await, 1);

    let error = store
        .begin(
            &key("k"),
            &fingerprint(1),
            &OwnerToken::generate(),
            LOCK_TTL,
        )
        .await
        .unwrap_err();
    assert!(error.is_backend(), "{error}");
    let message = support::chain(&error);
    assert!(message.contains("headers are corrupt"), "{message}");
}

#[tokio::test]
async fn invalid_url_is_backend_error() {
    let error = PostgresStore::connect("postgres://user@host:notaport/db")
        .await
        .unwrap_err();
    assert!(error.is_backend(), "{error}");
    let message = support::chain(&error);
    assert!(message.contains("port"), "{message}");
}

#[test]
#[should_panic(expected = "invalid table name part \"Records\"")]
fn invalid_table_name_panics() {
    // Building a pool opens no connection, so this test needs no database.
    let manager = Manager::new(tokio_postgres::Config::new(), NoTls);
    let pool = Pool::builder(manager).build().unwrap();
    let _ = PostgresStore::from_pool(pool).table("Records");
}
