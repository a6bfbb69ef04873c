//! The server-side idempotency layer on a real axum server on 127.0.0.1, called over
//! HTTP/1.1 by a hyper client.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::post;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LINK, RETRY_AFTER, SET_COOKIE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tower_safe_retry::idempotency::store::{
    Begin, OwnerToken, RecordKey, StoreError, StoredResponse,
};
use tower_safe_retry::idempotency::{Fingerprint, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};
use tower_safe_retry::{IdempotencyLayer, IdempotencyStore, MemoryStore};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A received response with its body collected.
struct Received {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Received {
    fn replayed(&self) -> Option<&HeaderValue> {
        self.headers.get(IDEMPOTENT_REPLAYED)
    }
}

async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn request(
    method: Method,
    address: SocketAddr,
    path: &str,
    key: Option<&[u8]>,
    body: &'static str,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{address}{path}"));
    if let Some(key) = key {
        builder = builder.header(IDEMPOTENCY_KEY, HeaderValue::from_bytes(key).unwrap());
    }
    builder
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn keyed_post(address: SocketAddr, key: &str, body: &'static str) -> Request<Full<Bytes>> {
    request(
        Method::POST,
        address,
        "/charges",
        Some(key.as_bytes()),
        body,
    )
}

async fn send(client: &HttpClient, request: Request<Full<Bytes>>) -> Received {
    let response = client.request(request).await.unwrap();
    collect(response).await
}

async fn collect<B>(response: Response<B>) -> Received
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Received {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// An app whose `/charges` (`GET` and `POST`) and `POST /refunds` handler counts its calls
/// and returns `{"charge":N,"bytes":M}`: the call number and the request body length.
fn counting_app(layer: IdempotencyLayer<impl IdempotencyStore>) -> (Router, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let handler = move |body: Bytes| {
        let call = counter.fetch_add(1, Ordering::SeqCst);
        async move { format!("{{\"charge\":{call},\"bytes\":{}}}", body.len()) }
    };
    let app = Router::new()
        .route("/charges", post(handler.clone()).get(handler.clone()))
        .route("/refunds", post(handler))
        .layer(layer);
    (app, calls)
}

fn assert_problem(received: &Received, status: StatusCode) {
    assert_eq!(received.status, status);
    assert_eq!(received.headers[CONTENT_TYPE], "application/problem+json");
    let problem: serde_json::Value = serde_json::from_slice(&received.body).unwrap();
    assert_eq!(problem["type"], "about:blank");
    assert_eq!(problem["status"], status.as_u16());
    assert!(problem["title"].is_string(), "{problem}");
    assert!(problem["detail"].is_string(), "{problem}");
}

#[tokio::test]
async fn axum_router_layer() {
    async fn handler() -> &'static str {
        "charged"
    }
    let app: Router = Router::new()
        .route("/charges", post(handler))
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    let address = serve(app).await;
    let client = client();

    let first = send(&client, keyed_post(address, "k1", "{}")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body, "charged");
    assert!(first.replayed().is_none());
    let second = send(&client, keyed_post(address, "k1", "{}")).await;
    assert_eq!(second.body, "charged");
    assert_eq!(second.replayed().unwrap(), "true");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_run_once() {
    const REQUESTS: usize = 200;
    let calls = Arc::new(AtomicUsize::new(0));
    let (release, released) = watch::channel(false);
    let handler = {
        let calls = Arc::clone(&calls);
        let released = released.clone();
        move || {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            let mut released = released.clone();
            async move {
                released.wait_for(|released| *released).await.unwrap();
                format!("{{\"charge\":{call}}}")
            }
        }
    };
    let app = Router::new()
        .route("/charges", post(handler))
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    let address = serve(app).await;
    let client = client();

    // Every request but the first gets 409 while the handler waits, then retries until it
    // gets the stored response.
    let first_round_conflicts = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..REQUESTS {
        let client = client.clone();
        let conflicts = Arc::clone(&first_round_conflicts);
        let mut released = released.clone();
        tasks.push(tokio::spawn(async move {
            let mut first_round = true;
            for _ in 0..500 {
                let received =
                    send(&client, keyed_post(address, "same-key", "{\"amount\":100}")).await;
                if received.status != StatusCode::CONFLICT {
                    return received;
                }
                assert!(received.headers.contains_key(RETRY_AFTER));
                if first_round {
                    conflicts.fetch_add(1, Ordering::SeqCst);
                    first_round = false;
                    released.wait_for(|released| *released).await.unwrap();
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            panic!("the key stayed in flight after 500 attempts");
        }));
    }

    for _ in 0..1000 {
        if first_round_conflicts.load(Ordering::SeqCst) == REQUESTS - 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(first_round_conflicts.load(Ordering::SeqCst), REQUESTS - 1);
    release.send(true).unwrap();

    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    for received in &results {
        assert_eq!(received.status, StatusCode::OK);
        assert_eq!(received.body, "{\"charge\":0}");
    }
    let first_executions = results.iter().filter(|r| r.replayed().is_none()).count();
    assert_eq!(first_executions, 1);
    let replays = results
        .iter()
        .filter(|r| r.replayed().is_some_and(|value| value == "true"))
        .count();
    assert_eq!(replays, REQUESTS - 1);
}

#[tokio::test]
async fn replay_is_byte_exact() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let handler = move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let body: Vec<u8> = (0..=255u8).rev().collect();
            Response::builder()
                .status(StatusCode::CREATED)
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(LINK, "</charges/1>; rel=self")
                .header(LINK, "</charges>; rel=collection")
                .header("x-charge-id", "ch_1")
                .header(SET_COOKIE, "session=abc; HttpOnly")
                .body(axum::body::Body::from(body))
                .unwrap()
        }
    };
    let app = Router::new()
        .route("/charges", post(handler))
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    let address = serve(app).await;
    let client = client();

    let first = send(&client, keyed_post(address, "k", "{}")).await;
    let second = send(&client, keyed_post(address, "k", "{}")).await;

    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(first.replayed().is_none());
    assert_eq!(first.headers[SET_COOKIE], "session=abc; HttpOnly");
    assert_eq!(second.status, first.status);
    assert_eq!(second.body, first.body);
    assert_eq!(second.body.len(), 256);
    assert_eq!(second.replayed().unwrap(), "true");
    assert!(!second.headers.contains_key(SET_COOKIE));
    for name in first.headers.keys() {
        // The server adds `Date` to each response, and `Set-Cookie` is not stored.
        if name == "date" || name == SET_COOKIE {
            continue;
        }
        let expected: Vec<_> = first.headers.get_all(name).iter().collect();
        let replayed: Vec<_> = second.headers.get_all(name).iter().collect();
        assert_eq!(replayed, expected, "header {name}");
    }
    assert_eq!(second.headers.get_all(LINK).iter().count(), 2);
    assert_eq!(second.headers[CONTENT_LENGTH], "256");
}

#[tokio::test]
async fn mismatch_rejected_with_422() {
    let (app, calls) = counting_app(IdempotencyLayer::new(MemoryStore::new()));
    let address = serve(app).await;
    let client = client();

    let first = send(&client, keyed_post(address, "k", "{\"amount\":1}")).await;
    assert_eq!(first.status, StatusCode::OK);

    let other_body = send(&client, keyed_post(address, "k", "{\"amount\":2}")).await;
    assert_problem(&other_body, StatusCode::UNPROCESSABLE_ENTITY);

    let other_path = request(
        Method::POST,
        address,
        "/refunds",
        Some(b"k"),
        "{\"amount\":1}",
    );
    let other_path = send(&client, other_path).await;
    assert_problem(&other_path, StatusCode::UNPROCESSABLE_ENTITY);

    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn server_error_releases_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let handler = move || {
        let call = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            match call {
                0 => (StatusCode::INTERNAL_SERVER_ERROR, "failed"),
                _ => (StatusCode::OK, "charged"),
            }
        }
    };
    let app = Router::new()
        .route("/charges", post(handler))
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    let address = serve(app).await;
    let client = client();

    let first = send(&client, keyed_post(address, "k", "{}")).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    let second = send(&client, keyed_post(address, "k", "{}")).await;
    assert_eq!(second.status, StatusCode::OK);
    assert!(second.replayed().is_none());
    let third = send(&client, keyed_post(address, "k", "{}")).await;
    assert_eq!(third.body, "charged");
    assert_eq!(third.replayed().unwrap(), "true");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn retry_later_statuses_release_key() {
    for refusal in [StatusCode::REQUEST_TIMEOUT, StatusCode::TOO_MANY_REQUESTS] {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let handler = move || {
            let call = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                match call {
                    0 => (refusal, "later"),
                    _ => (StatusCode::CREATED, "charged"),
                }
            }
        };
        let app = Router::new()
            .route("/charges", post(handler))
            .layer(IdempotencyLayer::new(MemoryStore::new()));
        let address = serve(app).await;
        let client = client();

        let first = send(&client, keyed_post(address, "k", "{}")).await;
        assert_eq!(first.status, refusal);
        let second = send(&client, keyed_post(address, "k", "{}")).await;
        assert_eq!(second.status, StatusCode::CREATED, "after {refusal}");
        assert!(second.replayed().is_none(), "after {refusal}");
        assert_eq!(calls.load(Ordering::SeqCst), 2, "after {refusal}");
    }
}

#[tokio::test]
async fn handler_panic_releases_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let handler = move || {
        let call = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            assert!(call > 0, "first call panics on purpose");
            "charged"
        }
    };
    let app = Router::new()
        .route("/charges", post(handler))
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    let address = serve(app).await;
    let client = client();

    let first = client.request(keyed_post(address, "k", "{}")).await;
    match first {
        // The panic closes the connection after it was established.
        Err(error) => assert!(!error.is_connect(), "{error}"),
        Ok(response) => assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR),
    }

    let second = send(&client, keyed_post(address, "k", "{}")).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.body, "charged");
    assert!(second.replayed().is_none());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn dropped_request_releases_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let entered = Arc::new(Notify::new());
    let handler = {
        let calls = Arc::clone(&calls);
        let entered = Arc::clone(&entered);
        move || {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            let entered = Arc::clone(&entered);
            async move {
                if call == 0 {
                    entered.notify_one();
                    std::future::pending::<()>().await;
                }
                "charged"
            }
        }
    };
    let app = Router::new()
        .route("/charges", post(handler))
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    let address = serve(app).await;

    // A connection of its own, closed while the handler runs.
    let stream = TcpStream::connect(address).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let in_flight =
        tokio::spawn(async move { sender.send_request(keyed_post(address, "k", "{}")).await });
    entered.notified().await;
    in_flight.abort();
    connection.abort();

    let client = client();
    let mut received = send(&client, keyed_post(address, "k", "{}")).await;
    for _ in 0..200 {
        if received.status != StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        received = send(&client, keyed_post(address, "k", "{}")).await;
    }
    assert_eq!(received.status, StatusCode::OK);
    assert_eq!(received.body, "charged");
    assert!(received.replayed().is_none());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn invalid_keys_rejected_with_400() {
    let (app, calls) = counting_app(IdempotencyLayer::new(MemoryStore::new()));
    let address = serve(app).await;
    let client = client();

    let too_long = vec![b'k'; 256];
    for key in [&b""[..], &too_long, b"caf\xe9", b"a b"] {
        let received = send(
            &client,
            request(Method::POST, address, "/charges", Some(key), "{}"),
        )
        .await;
        assert_problem(&received, StatusCode::BAD_REQUEST);
    }

    let mut repeated = keyed_post(address, "a", "{}");
    repeated
        .headers_mut()
        .append(IDEMPOTENCY_KEY, HeaderValue::from_static("b"));
    let received = send(&client, repeated).await;
    assert_problem(&received, StatusCode::BAD_REQUEST);

    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn quoted_key_equals_bare_key() {
    let (app, calls) = counting_app(IdempotencyLayer::new(MemoryStore::new()));
    let address = serve(app).await;
    let client = client();

    let quoted = send(&client, keyed_post(address, "\"abc\"", "{}")).await;
    assert_eq!(quoted.status, StatusCode::OK);
    let bare = send(&client, keyed_post(address, "abc", "{}")).await;
    assert_eq!(bare.body, quoted.body);
    assert_eq!(bare.replayed().unwrap(), "true");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn missing_key_passes_through() {
    let (app, calls) = counting_app(IdempotencyLayer::new(MemoryStore::new()));
    let address = serve(app).await;
    let client = client();

    for _ in 0..2 {
        let received = send(
            &client,
            request(Method::POST, address, "/charges", None, "{}"),
        )
        .await;
        assert_eq!(received.status, StatusCode::OK);
        assert!(received.replayed().is_none());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn required_key_rejects_missing() {
    let layer = IdempotencyLayer::new(MemoryStore::new()).required(true);
    let (app, calls) = counting_app(layer);
    let address = serve(app).await;
    let client = client();

    let received = send(
        &client,
        request(Method::POST, address, "/charges", None, "{}"),
    )
    .await;
    assert_problem(&received, StatusCode::BAD_REQUEST);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    let received = send(&client, request(Method::GET, address, "/charges", None, "")).await;
    assert_eq!(received.status, StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn get_not_affected() {
    let (app, calls) = counting_app(IdempotencyLayer::new(MemoryStore::new()));
    let address = serve(app).await;
    let client = client();

    for _ in 0..2 {
        let get = request(Method::GET, address, "/charges", Some(b"k"), "");
        let received = send(&client, get).await;
        assert_eq!(received.status, StatusCode::OK);
        assert!(received.replayed().is_none());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn scopes_isolate_callers() {
    let (app, calls) = counting_app(IdempotencyLayer::new(MemoryStore::new()));
    let address = serve(app).await;
    let client = client();
    let as_caller = |token: &'static str| {
        let mut request = keyed_post(address, "shared-key", "{}");
        let value = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
        request.headers_mut().insert(AUTHORIZATION, value);
        request
    };

    let alice = send(&client, as_caller("alice")).await;
    let bob = send(&client, as_caller("bob")).await;
    assert!(alice.replayed().is_none());
    assert!(bob.replayed().is_none());
    assert_ne!(alice.body, bob.body);
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    let alice_again = send(&client, as_caller("alice")).await;
    assert_eq!(alice_again.body, alice.body);
    assert_eq!(alice_again.replayed().unwrap(), "true");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn oversized_response_replays_empty() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let handler = move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            (
                StatusCode::CREATED,
                [("x-charge-id", "ch_big")],
                vec![b'x'; 4096],
            )
        }
    };
    let layer = IdempotencyLayer::new(MemoryStore::new()).max_response_body(1024);
    let app = Router::new().route("/charges", post(handler)).layer(layer);
    let address = serve(app).await;
    let client = client();

    let first = send(&client, keyed_post(address, "k", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body.len(), 4096);
    assert!(first.replayed().is_none());

    let second = send(&client, keyed_post(address, "k", "{}")).await;
    assert_eq!(second.status, StatusCode::CREATED);
    assert_eq!(second.headers["x-charge-id"], "ch_big");
    assert_eq!(second.headers[CONTENT_LENGTH], "0");
    assert_eq!(second.replayed().unwrap(), "true");
    assert!(second.body.is_empty());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A store whose `begin` always fails, as an unreachable backend would.
#[derive(Clone, Default)]
struct FailingStore {
    begins: Arc<AtomicUsize>,
}

impl IdempotencyStore for FailingStore {
    async fn begin(
        &self,
        _key: &RecordKey,
        _fingerprint: &Fingerprint,
        _owner: &OwnerToken,
        _lock_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        self.begins.fetch_add(1, Ordering::SeqCst);
        Err(StoreError::backend(io::Error::other("connection refused")))
    }

    async fn complete(
        &self,
        _key: &RecordKey,
        _owner: &OwnerToken,
        _response: StoredResponse,
        _replay_ttl: Duration,
    ) -> Result<(), StoreError> {
        Err(StoreError::stale_owner())
    }

    async fn release(&self, _key: &RecordKey, _owner: &OwnerToken) -> Result<(), StoreError> {
        Err(StoreError::stale_owner())
    }

    async fn renew(
        &self,
        _key: &RecordKey,
        _owner: &OwnerToken,
        _lock_ttl: Duration,
    ) -> Result<(), StoreError> {
        Err(StoreError::stale_owner())
    }
}

/// A [`MemoryStore`] whose `complete` always fails.
#[derive(Clone, Default)]
struct CompleteFailingStore {
    inner: MemoryStore,
}

/// A [`MemoryStore`] whose `complete` fails its first `failures` calls.
#[derive(Clone, Default)]
struct FlakyCompleteStore {
    inner: MemoryStore,
    failures: usize,
    completes: Arc<AtomicUsize>,
}

impl IdempotencyStore for FlakyCompleteStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lock_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        self.inner.begin(key, fingerprint, owner, lock_ttl).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        owner: &OwnerToken,
        response: StoredResponse,
        replay_ttl: Duration,
    ) -> Result<(), StoreError> {
        if self.completes.fetch_add(1, Ordering::SeqCst) < self.failures {
            return Err(StoreError::backend(io::Error::other("connection reset")));
        }
        self.inner.complete(key, owner, response, replay_ttl).await
    }

    async fn release(&self, key: &RecordKey, owner: &OwnerToken) -> Result<(), StoreError> {
        self.inner.release(key, owner).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        owner: &OwnerToken,
        lock_ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, owner, lock_ttl).await
    }
}

impl IdempotencyStore for CompleteFailingStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lock_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        self.inner.begin(key, fingerprint, owner, lock_ttl).await
    }

    async fn complete(
        &self,
        _key: &RecordKey,
        _owner: &OwnerToken,
        _response: StoredResponse,
        _replay_ttl: Duration,
    ) -> Result<(), StoreError> {
        Err(StoreError::backend(io::Error::other("connection reset")))
    }

    async fn release(&self, key: &RecordKey, owner: &OwnerToken) -> Result<(), StoreError> {
        self.inner.release(key, owner).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        owner: &OwnerToken,
        lock_ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, owner, lock_ttl).await
    }
}

#[tokio::test]
async fn failed_completion_keeps_response() {
    let (app, calls) = counting_app(IdempotencyLayer::new(CompleteFailingStore::default()));
    let address = serve(app).await;
    let client = client();

    let first = send(&client, keyed_post(address, "k", "{}")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body, "{\"charge\":0,\"bytes\":2}");

    // The layer keeps retrying the completion and renewing the claim, so the retry does
    // not run.
    let retry = send(&client, keyed_post(address, "k", "{}")).await;
    assert_problem(&retry, StatusCode::CONFLICT);
    assert!(retry.headers.contains_key(RETRY_AFTER));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn store_failure_fails_closed() {
    let store = FailingStore::default();
    let begins = Arc::clone(&store.begins);
    let (app, calls) =
        counting_app(IdempotencyLayer::new(store).retry_after(Duration::from_secs(3)));
    let address = serve(app).await;
    let client = client();

    let received = send(&client, keyed_post(address, "k", "{}")).await;
    assert_problem(&received, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(received.headers[RETRY_AFTER], "3");
    assert_eq!(begins.load(Ordering::SeqCst), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn store_failure_fails_open() {
    let layer = IdempotencyLayer::new(FailingStore::default()).fail_open(true);
    let (app, calls) = counting_app(layer);
    let address = serve(app).await;
    let client = client();

    let received = send(&client, keyed_post(address, "k", "{}")).await;
    assert_eq!(received.status, StatusCode::OK);
    assert!(received.replayed().is_none());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn request_body_over_limit() {
    let layer = IdempotencyLayer::new(MemoryStore::new()).max_request_body(16);
    let (app, calls) = counting_app(layer);
    let address = serve(app).await;
    let client = client();

    let received = send(&client, keyed_post(address, "a", "{\"amount\":123456}")).await;
    assert_problem(&received, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    let received = send(&client, keyed_post(address, "b", "{\"amount\":12345}")).await;
    assert_eq!(received.status, StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn metrics_count_outcomes() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let (release, released) = watch::channel(false);
    let entered = Arc::new(Notify::new());
    let slow = {
        let entered = Arc::clone(&entered);
        move || {
            let mut released = released.clone();
            entered.notify_one();
            async move {
                released.wait_for(|released| *released).await.unwrap();
                "slow"
            }
        }
    };
    let (app, _calls) =
        counting_app(IdempotencyLayer::new(MemoryStore::new()).max_request_body(64));
    let app = app.route(
        "/slow",
        post(slow).layer(IdempotencyLayer::new(MemoryStore::new())),
    );
    let address = serve(app).await;
    let (failing_app, _) = counting_app(IdempotencyLayer::new(FailingStore::default()));
    let failing_address = serve(failing_app).await;
    let client = client();

    let get = request(Method::GET, address, "/charges", Some(b"k"), "");
    assert_eq!(send(&client, get).await.status, StatusCode::OK);
    let no_key = request(Method::POST, address, "/charges", None, "{}");
    assert_eq!(send(&client, no_key).await.status, StatusCode::OK);
    assert_eq!(
        send(&client, keyed_post(address, "k", "{}")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&client, keyed_post(address, "k", "{}")).await.status,
        StatusCode::OK
    );
    let mismatch = send(&client, keyed_post(address, "k", "[]")).await;
    assert_eq!(mismatch.status, StatusCode::UNPROCESSABLE_ENTITY);
    let empty_key = request(Method::POST, address, "/charges", Some(b""), "{}");
    assert_eq!(
        send(&client, empty_key).await.status,
        StatusCode::BAD_REQUEST
    );
    let large = keyed_post(
        address,
        "large",
        "0123456789012345678901234567890123456789012345678901234567890123456789",
    );
    assert_eq!(
        send(&client, large).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let failing = send(&client, keyed_post(failing_address, "k", "{}")).await;
    assert_eq!(failing.status, StatusCode::SERVICE_UNAVAILABLE);

    let slow_path =
        |key: &'static str| request(Method::POST, address, "/slow", Some(key.as_bytes()), "{}");
    let first_slow = tokio::spawn({
        let client = client.clone();
        let request = slow_path("s");
        async move { client.request(request).await.unwrap().status() }
    });
    entered.notified().await;
    let duplicate = send(&client, slow_path("s")).await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    release.send(true).unwrap();
    assert_eq!(first_slow.await.unwrap(), StatusCode::OK);

    let mut counts = std::collections::HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if key.key().name() != "idempotency_requests_total" {
            continue;
        }
        let outcome = key
            .key()
            .labels()
            .find(|label| label.key() == "outcome")
            .map(|label| label.value().to_owned())
            .unwrap();
        let DebugValue::Counter(count) = value else {
            panic!("{outcome} is not a counter");
        };
        counts.insert(outcome, count);
    }
    let expected = [
        ("passed_through", 2),
        ("executed", 2),
        ("replayed", 1),
        ("mismatch", 1),
        ("invalid", 1),
        ("too_large", 1),
        ("store_error", 1),
        ("in_flight", 1),
    ];
    for (outcome, count) in expected {
        assert_eq!(
            counts.get(outcome),
            Some(&count),
            "outcome {outcome}: {counts:?}"
        );
    }
    assert_eq!(counts.len(), expected.len(), "{counts:?}");
}

/// A handler that responds with `first_status` on its first call, after the test opens `gate`,
/// and `201` at once after that.
fn gated_handler(
    calls: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Notify>,
    first_status: StatusCode,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = (StatusCode, String)> + Send>>
+ Clone
+ Send
+ Sync
+ 'static {
    move || {
        let call = calls.fetch_add(1, Ordering::SeqCst);
        let gate = Arc::clone(&gate);
        Box::pin(async move {
            if call == 0 {
                gate.notified().await;
                return (first_status, format!("call {call}"));
            }
            (StatusCode::CREATED, format!("call {call}"))
        })
    }
}

#[tokio::test]
async fn waiting_duplicate_gets_the_replay() {
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Notify::new());
    let handler = gated_handler(Arc::clone(&calls), Arc::clone(&gate), StatusCode::CREATED);
    let layer =
        IdempotencyLayer::new(MemoryStore::new()).wait_for_in_flight(Duration::from_secs(5));
    let address = serve(Router::new().route("/charges", post(handler)).layer(layer)).await;
    let client = client();

    let first = tokio::spawn(send_owned(client.clone(), keyed_post(address, "k", "{}")));
    while calls.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let duplicate = tokio::spawn(send_owned(client.clone(), keyed_post(address, "k", "{}")));
    tokio::time::sleep(Duration::from_millis(120)).await;
    gate.notify_one();

    let first = first.await.unwrap();
    let duplicate = duplicate.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(duplicate.status, StatusCode::CREATED);
    assert_eq!(duplicate.body, first.body);
    assert_eq!(duplicate.replayed().unwrap(), "true");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn waiting_duplicate_runs_after_release() {
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Notify::new());
    let handler = gated_handler(
        Arc::clone(&calls),
        Arc::clone(&gate),
        StatusCode::INTERNAL_SERVER_ERROR,
    );
    let layer =
        IdempotencyLayer::new(MemoryStore::new()).wait_for_in_flight(Duration::from_secs(5));
    let address = serve(Router::new().route("/charges", post(handler)).layer(layer)).await;
    let client = client();

    let first = tokio::spawn(send_owned(client.clone(), keyed_post(address, "k", "{}")));
    while calls.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let duplicate = tokio::spawn(send_owned(client.clone(), keyed_post(address, "k", "{}")));
    tokio::time::sleep(Duration::from_millis(120)).await;
    gate.notify_one();

    assert_eq!(
        first.await.unwrap().status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let duplicate = duplicate.await.unwrap();
    assert_eq!(duplicate.status, StatusCode::CREATED);
    assert_eq!(duplicate.body, "call 1");
    assert!(duplicate.replayed().is_none());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn waiting_duplicate_gives_up_with_409() {
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Notify::new());
    let handler = gated_handler(Arc::clone(&calls), Arc::clone(&gate), StatusCode::CREATED);
    let layer =
        IdempotencyLayer::new(MemoryStore::new()).wait_for_in_flight(Duration::from_millis(100));
    let address = serve(Router::new().route("/charges", post(handler)).layer(layer)).await;
    let client = client();

    let first = tokio::spawn(send_owned(client.clone(), keyed_post(address, "k", "{}")));
    while calls.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let started = std::time::Instant::now();
    let duplicate = send(&client, keyed_post(address, "k", "{}")).await;
    let waited = started.elapsed();
    gate.notify_one();

    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    assert!(duplicate.headers.contains_key("retry-after"));
    assert!(waited >= Duration::from_millis(100), "{waited:?}");
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

async fn send_owned(client: HttpClient, request: Request<Full<Bytes>>) -> Received {
    send(&client, request).await
}

#[test]
#[should_panic(expected = "lock_ttl is 0s")]
fn zero_lock_ttl_is_rejected() {
    let _ = IdempotencyLayer::new(MemoryStore::new()).lock_ttl(Duration::ZERO);
}

#[test]
#[should_panic(expected = "replay_ttl is 0s")]
fn zero_replay_ttl_is_rejected() {
    let _ = IdempotencyLayer::new(MemoryStore::new()).replay_ttl(Duration::ZERO);
}

#[tokio::test]
async fn completion_retried_until_stored() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let store = FlakyCompleteStore {
        failures: 3,
        ..FlakyCompleteStore::default()
    };
    let completes = Arc::clone(&store.completes);
    // Completion is retried every third of the lock TTL: here every 100 ms.
    let layer = IdempotencyLayer::new(store).lock_ttl(Duration::from_millis(300));
    let (app, calls) = counting_app(layer);
    let address = serve(app).await;
    let client = client();

    let first = send(&client, keyed_post(address, "k", "{}")).await;
    assert_eq!(first.status, StatusCode::OK);
    let duplicate = send(&client, keyed_post(address, "k", "{}")).await;
    assert_problem(&duplicate, StatusCode::CONFLICT);

    let mut replay = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let received = send(&client, keyed_post(address, "k", "{}")).await;
        if received.status == StatusCode::OK {
            replay = Some(received);
            break;
        }
        assert_problem(&received, StatusCode::CONFLICT);
    }
    let replay = replay.expect("the response was stored within 5 s");
    assert_eq!(replay.body, first.body);
    assert_eq!(replay.replayed().unwrap(), "true");
    assert_eq!(completes.load(Ordering::SeqCst), 4);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let store_errors: Vec<(String, u64)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == "idempotency_store_errors_total")
        .map(|(key, _, _, value)| {
            let operation = key.key().labels().next().unwrap().value().to_owned();
            let metrics_util::debugging::DebugValue::Counter(count) = value else {
                panic!("not a counter");
            };
            (operation, count)
        })
        .collect();
    assert_eq!(store_errors, [("complete".to_owned(), 3)]);
}
