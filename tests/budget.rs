//! `RetryBudget` under a retry storm, with tokio's clock paused: 1,000 logical requests
//! per second for 10 s against an upstream that is down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower::{Layer, ServiceExt, service_fn};
use tower_safe_retry::backoff::Backoff;
use tower_safe_retry::budget::RetryBudget;
use tower_safe_retry::{RetryLayer, RetryPolicy};

const REQUESTS_PER_SECOND: u32 = 1000;
const STORM: Duration = Duration::from_secs(10);

/// An upstream that answers 503 while `down` is set and counts every call.
#[derive(Clone, Default)]
struct Upstream {
    down: Arc<AtomicBool>,
    calls: Arc<AtomicU32>,
}

impl Upstream {
    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

fn layer(budget: Option<RetryBudget>) -> RetryLayer {
    let mut policy = RetryPolicy::builder()
        .max_attempts(5)
        .backoff(Backoff::constant(Duration::ZERO));
    if let Some(budget) = budget {
        policy = policy.budget(budget);
    }
    RetryLayer::new(policy.build().unwrap())
}

/// Sends `seconds × 1000` logical requests, one per millisecond, and returns the upstream
/// calls they caused.
async fn send(
    upstream: &Upstream,
    retry: &RetryLayer<
        tower_safe_retry::classify::HttpClassifier,
        tower_safe_retry::retry::HttpReplay,
    >,
    duration: Duration,
) -> u32 {
    let before = upstream.calls();
    let requests = duration.as_millis() as u32 * REQUESTS_PER_SECOND / 1000;
    for _ in 0..requests {
        let upstream_handle = upstream.clone();
        let service = service_fn(move |_: Request<()>| {
            let upstream = upstream_handle.clone();
            async move {
                upstream.calls.fetch_add(1, Ordering::SeqCst);
                let mut response = Response::new(());
                if upstream.down.load(Ordering::SeqCst) {
                    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                }
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        retry
            .layer(service)
            .oneshot(Request::get("/").body(()).unwrap())
            .await
            .unwrap();
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    upstream.calls() - before
}

fn amplification(calls: u32) -> f64 {
    f64::from(calls) / f64::from(REQUESTS_PER_SECOND * STORM.as_secs() as u32)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn storm_without_budget_multiplies_calls() {
    let upstream = Upstream::default();
    upstream.down.store(true, Ordering::SeqCst);

    let calls = send(&upstream, &layer(None), STORM).await;

    assert_eq!(amplification(calls), 5.0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn storm_from_cold_budget_stays_under_limit() {
    let upstream = Upstream::default();
    upstream.down.store(true, Ordering::SeqCst);

    let calls = send(&upstream, &layer(Some(RetryBudget::new())), STORM).await;

    // 10,000 requests, 2,000 retries from deposits and at most 100 from the floor.
    let ratio = amplification(calls);
    assert!(ratio <= 1.25, "{ratio}");
    assert!(ratio >= 1.2, "{ratio}");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn storm_after_healthy_spell_stays_under_limit() {
    let upstream = Upstream::default();
    let retry = layer(Some(RetryBudget::new()));
    let healthy = send(&upstream, &retry, STORM).await;
    assert_eq!(healthy, 10_000);

    upstream.down.store(true, Ordering::SeqCst);
    let calls = send(&upstream, &retry, STORM).await;

    // The healthy spell adds at most the 100-token reserve.
    let ratio = amplification(calls);
    assert!(ratio <= 1.25, "{ratio}");
    assert!(ratio >= 1.2, "{ratio}");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn retries_resume_after_recovery() {
    let upstream = Upstream::default();
    let budget = RetryBudget::builder()
        .min_per_second(0)
        .reserve(100.0)
        .build()
        .unwrap();
    let retry = layer(Some(budget.clone()));
    upstream.down.store(true, Ordering::SeqCst);
    send(&upstream, &retry, STORM).await;
    assert!(budget.balance() < 1.0, "{}", budget.balance());

    // The upstream recovers; healthy traffic refills the balance within the window.
    upstream.down.store(false, Ordering::SeqCst);
    send(&upstream, &retry, Duration::from_millis(50)).await;
    assert!(budget.balance() >= 5.0, "{}", budget.balance());

    upstream.down.store(true, Ordering::SeqCst);
    let calls = send(&upstream, &retry, Duration::from_millis(1)).await;
    assert_eq!(calls, 5);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn spent_budget_is_counted_as_suppressed() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use tower::ServiceBuilder;
    use tower_safe_retry::RetryMetricsLayer;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let budget = RetryBudget::builder()
        .ratio(0.0)
        .min_per_second(2)
        .build()
        .unwrap();
    let upstream = Upstream::default();
    upstream.down.store(true, Ordering::SeqCst);
    let retry = layer(Some(budget));

    let service = service_fn({
        let upstream = upstream.clone();
        move |_: Request<()>| {
            upstream.calls.fetch_add(1, Ordering::SeqCst);
            let mut response = Response::new(());
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            std::future::ready(Ok::<_, std::convert::Infallible>(response))
        }
    });
    ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("storm"))
        .layer(retry)
        .service(service)
        .oneshot(Request::get("/").body(()).unwrap())
        .await
        .unwrap();

    // Two retries from the floor, then the budget declines the third.
    assert_eq!(upstream.calls(), 3);
    let budget_suppressed: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == "retry_suppressed_total")
        .filter(|(key, ..)| key.key().labels().any(|label| label.value() == "budget"))
        .map(|(.., value)| match value {
            DebugValue::Counter(count) => count,
            other => panic!("not a counter: {other:?}"),
        })
        .sum();
    assert_eq!(budget_suppressed, 1);
}
