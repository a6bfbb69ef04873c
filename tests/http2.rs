//! HTTP/2 stream refusals against a real h2 server on 127.0.0.1.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};
use tower_safe_retry::backoff::Backoff;
use tower_safe_retry::{RetryLayer, RetryPolicy};

/// Serves HTTP/2 on an ephemeral port. The first `refusals` streams are reset with
/// `reset`; later ones get `200`. Returns the address and the count of streams.
async fn h2_server(refusals: u32, reset: h2::Reason) -> (std::net::SocketAddr, Arc<AtomicU32>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let streams = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&streams);
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((_request, mut respond))) = connection.accept().await {
                    let stream = counter.fetch_add(1, Ordering::SeqCst);
                    if stream < refusals {
                        respond.send_reset(reset);
                        continue;
                    }
                    let response = Response::builder().status(200).body(()).unwrap();
                    let _ = respond.send_response(response, true);
                }
            });
        }
    });
    (addr, streams)
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

fn post(addr: std::net::SocketAddr) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}/charges"))
        .body(Full::new(Bytes::from_static(b"order=1")))
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
async fn refused_stream_is_retried_for_post() {
    let (addr, streams) = h2_server(2, h2::Reason::REFUSED_STREAM).await;

    let response = retry().layer(client()).oneshot(post(addr)).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(streams.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "current_thread")]
async fn other_stream_reset_is_not_retried_for_post() {
    let (addr, streams) = h2_server(1, h2::Reason::INTERNAL_ERROR).await;

    let error = retry()
        .layer(client())
        .oneshot(post(addr))
        .await
        .unwrap_err();

    let decision = tower_safe_retry::HttpClassifier::new().classify_error(&*error);
    assert_eq!(
        decision,
        tower_safe_retry::classify::Decision::retry(tower_safe_retry::classify::RetryReason::Reset)
    );
    assert_eq!(streams.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn client_alone_does_not_retry_refused_stream() {
    let (addr, streams) = h2_server(1, h2::Reason::REFUSED_STREAM).await;

    let error = client().oneshot(post(addr)).await.unwrap_err();

    let decision = tower_safe_retry::HttpClassifier::new().classify_error(&error);
    assert_eq!(
        decision,
        tower_safe_retry::classify::Decision::retry(
            tower_safe_retry::classify::RetryReason::RefusedStream
        )
    );
    assert_eq!(streams.load(Ordering::SeqCst), 1);
}
