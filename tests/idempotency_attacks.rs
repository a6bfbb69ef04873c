//! Hostile inputs and races against the server-side idempotency layer, on a real axum
//! server on 127.0.0.1 called over HTTP/1.1 by a hyper client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use http::header::{DATE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
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
                // Calls 0 to 4 always fail, later ones fail two times in three.
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

/// Sends the request until it gets a response other than `409`, for at most 3 s.
async fn send_until_not_conflict(client: &HttpClient, address: SocketAddr) -> Received {
    let mut received = send(client, keyed_post(address, "dropped", "{}")).await;
    for _ in 0..300 {
        if received.status != StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        received = send(client, keyed_post(address, "dropped", "{}")).await;
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
