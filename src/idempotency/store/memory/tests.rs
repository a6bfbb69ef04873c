use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, LINK};
use http::{HeaderMap, HeaderValue, StatusCode};

use super::*;

const LOCK_TTL: Duration = Duration::from_secs(60);
const REPLAY_TTL: Duration = Duration::from_secs(24 * 60 * 60);

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

async fn claim(store: &MemoryStore, key: &RecordKey, owner: &OwnerToken) {
    let begin = store.begin(key, &fingerprint(1), owner, LOCK_TTL).await;
    assert!(matches!(begin, Ok(Begin::Claimed)), "{begin:?}");
}

#[tokio::test]
async fn claim_then_duplicate_in_flight() {
    let store = MemoryStore::new();
    let first = OwnerToken::generate();
    claim(&store, &key("k"), &first).await;

    let second = OwnerToken::generate();
    let begin = store
        .begin(&key("k"), &fingerprint(1), &second, LOCK_TTL)
        .await;
    match begin {
        Ok(Begin::InFlight { expires_in }) => assert!(expires_in <= LOCK_TTL),
        other => panic!("expected InFlight, got {other:?}"),
    }
}

#[tokio::test]
async fn mismatch_in_flight_and_completed() {
    let store = MemoryStore::new();
    let owner = OwnerToken::generate();
    claim(&store, &key("k"), &owner).await;

    let other = OwnerToken::generate();
    let begin = store
        .begin(&key("k"), &fingerprint(2), &other, LOCK_TTL)
        .await;
    assert!(matches!(begin, Ok(Begin::Mismatch)), "{begin:?}");

    store
        .complete(&key("k"), &owner, response(b"{}"), REPLAY_TTL)
        .await
        .unwrap();
    let begin = store
        .begin(&key("k"), &fingerprint(2), &other, LOCK_TTL)
        .await;
    assert!(matches!(begin, Ok(Begin::Mismatch)), "{begin:?}");
}

#[tokio::test]
async fn complete_then_replay() {
    let store = MemoryStore::new();
    let owner = OwnerToken::generate();
    claim(&store, &key("k"), &owner).await;
    store
        .complete(&key("k"), &owner, response(b"{\"id\":1}"), REPLAY_TTL)
        .await
        .unwrap();

    let begin = store
        .begin(
            &key("k"),
            &fingerprint(1),
            &OwnerToken::generate(),
            LOCK_TTL,
        )
        .await;
    match begin {
        Ok(Begin::Completed(stored)) => assert_eq!(stored, response(b"{\"id\":1}")),
        other => panic!("expected Completed, got {other:?}"),
    }
}

#[tokio::test]
async fn release_frees_key() {
    let store = MemoryStore::new();
    let owner = OwnerToken::generate();
    claim(&store, &key("k"), &owner).await;
    store.release(&key("k"), &owner).await.unwrap();

    claim(&store, &key("k"), &OwnerToken::generate()).await;
}

#[tokio::test]
async fn release_by_stranger_rejected() {
    let store = MemoryStore::new();
    let owner = OwnerToken::generate();
    claim(&store, &key("k"), &owner).await;

    let error = store
        .release(&key("k"), &OwnerToken::generate())
        .await
        .unwrap_err();
    assert!(error.is_stale_owner(), "{error}");
    let begin = store
        .begin(
            &key("k"),
            &fingerprint(1),
            &OwnerToken::generate(),
            LOCK_TTL,
        )
        .await;
    assert!(matches!(begin, Ok(Begin::InFlight { .. })), "{begin:?}");
}

#[tokio::test(start_paused = true)]
async fn expired_lease_taken_over() {
    let store = MemoryStore::new();
    let stale = OwnerToken::generate();
    claim(&store, &key("k"), &stale).await;

    tokio::time::advance(LOCK_TTL - Duration::from_millis(1)).await;
    let begin = store
        .begin(
            &key("k"),
            &fingerprint(1),
            &OwnerToken::generate(),
            LOCK_TTL,
        )
        .await;
    assert!(matches!(begin, Ok(Begin::InFlight { .. })), "{begin:?}");

    tokio::time::advance(Duration::from_millis(1)).await;
    let fresh = OwnerToken::generate();
    claim(&store, &key("k"), &fresh).await;

    let error = store
        .complete(&key("k"), &stale, response(b"late"), REPLAY_TTL)
        .await
        .unwrap_err();
    assert!(error.is_stale_owner(), "{error}");
    let error = store.release(&key("k"), &stale).await.unwrap_err();
    assert!(error.is_stale_owner(), "{error}");
    store
        .complete(&key("k"), &fresh, response(b"fresh"), REPLAY_TTL)
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn renew_extends_lease() {
    let store = MemoryStore::new();
    let owner = OwnerToken::generate();
    claim(&store, &key("k"), &owner).await;

    tokio::time::advance(Duration::from_secs(50)).await;
    store.renew(&key("k"), &owner, LOCK_TTL).await.unwrap();
    tokio::time::advance(Duration::from_secs(50)).await;
    let begin = store
        .begin(
            &key("k"),
            &fingerprint(1),
            &OwnerToken::generate(),
            LOCK_TTL,
        )
        .await;
    match begin {
        Ok(Begin::InFlight { expires_in }) => assert_eq!(expires_in, Duration::from_secs(10)),
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
    let store = MemoryStore::new();
    let owner = OwnerToken::generate();
    claim(&store, &key("k"), &owner).await;
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
}

#[tokio::test(start_paused = true)]
async fn replay_ttl_expires() {
    let store = MemoryStore::new();
    let owner = OwnerToken::generate();
    claim(&store, &key("k"), &owner).await;
    store
        .complete(&key("k"), &owner, response(b"{}"), REPLAY_TTL)
        .await
        .unwrap();

    tokio::time::advance(REPLAY_TTL - Duration::from_millis(1)).await;
    let begin = store
        .begin(
            &key("k"),
            &fingerprint(1),
            &OwnerToken::generate(),
            LOCK_TTL,
        )
        .await;
    assert!(matches!(begin, Ok(Begin::Completed(_))), "{begin:?}");

    tokio::time::advance(Duration::from_millis(1)).await;
    claim(&store, &key("k"), &OwnerToken::generate()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_one_winner() {
    let store = MemoryStore::new();
    let barrier = Arc::new(tokio::sync::Barrier::new(100));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let store = store.clone();
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let owner = OwnerToken::generate();
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
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(claimed, 1);
    assert_eq!(in_flight, 99);
}

#[tokio::test]
async fn binary_body_and_multi_value_headers() {
    let store = MemoryStore::new();
    let owner = OwnerToken::generate();
    claim(&store, &key("k"), &owner).await;

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

    let begin = store
        .begin(
            &key("k"),
            &fingerprint(1),
            &OwnerToken::generate(),
            LOCK_TTL,
        )
        .await;
    let Ok(Begin::Completed(replayed)) = begin else {
        panic!("expected Completed, got {begin:?}");
    };
    assert_eq!(replayed.status, StatusCode::ACCEPTED);
    let links: Vec<_> = replayed.headers.get_all(LINK).iter().collect();
    assert_eq!(links, ["</a>; rel=next", "</b>; rel=prev"]);
    assert_eq!(replayed.headers["x-raw"].as_bytes(), b"caf\xe9");
    assert_eq!(replayed.body.as_deref(), Some(&body[..]));
}

#[tokio::test(start_paused = true)]
async fn entry_bound_rejects_then_sweeps() {
    let store = MemoryStore::new().max_entries(3);
    for name in ["a", "b", "c"] {
        claim(&store, &key(name), &OwnerToken::generate()).await;
    }

    let error = store
        .begin(
            &key("d"),
            &fingerprint(1),
            &OwnerToken::generate(),
            LOCK_TTL,
        )
        .await
        .unwrap_err();
    assert!(error.is_capacity(), "{error}");
    // A full store still reports the state of the keys it contains.
    let begin = store
        .begin(
            &key("a"),
            &fingerprint(1),
            &OwnerToken::generate(),
            LOCK_TTL,
        )
        .await;
    assert!(matches!(begin, Ok(Begin::InFlight { .. })), "{begin:?}");

    // Once the leases expire, a sweep of every shard removes keys "a" to "c".
    tokio::time::advance(LOCK_TTL).await;
    claim(&store, &key("d"), &OwnerToken::generate()).await;
    assert_eq!(store.shared.entries.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn byte_bound_drops_body() {
    // Room for the claim and the headers of the response, not its 1,000-byte body.
    let store = MemoryStore::new().max_bytes(200);
    let owner = OwnerToken::generate();
    claim(&store, &key("k"), &owner).await;
    let mut large = response(b"");
    large.body = Some(Bytes::from(vec![7; 1000]));
    store
        .complete(&key("k"), &owner, large, REPLAY_TTL)
        .await
        .unwrap();

    let begin = store
        .begin(
            &key("k"),
            &fingerprint(1),
            &OwnerToken::generate(),
            LOCK_TTL,
        )
        .await;
    let Ok(Begin::Completed(replayed)) = begin else {
        panic!("expected Completed, got {begin:?}");
    };
    assert_eq!(replayed.status, StatusCode::CREATED);
    assert_eq!(replayed.headers[CONTENT_TYPE], "application/json");
    assert_eq!(replayed.body, None);

    let error = store
        .begin(
            &RecordKey::new("scope-a", "k".repeat(200)),
            &fingerprint(1),
            &OwnerToken::generate(),
            LOCK_TTL,
        )
        .await
        .unwrap_err();
    assert!(error.is_capacity(), "{error}");
}
