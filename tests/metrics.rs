//! `RetryMetricsLayer` against a real HTTP server on 127.0.0.1 and against in-process
//! services on a paused clock.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_safe_retry::backoff::Backoff;
use tower_safe_retry::{IdempotencyKeyLayer, RetryLayer, RetryMetricsLayer, RetryPolicy};

/// One metric from a snapshot: name, labels sorted by key, value.
struct Entry {
    name: String,
    labels: Vec<(String, String)>,
    value: DebugValue,
}

/// Every metric recorded up to one snapshot, with lookups by exact label set.
struct Recorded {
    entries: Vec<Entry>,
}

impl Recorded {
    fn take(snapshotter: &Snapshotter) -> Self {
        let entries = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let mut labels: Vec<(String, String)> = key
                    .key()
                    .labels()
                    .map(|label| (label.key().to_owned(), label.value().to_owned()))
                    .collect();
                labels.sort();
                Entry {
                    name: key.key().name().to_owned(),
                    labels,
                    value,
                }
            })
            .collect();
        Recorded { entries }
    }

    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<&DebugValue> {
        let mut expected: Vec<(String, String)> = labels
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        expected.sort();
        self.entries
            .iter()
            .find(|entry| entry.name == name && entry.labels == expected)
            .map(|entry| &entry.value)
    }

    /// Returns the counter's value, or 0 when it was never recorded.
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.find(name, labels) {
            Some(DebugValue::Counter(value)) => *value,
            Some(other) => panic!("{name} {labels:?} is not a counter: {other:?}"),
            None => 0,
        }
    }

    /// Returns the histogram's values in ascending order, or none when it was never recorded.
    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        match self.find(name, labels) {
            Some(DebugValue::Histogram(values)) => {
                let mut values: Vec<f64> = values.iter().map(|value| value.into_inner()).collect();
                values.sort_by(f64::total_cmp);
                values
            }
            Some(other) => panic!("{name} {labels:?} is not a histogram: {other:?}"),
            None => Vec::new(),
        }
    }

    /// Returns the sum of every counter with this name and operation, whatever its other labels.
    fn counter_total(&self, name: &str, operation: &str) -> u64 {
        self.entries
            .iter()
            .filter(|entry| entry.name == name)
            .filter(|entry| {
                entry
                    .labels
                    .iter()
                    .any(|(key, value)| key == "operation" && value == operation)
            })
            .map(|entry| match entry.value {
                DebugValue::Counter(value) => value,
                _ => panic!("{name} is not a counter"),
            })
            .sum()
    }
}

/// Request counts per path, shared by the test server's handlers.
#[derive(Clone, Default)]
struct Hits {
    flaky: Arc<AtomicU32>,
    charge: Arc<AtomicU32>,
    /// The `Idempotency-Key` of each `POST /charge`, `None` when it had none.
    charge_keys: Arc<Mutex<Vec<Option<String>>>>,
}

/// Starts the test server. `GET /flaky` responds with 503 twice, then 200. `GET /ok`
/// responds with 200, `GET /missing` with 404 and `POST /charge` always with 503.
async fn spawn_server(hits: Hits) -> SocketAddr {
    async fn flaky(State(hits): State<Hits>) -> StatusCode {
        match hits.flaky.fetch_add(1, Ordering::SeqCst) {
            0 | 1 => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::OK,
        }
    }
    async fn charge(State(hits): State<Hits>, headers: HeaderMap) -> StatusCode {
        hits.charge.fetch_add(1, Ordering::SeqCst);
        let key = headers
            .get("idempotency-key")
            .map(|key| key.to_str().unwrap().to_owned());
        hits.charge_keys.lock().unwrap().push(key);
        StatusCode::SERVICE_UNAVAILABLE
    }

    let app = Router::new()
        .route("/flaky", get(flaky))
        .route("/ok", get(|| async { StatusCode::OK }))
        .route("/missing", get(|| async { StatusCode::NOT_FOUND }))
        .route("/charge", post(charge))
        .with_state(hits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

fn request(method: Method, address: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("http://{address}{path}"))
        .body(Full::default())
        .unwrap()
}

fn zero_backoff_policy() -> RetryPolicy {
    RetryPolicy::builder()
        .backoff(Backoff::constant(Duration::ZERO))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn records_retries_over_http() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let hits = Hits::default();
    let address = spawn_server(hits.clone()).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let stack = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("api"))
        .layer(RetryLayer::new(zero_backoff_policy()))
        .service(client);

    let cases = [
        (Method::GET, "/flaky", 200),
        (Method::GET, "/ok", 200),
        (Method::GET, "/missing", 404),
        (Method::POST, "/charge", 503),
    ];
    for (method, path, status) in cases {
        let response = stack
            .clone()
            .oneshot(request(method, address, path))
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{path}");
    }
    assert_eq!(hits.flaky.load(Ordering::SeqCst), 3);
    assert_eq!(hits.charge.load(Ordering::SeqCst), 1);
    assert_eq!(*hits.charge_keys.lock().unwrap(), [None]);

    let recorded = Recorded::take(&snapshotter);
    let requests = "retry_requests_total";
    let request_labels = |method, outcome| {
        [
            ("operation", "api"),
            ("method", method),
            ("outcome", outcome),
        ]
    };
    assert_eq!(
        recorded.counter(requests, &request_labels("GET", "success")),
        2
    );
    assert_eq!(
        recorded.counter(requests, &request_labels("GET", "failure")),
        1
    );
    assert_eq!(
        recorded.counter(requests, &request_labels("POST", "failure")),
        1
    );
    assert_eq!(recorded.counter_total(requests, "api"), 4);

    let attempts = "retry_attempts_total";
    let attempt_labels = |outcome, reason| {
        [
            ("operation", "api"),
            ("outcome", outcome),
            ("reason", reason),
        ]
    };
    assert_eq!(
        recorded.counter(attempts, &attempt_labels("retry", "server_error")),
        3
    );
    assert_eq!(
        recorded.counter(attempts, &attempt_labels("success", "none")),
        2
    );
    assert_eq!(
        recorded.counter(attempts, &attempt_labels("fail", "client_error")),
        1
    );
    assert_eq!(recorded.counter_total(attempts, "api"), 6);

    let suppressed = [("operation", "api"), ("reason", "not_idempotent")];
    assert_eq!(recorded.counter("retry_suppressed_total", &suppressed), 1);
    assert_eq!(recorded.counter_total("retry_suppressed_total", "api"), 1);

    let operation = [("operation", "api")];
    assert_eq!(
        recorded.histogram("retry_request_attempts", &operation),
        [1.0, 1.0, 1.0, 3.0]
    );
    assert_eq!(
        recorded
            .histogram("retry_attempt_duration_seconds", &operation)
            .len(),
        6
    );
    let backoff = [("operation", "api"), ("source", "policy")];
    assert_eq!(
        recorded.histogram("retry_backoff_seconds", &backoff),
        [0.0, 0.0]
    );

    let duration = "retry_request_duration_seconds";
    let success = [("operation", "api"), ("outcome", "success")];
    let failure = [("operation", "api"), ("outcome", "failure")];
    assert_eq!(recorded.histogram(duration, &success).len(), 2);
    assert_eq!(recorded.histogram(duration, &failure).len(), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn keyed_post_retried_over_http() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let hits = Hits::default();
    let address = spawn_server(hits.clone()).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let stack = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("payments"))
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new(zero_backoff_policy()))
        .service(client);

    // With an `Idempotency-Key`, the POST may be sent again, up to `max_attempts` (3).
    let response = stack
        .oneshot(request(Method::POST, address, "/charge"))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(hits.charge.load(Ordering::SeqCst), 3);

    let recorded = Recorded::take(&snapshotter);
    let requests = [
        ("operation", "payments"),
        ("method", "POST"),
        ("outcome", "failure"),
    ];
    assert_eq!(recorded.counter("retry_requests_total", &requests), 1);
    let attempts = [
        ("operation", "payments"),
        ("outcome", "retry"),
        ("reason", "server_error"),
    ];
    assert_eq!(recorded.counter("retry_attempts_total", &attempts), 3);
    assert_eq!(
        recorded.counter_total("retry_attempts_total", "payments"),
        3
    );
    let suppressed = [("operation", "payments"), ("reason", "max_attempts")];
    assert_eq!(recorded.counter("retry_suppressed_total", &suppressed), 1);
    let operation = [("operation", "payments")];
    assert_eq!(
        recorded.histogram("retry_request_attempts", &operation),
        [3.0]
    );
    let backoff = [("operation", "payments"), ("source", "policy")];
    assert_eq!(
        recorded.histogram("retry_backoff_seconds", &backoff),
        [0.0, 0.0]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn connect_error_without_retry_layer() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    // A port that was free a moment ago, so the connection is refused.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let stack = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("refused"))
        .service(client);
    let error = stack
        .oneshot(request(Method::GET, address, "/"))
        .await
        .unwrap_err();
    assert!(error.is_connect(), "{error:?}");

    let recorded = Recorded::take(&snapshotter);
    let requests = [
        ("operation", "refused"),
        ("method", "GET"),
        ("outcome", "error"),
    ];
    assert_eq!(recorded.counter("retry_requests_total", &requests), 1);
    let attempts = [
        ("operation", "refused"),
        ("outcome", "retry"),
        ("reason", "connect"),
    ];
    assert_eq!(recorded.counter("retry_attempts_total", &attempts), 1);
    let operation = [("operation", "refused")];
    assert_eq!(
        recorded.histogram("retry_request_attempts", &operation),
        [1.0]
    );
    let duration = [("operation", "refused"), ("outcome", "error")];
    assert_eq!(
        recorded
            .histogram("retry_request_duration_seconds", &duration)
            .len(),
        1
    );
}

/// A service that takes 100 ms per attempt and responds with 503 twice, then 200.
fn slow_flaky_service() -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    let calls = Arc::new(AtomicU32::new(0));
    service_fn(move |_request: Request<Full<Bytes>>| {
        let call = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut response = Response::new(Full::default());
            if call < 2 {
                *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            }
            Ok::<_, Infallible>(response)
        }
    })
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn durations_on_paused_clock() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let policy = RetryPolicy::builder()
        .backoff(Backoff::constant(Duration::from_millis(250)))
        .build()
        .unwrap();
    let stack = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("paused"))
        .layer(RetryLayer::new(policy))
        .service(slow_flaky_service());
    let request = Request::get("http://example.test/")
        .body(Full::default())
        .unwrap();
    let response = stack.oneshot(request).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);

    let recorded = Recorded::take(&snapshotter);
    let success = [("operation", "paused"), ("outcome", "success")];
    // Three attempts of 100 ms and two sleeps of 250 ms.
    assert_eq!(
        recorded.histogram("retry_request_duration_seconds", &success),
        [0.8]
    );
    let backoff = [("operation", "paused"), ("source", "policy")];
    assert_eq!(
        recorded.histogram("retry_backoff_seconds", &backoff),
        [0.25, 0.25]
    );
    let operation = [("operation", "paused")];
    assert_eq!(
        recorded.histogram("retry_attempt_duration_seconds", &operation),
        [0.1, 0.1, 0.1]
    );
    assert_eq!(
        recorded.histogram("retry_request_attempts", &operation),
        [3.0]
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn metrics_layer_alone_records_attempt() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let not_found = service_fn(|_request: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let mut response = Response::new(Full::<Bytes>::default());
        *response.status_mut() = http::StatusCode::NOT_FOUND;
        Ok::<_, Infallible>(response)
    });
    let stack = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("alone"))
        .service(not_found);
    let request = Request::get("http://example.test/")
        .body(Full::default())
        .unwrap();
    let response = stack.oneshot(request).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::NOT_FOUND);

    let recorded = Recorded::take(&snapshotter);
    let requests = [
        ("operation", "alone"),
        ("method", "GET"),
        ("outcome", "failure"),
    ];
    assert_eq!(recorded.counter("retry_requests_total", &requests), 1);
    let attempts = [
        ("operation", "alone"),
        ("outcome", "fail"),
        ("reason", "client_error"),
    ];
    assert_eq!(recorded.counter("retry_attempts_total", &attempts), 1);
    assert_eq!(recorded.counter_total("retry_attempts_total", "alone"), 1);
    let operation = [("operation", "alone")];
    assert_eq!(
        recorded.histogram("retry_request_attempts", &operation),
        [1.0]
    );
    assert_eq!(
        recorded.histogram("retry_attempt_duration_seconds", &operation),
        [0.04]
    );
    let failure = [("operation", "alone"), ("outcome", "failure")];
    assert_eq!(
        recorded.histogram("retry_request_duration_seconds", &failure),
        [0.04]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn metrics_layer_alone_error_reasons() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    // An `io::Error` is classified by its kind. An error type the layer does not recognise
    // is counted with reason `unknown`.
    let refused = service_fn(|_request: Request<()>| async {
        Err::<Response<()>, _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    });
    let stack = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("io"))
        .service(refused);
    stack.oneshot(Request::new(())).await.unwrap_err();

    let opaque = service_fn(|_request: Request<()>| async { Err::<Response<()>, _>("opaque") });
    let stack = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("opaque"))
        .service(opaque);
    stack.oneshot(Request::new(())).await.unwrap_err();

    let recorded = Recorded::take(&snapshotter);
    let connect = [
        ("operation", "io"),
        ("outcome", "retry"),
        ("reason", "connect"),
    ];
    assert_eq!(recorded.counter("retry_attempts_total", &connect), 1);
    let unknown = [
        ("operation", "opaque"),
        ("outcome", "retry"),
        ("reason", "unknown"),
    ];
    assert_eq!(recorded.counter("retry_attempts_total", &unknown), 1);
    let requests = [
        ("operation", "opaque"),
        ("method", "GET"),
        ("outcome", "error"),
    ];
    assert_eq!(recorded.counter("retry_requests_total", &requests), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn method_label_is_bounded() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let ok = service_fn(|_request: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
    let stack = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("methods"))
        .service(ok);
    for method in ["PURGE", "PATCH", "OPTIONS", "X-CUSTOM"] {
        let mut request = Request::new(());
        *request.method_mut() = Method::from_bytes(method.as_bytes()).unwrap();
        stack.clone().oneshot(request).await.unwrap();
    }

    let recorded = Recorded::take(&snapshotter);
    let labels = |method| {
        [
            ("operation", "methods"),
            ("method", method),
            ("outcome", "success"),
        ]
    };
    assert_eq!(
        recorded.counter("retry_requests_total", &labels("other")),
        2
    );
    assert_eq!(
        recorded.counter("retry_requests_total", &labels("PATCH")),
        1
    );
    assert_eq!(
        recorded.counter("retry_requests_total", &labels("OPTIONS")),
        1
    );
    assert_eq!(
        recorded.counter("retry_requests_total", &labels("PURGE")),
        0
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn deadline_cancelled_attempt_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    // The first call responds with 503 at once, the second one would take 10 s.
    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    let slow_retry = service_fn(move |_request: Request<()>| {
        let call = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut response = Response::new(());
            if call == 0 {
                *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            } else {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            Ok::<_, Infallible>(response)
        }
    });
    let policy = RetryPolicy::builder()
        .backoff(Backoff::constant(Duration::ZERO))
        .deadline(Duration::from_secs(1))
        .build()
        .unwrap();
    let stack = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("deadline"))
        .layer(RetryLayer::new(policy))
        .service(slow_retry);
    stack.oneshot(Request::new(())).await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    let recorded = Recorded::take(&snapshotter);
    let operation = [("operation", "deadline")];
    assert_eq!(
        recorded.histogram("retry_request_attempts", &operation),
        [2.0]
    );
    assert_eq!(
        recorded.counter_total("retry_attempts_total", "deadline"),
        2
    );
    assert_eq!(
        recorded.histogram("retry_attempt_duration_seconds", &operation),
        [0.0, 1.0]
    );
    let cancelled = [
        ("operation", "deadline"),
        ("outcome", "fail"),
        ("reason", "timeout"),
    ];
    assert_eq!(recorded.counter("retry_attempts_total", &cancelled), 1);
    let suppressed = [("operation", "deadline"), ("reason", "deadline")];
    assert_eq!(recorded.counter("retry_suppressed_total", &suppressed), 1);
}
