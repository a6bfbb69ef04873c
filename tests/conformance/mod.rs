//! The conformance suite that every [`IdempotencyStore`] must pass.
//!
//! Each case is a `pub async fn` that takes a fresh store handle. Cases use random scopes
//! and keys, so stores that share one server (Redis, PostgreSQL) can run them in parallel
//! without colliding. Expiry cases sleep in real time, with TTLs of a few hundred
//! milliseconds, because a server's clock cannot be paused.
//!
//! A test binary adds the whole suite for a store with one line. Pass the path of an
//! `async fn() -> Option<S>` that returns a fresh store, or `None` after printing why the
//! backend is skipped:
//!
//! ```ignore
//! mod conformance;
//!
//! async fn postgres_store() -> Option<PostgresStore> { /* connect, or skip */ }
//!
//! conformance::store_tests!(postgres_store);
//! ```
//!
//! The macro expands to one `#[tokio::test]` per case, named after the case.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, LINK};
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::time::sleep;
use tower_safe_retry::IdempotencyStore;
use tower_safe_retry::idempotency::Fingerprint;
use tower_safe_retry::idempotency::store::{Begin, OwnerToken, RecordKey, StoredResponse};

/// A lease long enough that it never expires during a case.
pub const LONG_LOCK_TTL: Duration = Duration::from_secs(60);
/// A replay TTL long enough that it never expires during a case.
pub const LONG_REPLAY_TTL: Duration = Duration::from_secs(10 * 60);
/// The short TTL of the expiry cases.
pub const SHORT_TTL: Duration = Duration::from_millis(250);
/// How long the expiry cases sleep to be sure that a `SHORT_TTL` passed.
pub const PAST_SHORT_TTL: Duration = Duration::from_millis(300);

/// Expands to one `#[tokio::test]` per conformance case for the store that `$factory`
/// returns. `$factory` is the path of an `async fn() -> Option<S>`, and a `None` skips
/// the case.
macro_rules! store_tests {
    ($factory:path) => {
        $crate::conformance::store_tests!(@cases $factory;
            claim_absent_key,
            duplicate_in_flight,
            mismatch_in_flight,
            mismatch_completed,
            complete_then_replay,
            replay_multi_value_headers,
            replay_binary_header_value,
            replay_binary_body,
            replay_without_body,
            replay_empty_body,
            release_frees_key,
            release_by_stranger_rejected,
            absent_key_rejects_owner_operations,
            complete_twice_rejected,
            expired_lease_taken_over,
            stale_owner_rejected_after_takeover,
            renew_extends_lease,
            renew_by_stranger_rejected,
            replay_ttl_expires,
            scopes_isolated,
        );

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn concurrent_claims_one_winner() {
            if let Some(store) = $factory().await {
                $crate::conformance::concurrent_claims_one_winner(store).await;
            }
        }
    };
    (@cases $factory:path; $($case:ident,)+) => {
        $(
            #[tokio::test]
            async fn $case() {
                if let Some(store) = $factory().await {
                    $crate::conformance::$case(store).await;
                }
            }
        )+
    };
}
pub(crate) use store_tests;

/// Returns a key in a scope of its own, so no other case or test run can see it.
pub fn unique_key() -> RecordKey {
    RecordKey::new(random_name("scope"), random_name("key"))
}

fn random_name(kind: &str) -> String {
    format!("{kind}-{}", uuid::Uuid::new_v4().simple())
}

pub fn fingerprint(byte: u8) -> Fingerprint {
    Fingerprint::from_bytes([byte; 32])
}

pub fn response(body: &'static [u8]) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    StoredResponse {
        status: StatusCode::CREATED,
        headers,
        body: Some(Bytes::from_static(body)),
    }
}

/// Calls `begin` with fingerprint 1 and a new owner, with a long lease.
async fn begin_as_stranger<S: IdempotencyStore>(store: &S, key: &RecordKey) -> Begin {
    store
        .begin(key, &fingerprint(1), &OwnerToken::generate(), LONG_LOCK_TTL)
        .await
        .expect("begin failed")
}

async fn claim_with<S: IdempotencyStore>(
    store: &S,
    key: &RecordKey,
    lock_ttl: Duration,
) -> OwnerToken {
    let owner = OwnerToken::generate();
    let begin = store.begin(key, &fingerprint(1), &owner, lock_ttl).await;
    assert!(
        matches!(begin, Ok(Begin::Claimed)),
        "expected Claimed, got {begin:?}"
    );
    owner
}

async fn claim<S: IdempotencyStore>(store: &S, key: &RecordKey) -> OwnerToken {
    claim_with(store, key, LONG_LOCK_TTL).await
}

/// Claims `key`, completes it with `stored` and returns what `begin` then replays.
async fn store_and_replay<S: IdempotencyStore>(
    store: &S,
    stored: StoredResponse,
) -> StoredResponse {
    let key = unique_key();
    let owner = claim(store, &key).await;
    store
        .complete(&key, &owner, stored, LONG_REPLAY_TTL)
        .await
        .expect("complete failed");

    match begin_as_stranger(store, &key).await {
        Begin::Completed(replayed) => replayed,
        other => panic!("expected Completed, got {other:?}"),
    }
}

// ===== cases =====

pub async fn claim_absent_key<S: IdempotencyStore>(store: S) {
    let key = unique_key();

    claim(&store, &key).await;
}

pub async fn duplicate_in_flight<S: IdempotencyStore>(store: S) {
    let key = unique_key();
    claim(&store, &key).await;

    match begin_as_stranger(&store, &key).await {
        Begin::InFlight { expires_in } => {
            assert!(expires_in <= LONG_LOCK_TTL, "expires_in {expires_in:?}");
            assert!(expires_in > LONG_LOCK_TTL / 2, "expires_in {expires_in:?}");
        }
        other => panic!("expected InFlight, got {other:?}"),
    }
}

pub async fn mismatch_in_flight<S: IdempotencyStore>(store: S) {
    let key = unique_key();
    claim(&store, &key).await;

    let begin = store
        .begin(
            &key,
            &fingerprint(2),
            &OwnerToken::generate(),
            LONG_LOCK_TTL,
        )
        .await;
    assert!(
        matches!(begin, Ok(Begin::Mismatch)),
        "expected Mismatch, got {begin:?}"
    );
}

pub async fn mismatch_completed<S: IdempotencyStore>(store: S) {
    let key = unique_key();
    let owner = claim(&store, &key).await;
    store
        .complete(&key, &owner, response(b"{}"), LONG_REPLAY_TTL)
        .await
        .unwrap();

    let begin = store
        .begin(
            &key,
            &fingerprint(2),
            &OwnerToken::generate(),
            LONG_LOCK_TTL,
        )
        .await;
    assert!(
        matches!(begin, Ok(Begin::Mismatch)),
        "expected Mismatch, got {begin:?}"
    );
}

pub async fn complete_then_replay<S: IdempotencyStore>(store: S) {
    let replayed = store_and_replay(&store, response(b"{\"id\":1}")).await;

    assert_eq!(replayed, response(b"{\"id\":1}"));
}

pub async fn replay_multi_value_headers<S: IdempotencyStore>(store: S) {
    let mut stored = response(b"");
    stored
        .headers
        .append(LINK, HeaderValue::from_static("</a>; rel=next"));
    stored
        .headers
        .append(LINK, HeaderValue::from_static("</b>; rel=prev"));
    stored
        .headers
        .append(LINK, HeaderValue::from_static("</a>; rel=next"));

    let replayed = store_and_replay(&store, stored).await;

    let links: Vec<_> = replayed.headers.get_all(LINK).iter().collect();
    assert_eq!(
        links,
        ["</a>; rel=next", "</b>; rel=prev", "</a>; rel=next"]
    );
    assert_eq!(replayed.headers[CONTENT_TYPE], "application/json");
    assert_eq!(replayed.headers.len(), 4);
}

pub async fn replay_binary_header_value<S: IdempotencyStore>(store: S) {
    let raw = b"caf\xe9 \x80\xff";
    let mut stored = response(b"");
    stored
        .headers
        .insert("x-raw", HeaderValue::from_bytes(raw).unwrap());

    let replayed = store_and_replay(&store, stored).await;

    assert_eq!(replayed.headers["x-raw"].as_bytes(), raw);
}

pub async fn replay_binary_body<S: IdempotencyStore>(store: S) {
    // Every byte value, NUL and invalid UTF-8 included, twice over.
    let body: Vec<u8> = (0..=255).chain((0..=255).rev()).collect();
    let mut stored = response(b"");
    stored.status = StatusCode::ACCEPTED;
    stored.body = Some(Bytes::from(body.clone()));

    let replayed = store_and_replay(&store, stored).await;

    assert_eq!(replayed.status, StatusCode::ACCEPTED);
    assert_eq!(replayed.body.as_deref(), Some(&body[..]));
}

pub async fn replay_without_body<S: IdempotencyStore>(store: S) {
    let mut stored = response(b"");
    stored.status = StatusCode::OK;
    stored.body = None;

    let replayed = store_and_replay(&store, stored).await;

    assert_eq!(replayed.status, StatusCode::OK);
    assert_eq!(replayed.headers[CONTENT_TYPE], "application/json");
    assert_eq!(replayed.body, None);
}

pub async fn replay_empty_body<S: IdempotencyStore>(store: S) {
    let mut stored = response(b"");
    stored.status = StatusCode::NO_CONTENT;
    stored.headers.clear();

    let replayed = store_and_replay(&store, stored).await;

    assert_eq!(replayed.status, StatusCode::NO_CONTENT);
    assert!(replayed.headers.is_empty(), "{:?}", replayed.headers);
    assert_eq!(replayed.body, Some(Bytes::new()));
}

pub async fn release_frees_key<S: IdempotencyStore>(store: S) {
    let key = unique_key();
    let owner = claim(&store, &key).await;

    store.release(&key, &owner).await.unwrap();

    claim(&store, &key).await;
}

pub async fn release_by_stranger_rejected<S: IdempotencyStore>(store: S) {
    let key = unique_key();
    claim(&store, &key).await;

    let error = store
        .release(&key, &OwnerToken::generate())
        .await
        .unwrap_err();

    assert!(error.is_stale_owner(), "{error}");
    let begin = begin_as_stranger(&store, &key).await;
    assert!(
        matches!(begin, Begin::InFlight { .. }),
        "expected InFlight, got {begin:?}"
    );
}

pub async fn absent_key_rejects_owner_operations<S: IdempotencyStore>(store: S) {
    let key = unique_key();
    let owner = OwnerToken::generate();

    let error = store
        .complete(&key, &owner, response(b"{}"), LONG_REPLAY_TTL)
        .await
        .unwrap_err();
    assert!(error.is_stale_owner(), "complete: {error}");
    let error = store.release(&key, &owner).await.unwrap_err();
    assert!(error.is_stale_owner(), "release: {error}");
    let error = store.renew(&key, &owner, LONG_LOCK_TTL).await.unwrap_err();
    assert!(error.is_stale_owner(), "renew: {error}");

    // None of them created a record.
    claim(&store, &key).await;
}

pub async fn complete_twice_rejected<S: IdempotencyStore>(store: S) {
    let key = unique_key();
    let owner = claim(&store, &key).await;
    store
        .complete(&key, &owner, response(b"one"), LONG_REPLAY_TTL)
        .await
        .unwrap();

    let error = store
        .complete(&key, &owner, response(b"two"), LONG_REPLAY_TTL)
        .await
        .unwrap_err();
    assert!(error.is_stale_owner(), "complete: {error}");
    let error = store.release(&key, &owner).await.unwrap_err();
    assert!(error.is_stale_owner(), "release: {error}");
    let error = store.renew(&key, &owner, LONG_LOCK_TTL).await.unwrap_err();
    assert!(error.is_stale_owner(), "renew: {error}");

    match begin_as_stranger(&store, &key).await {
        Begin::Completed(replayed) => assert_eq!(replayed, response(b"one")),
        other => panic!("expected Completed, got {other:?}"),
    }
}

pub async fn expired_lease_taken_over<S: IdempotencyStore>(store: S) {
    let key = unique_key();
    claim_with(&store, &key, SHORT_TTL).await;
    let begin = begin_as_stranger(&store, &key).await;
    match begin {
        Begin::InFlight { expires_in } => assert!(expires_in <= SHORT_TTL, "{expires_in:?}"),
        other => panic!("expected InFlight before the lease expired, got {other:?}"),
    }

    sleep(PAST_SHORT_TTL).await;

    claim(&store, &key).await;
}

pub async fn stale_owner_rejected_after_takeover<S: IdempotencyStore>(store: S) {
    let key = unique_key();
    let stale = claim_with(&store, &key, SHORT_TTL).await;
    sleep(PAST_SHORT_TTL).await;
    let fresh = claim(&store, &key).await;

    let error = store
        .complete(&key, &stale, response(b"late"), LONG_REPLAY_TTL)
        .await
        .unwrap_err();
    assert!(error.is_stale_owner(), "complete: {error}");
    let error = store.renew(&key, &stale, LONG_LOCK_TTL).await.unwrap_err();
    assert!(error.is_stale_owner(), "renew: {error}");
    let error = store.release(&key, &stale).await.unwrap_err();
    assert!(error.is_stale_owner(), "release: {error}");

    // The new owner's claim survived all three.
    store
        .complete(&key, &fresh, response(b"fresh"), LONG_REPLAY_TTL)
        .await
        .unwrap();
    match begin_as_stranger(&store, &key).await {
        Begin::Completed(replayed) => assert_eq!(replayed, response(b"fresh")),
        other => panic!("expected Completed, got {other:?}"),
    }
}

pub async fn renew_extends_lease<S: IdempotencyStore>(store: S) {
    let key = unique_key();
    let half = SHORT_TTL / 2 + Duration::from_millis(25);
    let owner = claim_with(&store, &key, SHORT_TTL).await;

    sleep(half).await;
    store.renew(&key, &owner, SHORT_TTL).await.unwrap();
    sleep(half).await;

    // The first lease has passed, the renewed one has not.
    let begin = begin_as_stranger(&store, &key).await;
    match begin {
        Begin::InFlight { expires_in } => assert!(expires_in <= SHORT_TTL - half, "{expires_in:?}"),
        other => panic!("expected InFlight after the renewal, got {other:?}"),
    }

    sleep(half).await;
    claim(&store, &key).await;
}

pub async fn renew_by_stranger_rejected<S: IdempotencyStore>(store: S) {
    let key = unique_key();
    let owner = claim_with(&store, &key, SHORT_TTL).await;

    let error = store
        .renew(&key, &OwnerToken::generate(), LONG_LOCK_TTL)
        .await
        .unwrap_err();
    assert!(error.is_stale_owner(), "{error}");

    // The stranger's renewal did not extend the lease.
    sleep(PAST_SHORT_TTL).await;
    claim(&store, &key).await;
    let error = store.release(&key, &owner).await.unwrap_err();
    assert!(error.is_stale_owner(), "{error}");
}

pub async fn replay_ttl_expires<S: IdempotencyStore>(store: S) {
    let key = unique_key();
    let owner = claim(&store, &key).await;
    store
        .complete(&key, &owner, response(b"{}"), SHORT_TTL)
        .await
        .unwrap();
    let begin = begin_as_stranger(&store, &key).await;
    assert!(
        matches!(begin, Begin::Completed(_)),
        "expected Completed before the replay TTL, got {begin:?}"
    );

    sleep(PAST_SHORT_TTL).await;

    claim(&store, &key).await;
}

pub async fn scopes_isolated<S: IdempotencyStore>(store: S) {
    let name = random_name("key");
    let first = RecordKey::new(random_name("scope"), name.clone());
    let second = RecordKey::new(random_name("scope"), name);
    let owner = claim(&store, &first).await;
    store
        .complete(&first, &owner, response(b"first"), LONG_REPLAY_TTL)
        .await
        .unwrap();

    // A different fingerprint would be a mismatch if the scopes shared the record.
    let begin = store
        .begin(
            &second,
            &fingerprint(2),
            &OwnerToken::generate(),
            LONG_LOCK_TTL,
        )
        .await;
    assert!(
        matches!(begin, Ok(Begin::Claimed)),
        "expected Claimed, got {begin:?}"
    );
}

pub async fn concurrent_claims_one_winner<S: IdempotencyStore>(store: S) {
    const TASKS: usize = 100;
    let store = Arc::new(store);
    let key = unique_key();
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let store = Arc::clone(&store);
        let key = key.clone();
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            let owner = OwnerToken::generate();
            barrier.wait().await;
            let begin = store
                .begin(&key, &fingerprint(1), &owner, LONG_LOCK_TTL)
                .await;
            (owner, begin)
        }));
    }

    let mut winners = Vec::new();
    let mut in_flight = 0;
    for task in tasks {
        match task.await.unwrap() {
            (owner, Ok(Begin::Claimed)) => winners.push(owner),
            (_, Ok(Begin::InFlight { .. })) => in_flight += 1,
            (_, other) => panic!("expected Claimed or InFlight, got {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "claims");
    assert_eq!(in_flight, TASKS - 1, "in-flight replies");

    // The winner's token owns the record.
    store.release(&key, &winners[0]).await.unwrap();
}
