//! `BodyReplay` against a real HTTP server on 127.0.0.1 that records every attempt's body.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{ScriptServer, Step};
use tower::{Layer, ServiceExt};
use tower_safe_retry::backoff::Backoff;
use tower_safe_retry::body::ReplayBody;
use tower_safe_retry::retry::BodyReplay;
use tower_safe_retry::{RetryLayer, RetryPolicy};

type Chunks = StreamBody<stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A streaming body of `count` chunks of `size` bytes, each chunk filled with its index,
/// and optional trailers.
fn chunked(count: usize, size: usize, trailers: Option<HeaderMap>) -> Chunks {
    let mut frames: Vec<_> = (0..count)
        .map(|index| Ok(Frame::data(Bytes::from(vec![index as u8; size]))))
        .collect();
    if let Some(trailers) = trailers {
        frames.push(Ok(Frame::trailers(trailers)));
    }
    StreamBody::new(stream::iter(frames))
}

fn expected_bytes(count: usize, size: usize) -> Vec<u8> {
    (0..count)
        .flat_map(|index| vec![index as u8; size])
        .collect()
}

fn retry_layer(cap: usize) -> RetryLayer<tower_safe_retry::classify::HttpClassifier, BodyReplay> {
    let policy = RetryPolicy::builder()
        .backoff(Backoff::constant(Duration::ZERO))
        .replay(BodyReplay::new().cap(cap))
        .build()
        .unwrap();
    RetryLayer::new(policy)
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, ReplayBody<Chunks>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn put(url: &str, body: Chunks) -> Request<Chunks> {
    Request::builder()
        .method(Method::PUT)
        .uri(url)
        .body(body)
        .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn stream_is_identical_on_every_attempt() {
    let server = ScriptServer::start().await;
    server.script(
        "/upload",
        [Step::status(503), Step::status(503), Step::status(200)],
    );

    let response = retry_layer(64 * 1024)
        .layer(client())
        .oneshot(put(&server.url("/upload"), chunked(10, 1000, None)))
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let hits = server.hits("/upload");
    assert_eq!(hits.len(), 3);
    let expected = expected_bytes(10, 1000);
    for (attempt, hit) in hits.iter().enumerate() {
        assert_eq!(hit.body.len(), expected.len(), "attempt {attempt}");
        assert_eq!(hit.body, expected, "attempt {attempt}");
        let encoding = hit.headers.get("transfer-encoding");
        assert_eq!(encoding.unwrap(), "chunked", "attempt {attempt}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn trailers_are_replayed() {
    let server = ScriptServer::start().await;
    server.script("/upload", [Step::status(502), Step::status(200)]);
    let mut trailers = HeaderMap::new();
    trailers.insert("checksum", HeaderValue::from_static("abc123"));

    let mut request = put(&server.url("/upload"), chunked(3, 10, Some(trailers)));
    // HTTP/1.1 sends trailers only when the request announces them.
    request
        .headers_mut()
        .insert("trailer", HeaderValue::from_static("checksum"));
    let response = retry_layer(64 * 1024)
        .layer(client())
        .oneshot(request)
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let hits = server.hits("/upload");
    assert_eq!(hits.len(), 2);
    for (attempt, hit) in hits.iter().enumerate() {
        assert_eq!(hit.body, expected_bytes(3, 10), "attempt {attempt}");
        let trailers = hit.trailers.as_ref().expect("trailers arrived");
        assert_eq!(trailers["checksum"], "abc123", "attempt {attempt}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn body_over_cap_is_sent_once() {
    let server = ScriptServer::start().await;
    server.script("/upload", [Step::status(503)]);

    // 1 MiB in 64 chunks of 16 KiB, with a 64 KiB cap.
    let response = retry_layer(64 * 1024)
        .layer(client())
        .oneshot(put(&server.url("/upload"), chunked(64, 16 * 1024, None)))
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let hits = server.hits("/upload");
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].body.len(), 1024 * 1024);
    assert_eq!(hits[0].body, expected_bytes(64, 16 * 1024));
}

#[tokio::test(flavor = "current_thread")]
async fn announced_length_over_cap_is_sent_once() {
    let server = ScriptServer::start().await;
    server.script("/upload", [Step::status(503)]);

    let mut request = put(&server.url("/upload"), chunked(4, 100, None));
    request
        .headers_mut()
        .insert("content-length", HeaderValue::from_static("400"));
    let response = retry_layer(399)
        .layer(client())
        .oneshot(request)
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let hits = server.hits("/upload");
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].body, expected_bytes(4, 100));
}

#[tokio::test(flavor = "current_thread")]
async fn body_at_cap_is_replayed() {
    let server = ScriptServer::start().await;
    server.script("/upload", [Step::status(503), Step::status(200)]);

    let response = retry_layer(400)
        .layer(client())
        .oneshot(put(&server.url("/upload"), chunked(4, 100, None)))
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let hits = server.hits("/upload");
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[1].body, expected_bytes(4, 100));
}

#[tokio::test(flavor = "current_thread")]
async fn body_over_cap_is_counted_as_suppressed() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use tower::ServiceBuilder;
    use tower_safe_retry::RetryMetricsLayer;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let server = ScriptServer::start().await;
    server.script("/upload", [Step::status(503)]);

    let mut request = put(&server.url("/upload"), chunked(4, 100, None));
    request
        .headers_mut()
        .insert("content-length", HeaderValue::from_static("400"));
    ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("upload"))
        .layer(retry_layer(100))
        .service(client())
        .oneshot(request)
        .await
        .unwrap();
    ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("upload"))
        .layer(retry_layer(100))
        .service(client())
        .oneshot(put(&server.url("/upload"), chunked(4, 100, None)))
        .await
        .unwrap();

    let suppressed: Vec<(String, u64)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == "retry_suppressed_total")
        .map(|(key, _, _, value)| {
            let reason = key
                .key()
                .labels()
                .find(|label| label.key() == "reason")
                .map(|label| label.value().to_owned())
                .unwrap();
            let DebugValue::Counter(count) = value else {
                panic!("not a counter")
            };
            (reason, count)
        })
        .collect();
    assert_eq!(suppressed, [("body_too_large".to_owned(), 2)]);
    assert_eq!(server.hits("/upload").len(), 2);
}
