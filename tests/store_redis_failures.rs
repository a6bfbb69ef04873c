//! `RedisStore` when its Redis fails: an outage under `IdempotencyLayer`, and a full
//! server.
//!
//! Each test starts its own `redis-server` on a free 127.0.0.1 port. The outage test
//! kills it while requests flow and starts it again on the same port. The tests need
//! `redis-server` on `PATH`. Without it they print why they are skipped and pass, unless
//! `REQUIRE_BACKENDS=1` is set.
#![cfg(feature = "redis")]

use std::collections::HashSet;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use bytes::Bytes;
use http::header::RETRY_AFTER;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower_safe_retry::idempotency::store::{Begin, OwnerToken, RecordKey, StoredResponse};
use tower_safe_retry::idempotency::{Fingerprint, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};
use tower_safe_retry::{IdempotencyLayer, IdempotencyStore, RedisStore};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A private `redis-server` child process, killed on drop.
struct RedisServer {
    child: Child,
}

impl RedisServer {
    /// Starts `redis-server` on `port` without persistence, with `options` added to its
    /// command line, and waits until it accepts connections.
    fn start(port: u16, options: &[&str]) -> RedisServer {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(options)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start redis-server");
        let server = RedisServer { child };

        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(address).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not accept connections on {address} within 5 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }

    /// Kills the server with SIGKILL and waits for it to exit.
    fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Returns whether `redis-server` can run, or panics when `REQUIRE_BACKENDS=1` and it
/// cannot.
fn redis_server_available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if found {
        return true;
    }
    if std::env::var_os("REQUIRE_BACKENDS").is_some_and(|value| value == "1") {
        panic!("redis-server is not on PATH, but REQUIRE_BACKENDS=1 requires these tests");
    }
    // Written to stderr directly, because the test harness captures `eprintln!`.
    let _ = writeln!(
        std::io::stderr(),
        "skipped: redis-server is not on PATH, so the Redis failure tests did not run"
    );
    false
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The keys whose handler ran, in order.
type Executed = Arc<Mutex<Vec<String>>>;

async fn create_charge(
    State(executed): State<Executed>,
    headers: HeaderMap,
) -> (StatusCode, &'static str) {
    let key = headers[IDEMPOTENCY_KEY].to_str().unwrap().to_owned();
    executed.lock().unwrap().push(key);
    (StatusCode::CREATED, "charged")
}

async fn serve(store: RedisStore, executed: Executed) -> SocketAddr {
    let app = Router::new()
        .route("/charges", post(create_charge))
        .with_state(executed)
        .layer(IdempotencyLayer::new(store));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

/// One response as the client received it.
struct Sent {
    key: String,
    started: Instant,
    elapsed: Duration,
    status: StatusCode,
    retry_after: bool,
    replayed: bool,
}

async fn post_charge(client: &HttpClient, address: SocketAddr, key: &str) -> Sent {
    let request = Request::post(format!("http://{address}/charges"))
        .header(IDEMPOTENCY_KEY, key)
        .body(Full::new(Bytes::from_static(b"order")))
        .unwrap();
    let started = Instant::now();
    let response = client.request(request).await.expect("request failed");
    let status = response.status();
    let retry_after = response.headers().contains_key(RETRY_AFTER);
    let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
    response.into_body().collect().await.unwrap();

    Sent {
        key: key.to_owned(),
        started,
        elapsed: started.elapsed(),
        status,
        retry_after,
        replayed,
    }
}

fn new_key(label: &str) -> String {
    format!("{label}-{}", uuid::Uuid::new_v4().simple())
}

/// Sends keyed POSTs with new keys one after another until `stop` changes.
async fn flow(
    client: HttpClient,
    address: SocketAddr,
    mut stop: watch::Receiver<bool>,
) -> Vec<Sent> {
    let mut sent = Vec::new();
    while !*stop.borrow() {
        sent.push(post_charge(&client, address, &new_key("flow")).await);
        tokio::select! {
            _ = stop.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_fails_closed_then_recovers() {
    if !redis_server_available() {
        return;
    }
    let port = free_port();
    let redis = RedisServer::start(port, &[]);
    let store = RedisStore::connect(&format!("redis://127.0.0.1:{port}"))
        .await
        .expect("failed to connect to the private redis-server");
    let executed = Executed::default();
    let address = serve(store, Arc::clone(&executed)).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    // Before the outage: a key runs once and then replays.
    let first = post_charge(&client, address, "before").await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = post_charge(&client, address, "before").await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(
        again.replayed,
        "the second request with one key was not replayed"
    );

    let (stop, stop_receiver) = watch::channel(false);
    let flowing = tokio::spawn(flow(client.clone(), address, stop_receiver));
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The outage: every request that starts after the kill gets 503 and never runs.
    redis.kill();
    let killed = Instant::now();
    let mut outage = Vec::new();
    for _ in 0..5 {
        outage.push(post_charge(&client, address, &new_key("outage")).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let restarted_redis = RedisServer::start(port, &[]);
    let restarted = Instant::now();

    // Recovery: the connection manager reconnects on a later request, without a restart
    // of the app. A new key runs once and then replays.
    let recovery_key = new_key("recovered");
    let recovered = loop {
        let sent = post_charge(&client, address, &recovery_key).await;
        if sent.status == StatusCode::CREATED {
            break Instant::now();
        }
        assert_eq!(sent.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "no request succeeded within 5 s of the Redis restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let replay = post_charge(&client, address, &recovery_key).await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert!(replay.replayed, "the recovered key was not replayed");
    tokio::time::sleep(Duration::from_millis(100)).await;

    stop.send(true).unwrap();
    let flowed = flowing.await.unwrap();
    let executed: Vec<String> = executed.lock().unwrap().clone();
    drop(restarted_redis);

    for sent in &outage {
        assert_eq!(
            sent.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "key {}",
            sent.key
        );
        assert!(
            sent.retry_after,
            "503 without Retry-After for key {}",
            sent.key
        );
    }
    let runs = executed.iter().filter(|key| **key == recovery_key).count();
    assert_eq!(runs, 1, "runs of the recovered key");
    assert_eq!(
        executed.iter().filter(|key| *key == "before").count(),
        1,
        "runs of key before"
    );

    // Every flowing request got 201 or 503, and the handler ran for exactly the 201s.
    let created: HashSet<&str> = flowed
        .iter()
        .filter(|sent| sent.status == StatusCode::CREATED)
        .map(|sent| sent.key.as_str())
        .collect();
    let flow_runs: HashSet<&str> = executed
        .iter()
        .map(String::as_str)
        .filter(|key| key.starts_with("flow-"))
        .collect();
    assert_eq!(created, flow_runs, "flowing keys whose handler ran");
    for sent in &flowed {
        assert!(
            sent.status == StatusCode::CREATED || sent.status == StatusCode::SERVICE_UNAVAILABLE,
            "status {} for key {}",
            sent.status,
            sent.key
        );
        if sent.status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(
                sent.retry_after,
                "503 without Retry-After for key {}",
                sent.key
            );
        }
    }
    let during: Vec<&Sent> = flowed
        .iter()
        .filter(|sent| sent.started > killed && sent.started + sent.elapsed < restarted)
        .collect();
    assert!(
        during.len() >= 3,
        "only {} flowing requests during the outage",
        during.len()
    );
    for sent in &during {
        assert_eq!(
            sent.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "key {}",
            sent.key
        );
    }
    let after: Vec<&Sent> = flowed
        .iter()
        .filter(|sent| sent.started > recovered)
        .collect();
    assert!(!after.is_empty(), "no flowing requests after the recovery");
    for sent in &after {
        assert_eq!(sent.status, StatusCode::CREATED, "key {}", sent.key);
    }

    let slowest = outage
        .iter()
        .chain(during.iter().copied())
        .map(|sent| sent.elapsed)
        .max();
    let _ = writeln!(
        std::io::stderr(),
        "outage: {} flowing and {} sequential requests got 503, slowest {:?}; \
         first 201 {:?} after the restart",
        during.len(),
        outage.len(),
        slowest.unwrap_or_default(),
        recovered - restarted
    );
}

#[tokio::test]
async fn full_redis_rejects_claims_only() {
    if !redis_server_available() {
        return;
    }
    let port = free_port();
    let _redis = RedisServer::start(
        port,
        &["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"],
    );
    let store = RedisStore::connect(&format!("redis://127.0.0.1:{port}"))
        .await
        .expect("failed to connect to the private redis-server");
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let lock_ttl = Duration::from_secs(60);
    let replay_ttl = Duration::from_secs(60);
    let large = |byte: u8| StoredResponse {
        status: StatusCode::CREATED,
        headers: HeaderMap::new(),
        body: Some(Bytes::from(vec![byte; 64 * 1024])),
    };
    let pending = RecordKey::new("scope", "pending");
    let pending_owner = OwnerToken::generate();
    let begin = store
        .begin(&pending, &fingerprint, &pending_owner, lock_ttl)
        .await;
    assert!(matches!(begin, Ok(Begin::Claimed)), "{begin:?}");

    // Fill the server with completed records until a claim fails.
    let mut completed = Vec::new();
    let error = loop {
        assert!(
            completed.len() < 1000,
            "4 MiB of Redis took 1000 records of 64 KiB"
        );
        let key = RecordKey::new("scope", format!("fill-{}", completed.len()));
        let owner = OwnerToken::generate();
        match store.begin(&key, &fingerprint, &owner, lock_ttl).await {
            Ok(Begin::Claimed) => {}
            Ok(other) => panic!("expected Claimed, got {other:?}"),
            Err(error) => break error,
        }
        store
            .complete(&key, &owner, large(7), replay_ttl)
            .await
            .unwrap();
        completed.push(key);
    };
    assert!(error.is_backend(), "{error}");
    let source = std::error::Error::source(&error)
        .expect("a source")
        .to_string();
    assert!(source.contains("OOM"), "{source}");
    assert!(!completed.is_empty(), "the first claim already failed");

    // A full server still replays, reports in-flight keys and stores a completion,
    // because a completion's first write (HDEL) needs no memory.
    let replay = store
        .begin(
            &completed[0],
            &fingerprint,
            &OwnerToken::generate(),
            lock_ttl,
        )
        .await;
    assert!(matches!(replay, Ok(Begin::Completed(_))), "{replay:?}");
    let in_flight = store
        .begin(&pending, &fingerprint, &OwnerToken::generate(), lock_ttl)
        .await;
    assert!(
        matches!(in_flight, Ok(Begin::InFlight { .. })),
        "{in_flight:?}"
    );
    store
        .complete(&pending, &pending_owner, large(9), replay_ttl)
        .await
        .expect("complete on a full server failed");
    match store
        .begin(&pending, &fingerprint, &OwnerToken::generate(), lock_ttl)
        .await
    {
        Ok(Begin::Completed(stored)) => assert_eq!(stored, large(9)),
        other => panic!("expected Completed, got {other:?}"),
    }
}
