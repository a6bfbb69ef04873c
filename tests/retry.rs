//! `RetryLayer` against a real HTTP server on 127.0.0.1, with tokio's clock paused so
//! that delays are exact.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::{Method, Request, Response, StatusCode};
use support::{ScriptServer, Step, client, request};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_safe_retry::backoff::{Backoff, Jitter};
use tower_safe_retry::retry::{AttemptTimeout, DeadlineExceeded, RetryPolicyBuilder};
use tower_safe_retry::{BoxError, IdempotencyKeyLayer, RetryLayer, RetryPolicy};

fn no_delay() -> RetryPolicyBuilder {
    RetryPolicy::builder().backoff(Backoff::constant(Duration::ZERO))
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn attempts_per_status_and_method() {
    let server = ScriptServer::start().await;
    let retry = RetryLayer::new(no_delay().max_attempts(3).build().unwrap());

    let cases: &[(Method, u16, bool, usize)] = &[
        (Method::GET, 200, false, 1),
        (Method::GET, 204, false, 1),
        (Method::GET, 301, false, 1),
        (Method::GET, 400, false, 1),
        (Method::GET, 404, false, 1),
        (Method::GET, 409, false, 1),
        (Method::GET, 422, false, 1),
        (Method::GET, 408, false, 3),
        (Method::GET, 429, false, 3),
        (Method::GET, 500, false, 3),
        (Method::GET, 502, false, 3),
        (Method::GET, 503, false, 3),
        (Method::GET, 504, false, 3),
        (Method::GET, 501, false, 1),
        (Method::GET, 505, false, 1),
        (Method::GET, 511, false, 1),
        (Method::HEAD, 503, false, 3),
        (Method::OPTIONS, 503, false, 3),
        (Method::PUT, 503, false, 3),
        (Method::DELETE, 500, false, 3),
        (Method::POST, 500, false, 1),
        (Method::POST, 503, false, 1),
        (Method::POST, 408, false, 1),
        (Method::POST, 429, false, 3),
        (Method::POST, 404, false, 1),
        (Method::POST, 503, true, 3),
        (Method::POST, 501, true, 1),
        (Method::PATCH, 502, false, 1),
        (Method::PATCH, 502, true, 3),
    ];

    for (index, (method, status, keyed, expected)) in cases.iter().enumerate() {
        let path = format!("/case/{index}");
        server.script(&path, [Step::status(*status)]);
        let mut request = request(method.clone(), &server.url(&path));
        if *keyed {
            request
                .headers_mut()
                .insert("idempotency-key", "case-key".parse().unwrap());
        }

        let response = retry.layer(client()).oneshot(request).await.unwrap();
        assert_eq!(response.status().as_u16(), *status, "{method} {status}");
        let attempts = server.hits(&path).len();
        assert_eq!(attempts, *expected, "{method} {status} keyed={keyed}");
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn retry_after_delta_seconds_sets_the_delay() {
    let server = ScriptServer::start().await;
    server.script(
        "/busy",
        [
            Step::status(503).header("retry-after", "3"),
            Step::status(200),
        ],
    );
    let policy = RetryPolicy::builder().seed(1).build().unwrap();

    let started = Instant::now();
    let response = RetryLayer::new(policy)
        .layer(client())
        .oneshot(request(Method::GET, &server.url("/busy")))
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    assert_eq!(server.hits("/busy").len(), 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn retry_after_http_date_sets_the_delay() {
    let server = ScriptServer::start().await;
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(5));
    server.script(
        "/limited",
        [
            Step::status(429).header("retry-after", date),
            Step::status(200),
        ],
    );
    let policy = RetryPolicy::builder().seed(1).build().unwrap();

    let started = Instant::now();
    let response = RetryLayer::new(policy)
        .layer(client())
        .oneshot(request(Method::POST, &server.url("/limited")))
        .await
        .unwrap();

    // An HTTP-date has whole seconds, so the wait is the 5 s minus the part of the current
    // second that has passed.
    let elapsed = started.elapsed();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(elapsed > Duration::from_secs(4), "{elapsed:?}");
    assert!(elapsed <= Duration::from_secs(5), "{elapsed:?}");
    assert_eq!(server.hits("/limited").len(), 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn retry_after_beyond_deadline_gives_up_at_once() {
    let server = ScriptServer::start().await;
    server.script("/later", [Step::status(503).header("retry-after", "5")]);
    let policy = RetryPolicy::builder()
        .deadline(Duration::from_secs(2))
        .build()
        .unwrap();

    let started = Instant::now();
    let response = RetryLayer::new(policy)
        .layer(client())
        .oneshot(request(Method::GET, &server.url("/later")))
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(server.hits("/later").len(), 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn retry_after_beyond_maximum_gives_up_at_once() {
    let server = ScriptServer::start().await;
    server.script(
        "/much-later",
        [Step::status(429).header("retry-after", "61")],
    );
    let policy = RetryPolicy::builder()
        .max_retry_after(Duration::from_secs(60))
        .build()
        .unwrap();

    let started = Instant::now();
    let response = RetryLayer::new(policy)
        .layer(client())
        .oneshot(request(Method::GET, &server.url("/much-later")))
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(server.hits("/much-later").len(), 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn attempt_timeout_is_retried() {
    let server = ScriptServer::start().await;
    server.script(
        "/slow",
        [
            Step::status(200).delay(Duration::from_secs(30)),
            Step::status(200),
        ],
    );
    let policy = no_delay()
        .attempt_timeout(Duration::from_secs(1))
        .build()
        .unwrap();

    let started = Instant::now();
    let response = RetryLayer::new(policy)
        .layer(client())
        .oneshot(request(Method::GET, &server.url("/slow")))
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(server.hits("/slow").len(), 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn attempt_timeout_on_last_attempt_is_returned() {
    let server = ScriptServer::start().await;
    server.script("/stuck", [Step::status(200).delay(Duration::from_secs(30))]);
    let policy = no_delay()
        .max_attempts(2)
        .attempt_timeout(Duration::from_secs(1))
        .build()
        .unwrap();

    let started = Instant::now();
    let error = RetryLayer::new(policy)
        .layer(client())
        .oneshot(request(Method::GET, &server.url("/stuck")))
        .await
        .unwrap_err();

    let timeout = error.downcast_ref::<AttemptTimeout>().unwrap();
    assert_eq!(timeout.timeout(), Duration::from_secs(1));
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(server.hits("/stuck").len(), 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn post_timeout_without_key_is_not_retried() {
    let server = ScriptServer::start().await;
    server.script(
        "/charge",
        [Step::status(200).delay(Duration::from_secs(30))],
    );
    let policy = no_delay()
        .attempt_timeout(Duration::from_secs(1))
        .build()
        .unwrap();

    let error = RetryLayer::new(policy)
        .layer(client())
        .oneshot(request(Method::POST, &server.url("/charge")))
        .await
        .unwrap_err();

    assert!(error.is::<AttemptTimeout>(), "{error}");
    assert_eq!(server.hits("/charge").len(), 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn deadline_stops_before_late_sleep() {
    let server = ScriptServer::start().await;
    server.script("/down", [Step::status(503)]);
    let policy = RetryPolicy::builder()
        .max_attempts(10)
        .backoff(Backoff::constant(Duration::from_secs(1)))
        .deadline(Duration::from_millis(2500))
        .build()
        .unwrap();

    let started = Instant::now();
    let response = RetryLayer::new(policy)
        .layer(client())
        .oneshot(request(Method::GET, &server.url("/down")))
        .await
        .unwrap();

    // Attempts at 0 s, 1 s and 2 s; a fourth would start at 3 s, after the deadline.
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(server.hits("/down").len(), 3);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn deadline_shorter_than_backoff_returns() {
    let server = ScriptServer::start().await;
    server.script("/down", [Step::status(502)]);
    let policy = RetryPolicy::builder()
        .backoff(Backoff::constant(Duration::from_secs(10)))
        .deadline(Duration::from_secs(5))
        .build()
        .unwrap();

    let started = Instant::now();
    let response = RetryLayer::new(policy)
        .layer(client())
        .oneshot(request(Method::GET, &server.url("/down")))
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(server.hits("/down").len(), 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn deadline_cancels_an_attempt_in_flight() {
    let server = ScriptServer::start().await;
    server.script("/hang", [Step::status(200).delay(Duration::from_secs(60))]);
    let policy = RetryPolicy::builder()
        .deadline(Duration::from_secs(2))
        .build()
        .unwrap();

    let started = Instant::now();
    let error = RetryLayer::new(policy)
        .layer(client())
        .oneshot(request(Method::GET, &server.url("/hang")))
        .await
        .unwrap_err();

    let exceeded = error.downcast_ref::<DeadlineExceeded>().unwrap();
    assert_eq!(exceeded.deadline(), Duration::from_secs(2));
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(server.hits("/hang").len(), 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn exponential_backoff_delays_are_exact_without_jitter() {
    let server = ScriptServer::start().await;
    server.script("/flaky", [Step::status(500)]);
    let backoff = Backoff::exponential(Duration::from_millis(100), Duration::from_millis(300))
        .jitter(Jitter::None);
    let policy = RetryPolicy::builder()
        .max_attempts(5)
        .backoff(backoff)
        .build()
        .unwrap();

    let started = Instant::now();
    let response = RetryLayer::new(policy)
        .layer(client())
        .oneshot(request(Method::GET, &server.url("/flaky")))
        .await
        .unwrap();

    // 100 ms + 200 ms + 300 ms (capped) + 300 ms.
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(started.elapsed(), Duration::from_millis(900));
    assert_eq!(server.hits("/flaky").len(), 5);
}

#[test]
fn zero_delay_does_not_touch_the_timer() {
    // A runtime without a time driver panics on the first `Sleep`, so this passes only if
    // the retries never create one.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    let flaky = service_fn(move |_: Request<()>| {
        let call = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut response = Response::new(());
            if call < 2 {
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            Ok::<_, support::Never>(response)
        }
    });

    let response = runtime.block_on(
        RetryLayer::new(no_delay().build().unwrap())
            .layer(flaky)
            .oneshot(Request::get("/").body(()).unwrap()),
    );

    assert_eq!(response.unwrap().status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn connect_error_is_retried_even_for_post() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = listener.local_addr().unwrap();
    drop(listener);

    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    let counted = ServiceBuilder::new()
        .map_request(move |request| {
            counter.fetch_add(1, Ordering::SeqCst);
            request
        })
        .service(client());

    let error = RetryLayer::new(no_delay().build().unwrap())
        .layer(counted)
        .oneshot(request(Method::POST, &format!("http://{closed}/charges")))
        .await
        .unwrap_err();

    let connect = error
        .downcast_ref::<hyper_util::client::legacy::Error>()
        .unwrap();
    assert!(connect.is_connect(), "{error}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn reset_after_sending_retried_only_with_key() {
    let server = ScriptServer::start().await;
    server.script("/reset", [Step::Reset]);
    let retry = RetryLayer::new(no_delay().build().unwrap());

    let error = retry
        .layer(client())
        .oneshot(request(Method::POST, &server.url("/reset")))
        .await
        .unwrap_err();
    assert!(
        error
            .downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some()
    );
    assert_eq!(server.hits("/reset").len(), 1);

    let mut keyed = request(Method::POST, &server.url("/reset"));
    keyed
        .headers_mut()
        .insert("idempotency-key", "order-7".parse().unwrap());
    retry.layer(client()).oneshot(keyed).await.unwrap_err();
    assert_eq!(server.hits("/reset").len(), 4);

    retry
        .layer(client())
        .oneshot(request(Method::GET, &server.url("/reset")))
        .await
        .unwrap_err();
    assert_eq!(server.hits("/reset").len(), 7);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn key_is_stable_with_key_layer_above_retry() {
    let server = ScriptServer::start().await;
    let client = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new(no_delay().build().unwrap()))
        .service(client());
    assert_keys_stable(&server, client).await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn key_is_stable_with_key_layer_below_retry() {
    let server = ScriptServer::start().await;
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new(no_delay().build().unwrap()))
        .layer(IdempotencyKeyLayer::new())
        .service(client());
    assert_keys_stable(&server, client).await;
}

/// Sends two logical POSTs that each fail twice with 503, and checks that every attempt
/// of one request carries the same key and the two requests carry different keys.
async fn assert_keys_stable<S>(server: &ScriptServer, client: S)
where
    S: Service<Request<http_body_util::Full<bytes::Bytes>>, Error = BoxError> + Clone,
    S::Response: std::fmt::Debug,
{
    let mut keys = Vec::new();
    for order in ["/orders/1", "/orders/2"] {
        server.script(
            order,
            [Step::status(503), Step::status(503), Step::status(201)],
        );
        client
            .clone()
            .oneshot(request(Method::POST, &server.url(order)))
            .await
            .unwrap();

        let hits = server.hits(order);
        assert_eq!(hits.len(), 3, "{order}");
        let first = hits[0].headers["idempotency-key"].clone();
        for hit in &hits {
            assert_eq!(hit.headers["idempotency-key"], first, "{order}");
            assert_eq!(hit.headers.get_all("idempotency-key").iter().count(), 1);
        }
        keys.push(first);
    }
    assert_eq!(keys[0].len(), 36);
    assert_ne!(keys[0], keys[1]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn caller_key_is_never_replaced() {
    let server = ScriptServer::start().await;
    server.script("/orders", [Step::status(503), Step::status(201)]);
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new(no_delay().build().unwrap()))
        .layer(IdempotencyKeyLayer::new())
        .service(client());

    let mut keyed = request(Method::POST, &server.url("/orders"));
    keyed
        .headers_mut()
        .insert("idempotency-key", "caller-chosen".parse().unwrap());
    let response = client.oneshot(keyed).await.unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    let hits = server.hits("/orders");
    assert_eq!(hits.len(), 2);
    for hit in hits {
        assert_eq!(hit.headers["idempotency-key"], "caller-chosen");
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn dropping_the_future_cancels_the_sleep() {
    let server = ScriptServer::start().await;
    server.script("/down", [Step::status(503)]);
    let policy = RetryPolicy::builder()
        .backoff(Backoff::constant(Duration::from_secs(1)))
        .build()
        .unwrap();

    let future = RetryLayer::new(policy)
        .layer(client())
        .oneshot(request(Method::GET, &server.url("/down")));
    let outcome = tokio::time::timeout(Duration::from_millis(500), future).await;
    assert!(outcome.is_err(), "the request should still be sleeping");

    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(server.hits("/down").len(), 1);
}

/// A service that panics when called without a successful `poll_ready` first.
#[derive(Clone)]
struct StrictReadiness {
    ready: bool,
    calls: Arc<AtomicU32>,
}

impl Service<u32> for StrictReadiness {
    type Response = u32;
    type Error = BoxError;
    type Future = std::future::Ready<Result<u32, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: u32) -> Self::Future {
        assert!(self.ready, "called without poll_ready");
        self.ready = false;
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let outcome = if call < 2 {
            Err("unavailable".into())
        } else {
            Ok(request)
        };
        std::future::ready(outcome)
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn every_attempt_goes_to_a_ready_service() {
    let calls = Arc::new(AtomicU32::new(0));
    let service = StrictReadiness {
        ready: false,
        calls: Arc::clone(&calls),
    };
    let classify = |outcome: Result<&u32, &BoxError>| match outcome {
        Ok(_) => tower_safe_retry::classify::Decision::Success,
        Err(_) => tower_safe_retry::classify::Decision::retry(
            tower_safe_retry::classify::RetryReason::Unknown,
        ),
    };
    let policy = no_delay()
        .classifier(classify)
        .replay(tower_safe_retry::retry::CloneReplay::new())
        .build()
        .unwrap();

    let response = RetryLayer::new(policy)
        .layer(service)
        .oneshot(7)
        .await
        .unwrap();

    assert_eq!(response, 7);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn seeded_jitter_repeats_across_runs() {
    async fn run(seed: u64) -> Duration {
        let attempts = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&attempts);
        let flaky = service_fn(move |_: Request<()>| {
            let call = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut response = Response::new(());
                if call < 4 {
                    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                }
                Ok::<_, support::Never>(response)
            }
        });
        let policy = RetryPolicy::builder()
            .max_attempts(5)
            .seed(seed)
            .build()
            .unwrap();

        let started = Instant::now();
        RetryLayer::new(policy)
            .layer(flaky)
            .oneshot(Request::get("/").body(()).unwrap())
            .await
            .unwrap();
        started.elapsed()
    }

    let first = run(42).await;
    assert_eq!(first, run(42).await);
    assert_ne!(first, run(43).await);
    // Full jitter: at most 100 + 200 + 400 + 800 ms.
    assert!(first <= Duration::from_millis(1500), "{first:?}");
}

#[test]
fn invalid_policies_are_rejected() {
    let cases = [
        (
            RetryPolicy::builder().max_attempts(0).build().unwrap_err(),
            "max_attempts is 0",
        ),
        (
            RetryPolicy::builder()
                .backoff(Backoff::exponential(
                    Duration::from_secs(30),
                    Duration::from_secs(20),
                ))
                .build()
                .unwrap_err(),
            "backoff base 30s is above its cap 20s",
        ),
        (
            RetryPolicy::builder()
                .backoff(Backoff::exponential(Duration::ZERO, Duration::from_secs(1)).factor(0.5))
                .build()
                .unwrap_err(),
            "backoff factor 0.5 is invalid",
        ),
        (
            RetryPolicy::builder()
                .deadline(Duration::ZERO)
                .build()
                .unwrap_err(),
            "deadline is 0s",
        ),
        (
            RetryPolicy::builder()
                .attempt_timeout(Duration::ZERO)
                .build()
                .unwrap_err(),
            "attempt_timeout is 0s",
        ),
    ];
    for (error, expected) in cases {
        let message = error.to_string();
        assert!(message.contains(expected), "{message}");
        assert!(message.starts_with("invalid retry policy: "), "{message}");
    }
}

/// The attempt number and `x-attempt` header of one call.
type Call = (u32, Option<String>);

/// A service that responds with 503 to the first `failures` calls and 200 after, and records
/// every call.
#[derive(Clone)]
struct Recorder {
    failures: u32,
    calls: Arc<std::sync::Mutex<Vec<Call>>>,
}

impl Recorder {
    fn new(failures: u32) -> Self {
        Recorder {
            failures,
            calls: Arc::default(),
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

impl Service<Request<()>> for Recorder {
    type Response = Response<()>;
    type Error = support::Never;
    type Future = std::future::Ready<Result<Response<()>, support::Never>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), support::Never>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<()>) -> Self::Future {
        let attempt = tower_safe_retry::retry::Attempt::of(request.extensions());
        let header = request
            .headers()
            .get("x-attempt")
            .map(|value| value.to_str().unwrap().to_owned());
        let mut calls = self.calls.lock().unwrap();
        calls.push((attempt, header));
        let mut response = Response::new(());
        if calls.len() as u32 <= self.failures {
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        std::future::ready(Ok(response))
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn attempt_number_reaches_inner_service() {
    let recorder = Recorder::new(2);
    let policy = no_delay()
        .attempt_header(http::HeaderName::from_static("x-attempt"))
        .build()
        .unwrap();

    let response = RetryLayer::new(policy)
        .layer(recorder.clone())
        .oneshot(Request::get("/").body(()).unwrap())
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let expected = [
        (1, Some("1".to_owned())),
        (2, Some("2".to_owned())),
        (3, Some("3".to_owned())),
    ];
    assert_eq!(recorder.calls(), expected);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn nested_retry_layer_does_not_retry() {
    let recorder = Recorder::new(u32::MAX);
    let inner = RetryLayer::new(no_delay().max_attempts(3).build().unwrap());
    let outer = RetryLayer::new(no_delay().max_attempts(3).build().unwrap());

    let response = outer
        .layer(inner.layer(recorder.clone()))
        .oneshot(Request::get("/").body(()).unwrap())
        .await
        .unwrap();

    // Three attempts from the outer layer, not nine.
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let attempts: Vec<u32> = recorder.calls().iter().map(|call| call.0).collect();
    assert_eq!(attempts, [1, 2, 3]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn on_retry_sees_each_retry() {
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&events);
    let policy = RetryPolicy::builder()
        .backoff(Backoff::constant(Duration::from_millis(20)))
        .on_retry(move |event| seen.lock().unwrap().push(*event))
        .build()
        .unwrap();

    RetryLayer::new(policy)
        .layer(Recorder::new(2))
        .oneshot(Request::get("/").body(()).unwrap())
        .await
        .unwrap();

    let events = events.lock().unwrap();
    assert_eq!(events.len(), 2);
    for (index, event) in events.iter().enumerate() {
        assert_eq!(event.attempt, index as u32 + 1);
        assert_eq!(
            event.reason,
            tower_safe_retry::classify::RetryReason::ServerError
        );
        assert_eq!(event.delay, Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn per_request_override_changes_attempts() {
    use tower_safe_retry::retry::RetryOverride;

    let retry = RetryLayer::new(no_delay().max_attempts(3).build().unwrap());
    let cases = [
        (Some(RetryOverride::disabled()), 1),
        (Some(RetryOverride::max_attempts(0)), 1),
        (Some(RetryOverride::max_attempts(5)), 5),
        (None, 3),
    ];
    for (setting, expected) in cases {
        let recorder = Recorder::new(u32::MAX);
        let mut request = Request::get("/").body(()).unwrap();
        if let Some(setting) = setting {
            request.extensions_mut().insert(setting);
        }
        retry
            .layer(recorder.clone())
            .oneshot(request)
            .await
            .unwrap();
        assert_eq!(recorder.calls().len(), expected, "{setting:?}");
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn grpc_pushback_sets_the_delay() {
    use tower_safe_retry::classify::GrpcClassifier;
    use tower_safe_retry::retry::HttpReplay;

    let server = ScriptServer::start().await;
    let unavailable = || {
        Step::status(200)
            .header("content-type", "application/grpc")
            .header("grpc-status", "14")
    };
    server.script(
        "/pushback",
        [
            unavailable().header("grpc-retry-pushback-ms", "250"),
            Step::status(200).header("grpc-status", "0"),
        ],
    );
    server.script(
        "/stop",
        [unavailable().header("grpc-retry-pushback-ms", "-1")],
    );
    server.script("/plain", [unavailable()]);
    let policy = RetryPolicy::builder()
        .classifier(GrpcClassifier::new())
        .replay(HttpReplay::new().all_idempotent())
        .backoff(Backoff::constant(Duration::from_millis(10)))
        .build()
        .unwrap();
    let retry = RetryLayer::new(policy);

    let started = Instant::now();
    let response = retry
        .layer(client())
        .oneshot(request(Method::POST, &server.url("/pushback")))
        .await
        .unwrap();
    assert_eq!(response.headers()["grpc-status"], "0");
    assert_eq!(started.elapsed(), Duration::from_millis(250));
    assert_eq!(server.hits("/pushback").len(), 2);

    let response = retry
        .layer(client())
        .oneshot(request(Method::POST, &server.url("/stop")))
        .await
        .unwrap();
    assert_eq!(response.headers()["grpc-status"], "14");
    assert_eq!(server.hits("/stop").len(), 1);

    retry
        .layer(client())
        .oneshot(request(Method::POST, &server.url("/plain")))
        .await
        .unwrap();
    assert_eq!(server.hits("/plain").len(), 3);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn panicking_call_leaves_no_nesting_mark() {
    let panicking = service_fn(
        |_: Request<()>| -> std::future::Ready<Result<Response<()>, support::Never>> {
            panic!("the inner service panics in call")
        },
    );
    let mut retry = RetryLayer::new(no_delay().build().unwrap()).layer(panicking);
    let call = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(retry.call(Request::get("/").body(()).unwrap()));
    }));
    assert!(call.is_err());

    // A retry layer used afterwards on the same thread still retries.
    let recorder = Recorder::new(2);
    let response = RetryLayer::new(no_delay().build().unwrap())
        .layer(recorder.clone())
        .oneshot(Request::get("/").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(recorder.calls().len(), 3);
}

/// A service that responds to its first call with 503 and is never ready again.
#[derive(Clone, Default)]
struct ReadyOnce {
    calls: Arc<AtomicU32>,
}

impl Service<Request<()>> for ReadyOnce {
    type Response = Response<()>;
    type Error = support::Never;
    type Future = std::future::Ready<Result<Response<()>, support::Never>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), support::Never>> {
        if self.calls.load(Ordering::SeqCst) == 0 {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn call(&mut self, _request: Request<()>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        std::future::ready(Ok(response))
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn deadline_while_waiting_for_readiness() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let service = ReadyOnce::default();
    let policy = no_delay().deadline(Duration::from_secs(1)).build().unwrap();

    let started = Instant::now();
    let response = ServiceBuilder::new()
        .layer(tower_safe_retry::RetryMetricsLayer::new("ready"))
        .layer(RetryLayer::new(policy))
        .service(service.clone())
        .oneshot(Request::get("/").body(()).unwrap())
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(service.calls.load(Ordering::SeqCst), 1);
    let deadline_suppressed: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == "retry_suppressed_total")
        .filter(|(key, ..)| key.key().labels().any(|label| label.value() == "deadline"))
        .map(|(.., value)| match value {
            DebugValue::Counter(count) => count,
            other => panic!("not a counter: {other:?}"),
        })
        .sum();
    assert_eq!(deadline_suppressed, 1);
}
