//! The client stack over `reqwest`: metrics, one idempotency key per order, and retries,
//! against a payment server on 127.0.0.1 that answers `503` twice before it charges.
//!
//! ```text
//! cargo run --example reqwest_client --features reqwest
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use tower::{ServiceBuilder, ServiceExt};
use tower_safe_retry::backoff::Backoff;
use tower_safe_retry::{
    IdempotencyKeyLayer, IdempotencyLayer, MemoryStore, RetryLayer, RetryMetricsLayer, RetryPolicy,
};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    let app = Router::new()
        .route(
            "/charges",
            post(move || async move {
                match counter.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => (StatusCode::SERVICE_UNAVAILABLE, "try again"),
                    _ => (StatusCode::CREATED, "charged"),
                }
            }),
        )
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    // reqwest's own retries (protocol-level refusals only, by default) are turned off so
    // that one layer decides.
    let reqwest_client = reqwest::Client::builder()
        .retry(reqwest::retry::never())
        .build()
        .unwrap();
    let policy = RetryPolicy::builder()
        .backoff(Backoff::exponential(
            Duration::from_millis(50),
            Duration::from_secs(1),
        ))
        .build()
        .unwrap();
    // With reqwest the key layer goes above the retry layer, which then sees the key and
    // may resend the POST.
    let client = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("payments"))
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new(policy))
        .service(reqwest_client.clone());

    let order = reqwest_client
        .post(format!("http://{addr}/charges"))
        .body("order=42")
        .build()
        .unwrap();
    let response = client.oneshot(order).await.unwrap();
    println!(
        "status {} after {} attempts: {}",
        response.status(),
        calls.load(Ordering::SeqCst),
        response.text().await.unwrap()
    );
}
