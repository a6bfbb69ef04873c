//! The retry, key and metrics layers over `reqwest::Client`, against a real HTTP server on
//! 127.0.0.1.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use support::{ScriptServer, Step};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_safe_retry::backoff::Backoff;
use tower_safe_retry::{IdempotencyKeyLayer, RetryLayer, RetryMetricsLayer, RetryPolicy};

fn reqwest_client() -> reqwest::Client {
    reqwest::Client::builder()
        .retry(reqwest::retry::never())
        .build()
        .unwrap()
}

fn retry() -> RetryLayer {
    let policy = RetryPolicy::builder()
        .backoff(Backoff::constant(Duration::ZERO))
        .build()
        .unwrap();
    RetryLayer::new(policy)
}

#[tokio::test(flavor = "current_thread")]
async fn get_is_retried() {
    let server = ScriptServer::start().await;
    server.script(
        "/items",
        [Step::status(503), Step::status(502), Step::status(200)],
    );
    let client = reqwest_client();

    let request = client.get(server.url("/items")).build().unwrap();
    let response = ServiceBuilder::new()
        .layer(retry())
        .service(client)
        .oneshot(request)
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(server.hits("/items").len(), 3);
}

#[tokio::test(flavor = "current_thread")]
async fn post_needs_a_key() {
    let server = ScriptServer::start().await;
    server.script("/charges", [Step::status(503), Step::status(201)]);
    let client = reqwest_client();

    let request = client
        .post(server.url("/charges"))
        .body("a")
        .build()
        .unwrap();
    let response = ServiceBuilder::new()
        .layer(retry())
        .service(client.clone())
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(server.hits("/charges").len(), 1);

    server.script("/keyed", [Step::status(503), Step::status(201)]);
    let request = client.post(server.url("/keyed")).body("a").build().unwrap();
    let response = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(retry())
        .service(client)
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let hits = server.hits("/keyed");
    assert_eq!(hits.len(), 2);
    let key = &hits[0].headers["idempotency-key"];
    assert_eq!(key.len(), 36);
    assert_eq!(&hits[1].headers["idempotency-key"], key);
    assert_eq!(hits[0].body, "a");
    assert_eq!(hits[1].body, "a");
}

#[tokio::test(flavor = "current_thread")]
async fn connect_error_is_retried_for_post() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = listener.local_addr().unwrap();
    drop(listener);
    let client = reqwest_client();
    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);

    let request = client
        .post(format!("http://{closed}/charges"))
        .body("a")
        .build()
        .unwrap();
    let error = ServiceBuilder::new()
        .layer(retry())
        .map_request(move |request| {
            counter.fetch_add(1, Ordering::SeqCst);
            request
        })
        .service(client)
        .oneshot(request)
        .await
        .unwrap_err();

    let error = error.downcast_ref::<reqwest::Error>().unwrap();
    assert!(error.is_connect(), "{error}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn retry_after_from_reqwest_response() {
    let server = ScriptServer::start().await;
    server.script(
        "/limited",
        [
            Step::status(429).header("retry-after", "2"),
            Step::status(200),
        ],
    );
    let client = reqwest_client();
    let policy = RetryPolicy::builder().seed(3).build().unwrap();

    let started = Instant::now();
    let request = client.get(server.url("/limited")).build().unwrap();
    let response = ServiceBuilder::new()
        .layer(RetryLayer::new(policy))
        .service(client)
        .oneshot(request)
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(started.elapsed(), Duration::from_secs(2));
}

#[tokio::test(flavor = "current_thread")]
async fn metrics_see_each_attempt() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let server = ScriptServer::start().await;
    server.script("/items", [Step::status(503), Step::status(200)]);
    let client = reqwest_client();

    let request = client.get(server.url("/items")).build().unwrap();
    ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("items"))
        .layer(retry())
        .service(client)
        .oneshot(request)
        .await
        .unwrap();

    let attempts: Vec<f64> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == "retry_request_attempts")
        .flat_map(|(.., value)| match value {
            DebugValue::Histogram(values) => values.into_iter().map(|v| v.into_inner()).collect(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(attempts, [2.0]);
}
