//! Hostile inputs and races against the server-side idempotency layer, on a real axum
//! server on 127.0.0.1 called over HTTP/1.1 by a hyper client.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use bytes::Bytes;
use futures_util::stream;
use http::header::{CONTENT_LENGTH, DATE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tower_safe_retry::idempotency::store::{
    Begin, OwnerToken, RecordKey, StoreError, StoredResponse,
};
use tower_safe_retry::idempotency::{Fingerprint, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};
use tower_safe_retry::{IdempotencyLayer, IdempotencyStore, MemoryStore};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A received response with its body collected.
#[derive(Debug)]
struct Received {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Received {
    fn is_replay(&self) -> bool {
        self.headers
            .get(IDEMPOTENT_REPLAYED)
            .is_some_and(|value| value == "true")
    }

    /// Returns the headers without `Idempotent-Replayed` and without `Date`, which hyper
    /// sets on every response it writes.
    fn stable_headers(&self) -> HeaderMap {
        let mut headers = self.headers.clone();
        headers.remove(DATE);
        headers.remove(IDEMPOTENT_REPLAYED);
        headers
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

fn keyed_post(address: SocketAddr, key: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{address}/charges"))
        .header(IDEMPOTENCY_KEY, HeaderValue::from_str(key).unwrap())
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn send(client: &HttpClient, request: Request<Full<Bytes>>) -> Received {
    let response = client.request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Received {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Counts the handlers running at once and keeps the maximum.
#[derive(Default)]
struct Concurrency {
    running: AtomicUsize,
    max: AtomicUsize,
    calls: AtomicUsize,
}

impl Concurrency {
    /// Counts a handler in and returns its call number and a guard that counts it out
    /// when dropped.
    fn enter(self: &Arc<Self>) -> (usize, impl Drop) {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(running, Ordering::SeqCst);
        (call, Exit(Arc::clone(self)))
    }
}

struct Exit(Arc<Concurrency>);

impl Drop for Exit {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Hundreds of concurrent duplicates of one request, whose handler fails with `500` on
/// most calls. A `500` releases the key, so a later duplicate runs the handler again, but
/// never while another run is in flight. Once a run returns `201`, every response that
/// follows is its byte-identical replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn flaky_handler_runs_one_at_a_time() {
    const CLIENTS: usize = 300;
    const ATTEMPTS: usize = 200;
    let concurrency = Arc::new(Concurrency::default());
    let handler = {
        let concurrency = Arc::clone(&concurrency);
        move |body: Bytes| {
            let concurrency = Arc::clone(&concurrency);
            async move {
                let (call, _exit) = concurrency.enter();
                tokio::time::sleep(Duration::from_millis(fastrand::u64(1..5))).await;
                // Calls 0 to 4 always fail, and later calls fail two times in three.
                if call < 5 || fastrand::u8(0..3) != 0 {
                    let headers = [("x-attempt", call.to_string())];
                    return (StatusCode::INTERNAL_SERVER_ERROR, headers, Bytes::new());
                }
                let headers = [("x-charge-id", format!("ch_{call}"))];
                let body = Bytes::from(format!("{{\"charge\":{call},\"bytes\":{}}}", body.len()));
                (StatusCode::CREATED, headers, body)
            }
        }
    };
    let app = Router::new()
        .route("/charges", post(handler))
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    let address = serve(app).await;
    let client = client();

    // The time each client sent a request and what it received, for every attempt.
    let log: Arc<Mutex<Vec<(Instant, Instant, Received)>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let client = client.clone();
        let log = Arc::clone(&log);
        tasks.push(tokio::spawn(async move {
            for _ in 0..ATTEMPTS {
                let sent = Instant::now();
                let received = send(&client, keyed_post(address, "flaky", "{\"amount\":7}")).await;
                let done = Instant::now();
                let status = received.status;
                log.lock().unwrap().push((sent, done, received));
                if status.is_success() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(fastrand::u64(1..10))).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    assert_eq!(concurrency.max.load(Ordering::SeqCst), 1);
    assert!(concurrency.calls.load(Ordering::SeqCst) > 5);

    let log = std::mem::take(&mut *log.lock().unwrap());
    let executed: Vec<_> = log
        .iter()
        .filter(|(_, _, received)| received.status.is_success() && !received.is_replay())
        .collect();
    assert_eq!(executed.len(), 1, "exactly one run returns 2xx");
    let (_, executed_at, first) = executed[0];
    assert_eq!(first.status, StatusCode::CREATED);

    for (sent, _, received) in &log {
        for status in [StatusCode::INTERNAL_SERVER_ERROR, StatusCode::CONFLICT] {
            if received.status == status {
                assert!(!received.is_replay(), "{received:?}");
            }
        }
        if received.status == StatusCode::CONFLICT {
            assert!(received.headers.contains_key(RETRY_AFTER));
        }
        if sent < executed_at {
            continue;
        }
        assert!(received.is_replay(), "{received:?}");
        assert_eq!(received.status, first.status);
        assert_eq!(received.stable_headers(), first.stable_headers());
        assert_eq!(received.body, first.body);
    }
    let replays = log.iter().filter(|(_, _, received)| received.is_replay());
    for (_, _, received) in replays {
        assert_eq!(received.status, first.status);
        assert_eq!(received.stable_headers(), first.stable_headers());
        assert_eq!(received.body, first.body);
    }
    let successes = log.iter().filter(|(_, _, r)| r.status.is_success()).count();
    assert_eq!(
        successes, CLIENTS,
        "every client ends with the stored response"
    );
}

/// A handler that runs longer than the lock TTL keeps its claim, so a duplicate sent
/// while it runs gets `409` and never runs the handler a second time.
#[tokio::test]
async fn slow_handler_keeps_claim() {
    let concurrency = Arc::new(Concurrency::default());
    let handler = {
        let concurrency = Arc::clone(&concurrency);
        move || {
            let concurrency = Arc::clone(&concurrency);
            async move {
                let (call, _exit) = concurrency.enter();
                tokio::time::sleep(Duration::from_millis(1200)).await;
                format!("{{\"charge\":{call}}}")
            }
        }
    };
    let layer = IdempotencyLayer::new(MemoryStore::new()).lock_ttl(Duration::from_millis(200));
    let app = Router::new().route("/charges", post(handler)).layer(layer);
    let address = serve(app).await;
    let client = client();

    let first = tokio::spawn({
        let client = client.clone();
        async move { send(&client, keyed_post(address, "slow", "{}")).await }
    });
    for delay in [500, 400] {
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let duplicate = send(&client, keyed_post(address, "slow", "{}")).await;
        assert_eq!(duplicate.status, StatusCode::CONFLICT, "{duplicate:?}");
    }

    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.is_replay());
    assert_eq!(first.body, "{\"charge\":0}");
    let replay = send(&client, keyed_post(address, "slow", "{}")).await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, "{\"charge\":0}");
    assert_eq!(concurrency.calls.load(Ordering::SeqCst), 1);
    assert_eq!(concurrency.max.load(Ordering::SeqCst), 1);
}

/// The store operation that [`SlowStore`] delays.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slow {
    /// `begin` claims the key at once and returns late, as a remote store whose reply
    /// is slow.
    Begin,
    /// `complete` waits before it stores the response, as a remote store whose request
    /// is slow, so dropping it stores nothing.
    Complete,
}

/// A [`MemoryStore`] whose first `begin` or first `complete` is slow. It notifies
/// `entered` when the wait starts.
#[derive(Clone)]
struct SlowStore {
    inner: MemoryStore,
    slow: Slow,
    waits: Arc<AtomicUsize>,
    entered: Arc<Notify>,
}

impl SlowStore {
    fn new(slow: Slow) -> Self {
        SlowStore {
            inner: MemoryStore::new(),
            slow,
            waits: Arc::default(),
            entered: Arc::default(),
        }
    }

    async fn wait_once(&self, operation: Slow) {
        if operation != self.slow || self.waits.fetch_add(1, Ordering::SeqCst) > 0 {
            return;
        }
        self.entered.notify_one();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

impl IdempotencyStore for SlowStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lock_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        let begin = self.inner.begin(key, fingerprint, owner, lock_ttl).await;
        self.wait_once(Slow::Begin).await;
        begin
    }

    async fn complete(
        &self,
        key: &RecordKey,
        owner: &OwnerToken,
        response: StoredResponse,
        replay_ttl: Duration,
    ) -> Result<(), StoreError> {
        self.wait_once(Slow::Complete).await;
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

/// Sends a keyed request on a connection of its own and closes the connection when the
/// store starts its slow operation, so the server drops the request's future there.
async fn disconnect_in_store(address: SocketAddr, store: &SlowStore) {
    let stream = TcpStream::connect(address).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let request = keyed_post(address, "dropped", "{}");
    let in_flight = tokio::spawn(async move { sender.send_request(request).await });
    store.entered.notified().await;
    in_flight.abort();
    connection.abort();
}

/// Sends the request with key `dropped` until it gets a response other than `409`.
async fn send_until_not_conflict(client: &HttpClient, address: SocketAddr) -> Received {
    send_until_not_conflict_key(client, address, "dropped").await
}

/// Sends the request until it gets a response other than `409`, for about 3 s.
async fn send_until_not_conflict_key(
    client: &HttpClient,
    address: SocketAddr,
    key: &str,
) -> Received {
    let mut received = send(client, keyed_post(address, key, "{}")).await;
    for _ in 0..300 {
        if received.status != StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        received = send(client, keyed_post(address, key, "{}")).await;
    }
    received
}

fn counting_app(store: SlowStore, lock_ttl: Duration) -> (Router, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = Arc::clone(&calls);
        move || {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move { format!("{{\"charge\":{call}}}") }
        }
    };
    let layer = IdempotencyLayer::new(store).lock_ttl(lock_ttl);
    let app = Router::new().route("/charges", post(handler)).layer(layer);
    (app, calls)
}

/// A request dropped while the store records its response still gets it recorded, so a
/// retry gets the replay and the handler does not run again after the lock TTL.
#[tokio::test]
async fn drop_during_complete_keeps_response() {
    let store = SlowStore::new(Slow::Complete);
    let (app, calls) = counting_app(store.clone(), Duration::from_millis(500));
    let address = serve(app).await;

    disconnect_in_store(address, &store).await;
    tokio::time::sleep(Duration::from_millis(800)).await;

    let retry = send_until_not_conflict(&client(), address).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert!(retry.is_replay(), "{retry:?}");
    assert_eq!(retry.body, "{\"charge\":0}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A request dropped while the store returns its claim releases the key, so a retry runs
/// at once and does not get `409` until the lock TTL expires.
#[tokio::test]
async fn drop_during_begin_releases_key() {
    let store = SlowStore::new(Slow::Begin);
    let (app, calls) = counting_app(store.clone(), Duration::from_secs(60));
    let address = serve(app).await;

    disconnect_in_store(address, &store).await;

    let retry = send_until_not_conflict(&client(), address).await;
    assert_eq!(retry.status, StatusCode::OK, "{retry:?}");
    assert!(!retry.is_replay());
    assert_eq!(retry.body, "{\"charge\":0}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Sends a request with raw header bytes, which `HeaderValue::from_str` rejects.
fn post_with_header(address: SocketAddr, name: &'static str, value: &[u8]) -> Request<Full<Bytes>> {
    Request::post(format!("http://{address}/charges"))
        .header(name, HeaderValue::from_bytes(value).unwrap())
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

#[tokio::test]
async fn non_utf8_headers_handled() {
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = Arc::clone(&calls);
        move || {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move { format!("{{\"charge\":{call}}}") }
        }
    };
    let app = Router::new()
        .route("/charges", post(handler))
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    let address = serve(app).await;
    let client = client();

    let key = send(
        &client,
        post_with_header(address, "idempotency-key", b"k\xff"),
    )
    .await;
    assert_eq!(key.status, StatusCode::BAD_REQUEST);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // A non-UTF-8 `Authorization` value is a scope like any other.
    let mut first = post_with_header(address, "authorization", b"Bearer \xe9t\xe9");
    first
        .headers_mut()
        .insert(IDEMPOTENCY_KEY, HeaderValue::from_static("k"));
    let first = send(&client, first).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.is_replay());

    let mut replay = post_with_header(address, "authorization", b"Bearer \xe9t\xe9");
    replay
        .headers_mut()
        .insert(IDEMPOTENCY_KEY, HeaderValue::from_static("k"));
    let replay = send(&client, replay).await;
    assert!(replay.is_replay());
    assert_eq!(replay.body, first.body);

    let mut other = post_with_header(address, "authorization", b"Bearer \xe9t\xe8");
    other
        .headers_mut()
        .insert(IDEMPOTENCY_KEY, HeaderValue::from_static("k"));
    let other = send(&client, other).await;
    assert!(!other.is_replay(), "another caller never gets this replay");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A handler whose response body fails midway ran, so its key is completed without a
/// body: the first caller sees the failure, and a retry gets the status and headers with
/// an empty body instead of running the handler again.
#[tokio::test]
async fn failing_response_body_not_rerun() {
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = Arc::clone(&calls);
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let chunks: [Result<Bytes, io::Error>; 2] = [
                    Ok(Bytes::from_static(b"{\"partial\":")),
                    Err(io::Error::other("database connection lost")),
                ];
                let headers = [("x-charge-id", "ch_1")];
                (
                    StatusCode::CREATED,
                    headers,
                    Body::from_stream(stream::iter(chunks)),
                )
            }
        }
    };
    let app = Router::new()
        .route("/charges", post(handler))
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    let address = serve(app).await;
    let client = client();

    // hyper may fail the request before or after the head arrives, and either way the
    // first caller must not get a truncated body as a complete response.
    match client.request(keyed_post(address, "broken", "{}")).await {
        Err(error) => assert!(!error.is_connect(), "{error:?}"),
        Ok(first) => {
            assert_eq!(first.status(), StatusCode::CREATED);
            assert!(first.headers().get(IDEMPOTENT_REPLAYED).is_none());
            assert!(!first.headers().contains_key(CONTENT_LENGTH));
            let collected = first
                .into_body()
                .collect()
                .await
                .map(|body| body.to_bytes());
            assert!(collected.is_err(), "{collected:?}");
        }
    }

    let retry = send(&client, keyed_post(address, "broken", "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.is_replay());
    assert_eq!(retry.headers["x-charge-id"], "ch_1");
    assert_eq!(retry.headers[CONTENT_LENGTH], "0");
    assert!(retry.body.is_empty());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A response with trailers cannot be stored, so its body reaches the first caller as it
/// streams, and its replay has the status and headers with an empty body.
#[tokio::test]
async fn trailers_sent_then_replay_empty() {
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = Arc::clone(&calls);
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut trailers = HeaderMap::new();
                trailers.insert("x-checksum", HeaderValue::from_static("abc"));
                let frames: [Result<Frame<Bytes>, Infallible>; 2] = [
                    Ok(Frame::data(Bytes::from_static(b"charged"))),
                    Ok(Frame::trailers(trailers)),
                ];
                Body::new(StreamBody::new(stream::iter(frames)))
            }
        }
    };
    let app = Router::new()
        .route("/charges", post(handler))
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    let address = serve(app).await;
    let client = client();

    let first = client
        .request(keyed_post(address, "trailers", "{}"))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let collected = first.into_body().collect().await.unwrap();
    assert_eq!(collected.to_bytes(), "charged");

    let retry = send(&client, keyed_post(address, "trailers", "{}")).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert!(retry.is_replay());
    assert_eq!(retry.headers[CONTENT_LENGTH], "0");
    assert!(retry.body.is_empty());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A request body that fails midway is rejected before the key is claimed, so the next
/// request with the key runs.
#[tokio::test]
async fn failing_request_body_claims_nothing() {
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = Arc::clone(&calls);
        move || {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move { format!("{{\"charge\":{call}}}") }
        }
    };
    let app = Router::new()
        .route("/charges", post(handler))
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    let address = serve(app).await;

    // A chunked body whose stream fails after one chunk, so the client aborts the
    // connection mid-body.
    let chunks: [Result<Frame<Bytes>, io::Error>; 2] = [
        Ok(Frame::data(Bytes::from_static(b"{\"amount\":"))),
        Err(io::Error::other("client disk failed")),
    ];
    let request = Request::post(format!("http://{address}/charges"))
        .header(IDEMPOTENCY_KEY, "cut")
        .body(StreamBody::new(stream::iter(chunks)))
        .unwrap();
    let stream = TcpStream::connect(address).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    assert!(sender.send_request(request).await.is_err());

    let retry = send_until_not_conflict_key(&client(), address, "cut").await;
    assert_eq!(retry.status, StatusCode::OK, "{retry:?}");
    assert!(!retry.is_replay());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
