//! The client stack over hyper-util: metrics, one idempotency key per order, a retry
//! budget and retries, against a payment server on 127.0.0.1 whose every third request
//! fails with `503`. Prints the retry report at the end.
//!
//! ```text
//! cargo run --example hyper_client
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_safe_retry::backoff::Backoff;
use tower_safe_retry::budget::RetryBudget;
use tower_safe_retry::{
    IdempotencyKeyLayer, IdempotencyLayer, MemoryStore, RetryLayer, RetryMetricsLayer, RetryPolicy,
    RetryReport,
};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("no other recorder is installed");

    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    let app = Router::new()
        .route(
            "/charges",
            post(move || async move {
                if counter.fetch_add(1, Ordering::SeqCst) % 3 == 2 {
                    (StatusCode::SERVICE_UNAVAILABLE, "try again")
                } else {
                    (StatusCode::CREATED, "charged")
                }
            }),
        )
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let policy = RetryPolicy::builder()
        .backoff(Backoff::exponential(
            Duration::from_millis(10),
            Duration::from_secs(1),
        ))
        .attempt_timeout(Duration::from_secs(2))
        .deadline(Duration::from_secs(10))
        .budget(RetryBudget::new())
        .build()
        .unwrap();
    let hyper_client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("payments"))
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new(policy))
        .service(hyper_client);

    for order in 0..20 {
        let request = Request::post(format!("http://{addr}/charges"))
            .body(Full::new(Bytes::from(format!("order={order}"))))
            .unwrap();
        let response = client.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
    }

    println!(
        "20 orders charged in {} attempts",
        calls.load(Ordering::SeqCst)
    );
    print!("{}", RetryReport::from_snapshot(snapshotter.snapshot()));
}
