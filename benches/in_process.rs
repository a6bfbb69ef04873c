//! In-process cost of a retry layer around a service that responds at once.
//!
//! Two groups, each with the same peers: `happy_path` (the first attempt succeeds) and
//! `two_failures` (two `503` responses, then a `200`, with zero delay between attempts).
//! Before timing a case, the binary prints its heap allocations per call, counted by the
//! global allocator below.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::fmt::Debug;
use std::future::ready;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use backon::{ConstantBuilder, Retryable};
use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use tokio::runtime::Runtime;
use tower::retry::Retry as TowerRetry;
use tower::retry::budget::TpsBudget;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_safe_retry::backoff::Backoff;
use tower_safe_retry::budget::RetryBudget;
use tower_safe_retry::{IdempotencyKeyLayer, RetryLayer, RetryMetricsLayer, RetryPolicy};

use common::{Deposit, TowerPolicy, Wait, copy_request, get_request, is_bench_run};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

const URI: &str = "http://127.0.0.1/bench";

/// Counts every allocation, so a case can report how many one call makes.
struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to the system allocator with the caller's arguments, so
// the system allocator's contract carries over unchanged.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn response(status: StatusCode) -> Res {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// Builds a service that returns a ready `200` without allocating.
fn ok_service() -> impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone {
    service_fn(|_request: Req| ready(Ok(response(StatusCode::OK))))
}

/// Builds a service whose calls return `503`, `503`, `200` in turn, and the counter of its
/// calls.
fn flaky_service() -> (
    impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let service = service_fn(move |_request: Req| {
        let call = counter.fetch_add(1, Ordering::Relaxed);
        let status = if call % 3 == 2 {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        ready(Ok(response(status)))
    });
    (service, calls)
}

/// Retries `inner` with backon: a constant zero delay through backon's default tokio
/// sleeper, up to `max_attempts` attempts, each on a fresh copy of the request.
fn backon_service<S>(
    inner: S,
    max_attempts: usize,
) -> impl Service<Req, Response = Res, Error = Infallible> + Clone
where
    S: Service<Req, Response = Res, Error = Infallible> + Clone,
{
    service_fn(move |request: Req| {
        let inner = inner.clone();
        async move {
            let attempt = || {
                let inner = inner.clone();
                let request = copy_request(&request);
                async move {
                    let Ok(response) = inner.oneshot(request).await;
                    // A 5xx response is an error to backon, so that it retries it.
                    if response.status().is_server_error() {
                        Err(Ok(response))
                    } else {
                        Ok(response)
                    }
                }
            };
            let backoff = ConstantBuilder::new()
                .with_delay(Duration::ZERO)
                .with_max_times(max_attempts - 1);
            // The last 5xx response is returned as a response, as the other peers do.
            attempt.retry(backoff).await.or_else(|last| last)
        }
    })
}

fn safe_retry_policy(max_attempts: u32, budget: Option<RetryBudget>) -> RetryPolicy {
    let builder = RetryPolicy::builder()
        .max_attempts(max_attempts)
        .backoff(Backoff::constant(Duration::ZERO));
    let builder = match budget {
        Some(budget) => builder.budget(budget),
        None => builder,
    };
    builder.build().expect("a valid policy")
}

/// Builds the request of one logical call: a `GET`, or a `POST` when `post` is true.
fn request(post: bool) -> Req {
    let mut request = get_request(URI);
    if post {
        *request.method_mut() = Method::POST;
    }
    request
}

async fn call<S>(service: &mut S, request: Req) -> Res
where
    S: Service<Req, Response = Res>,
    S::Error: Debug,
{
    let ready = service.ready().await.expect("the service is ready");
    ready
        .call(request)
        .await
        .expect("the call returns a response")
}

/// Prints the heap allocations of one call of `service`, averaged over many calls after a
/// warm-up, and checks that each call returns `200`.
///
/// Kept out of line so that `valgrind --tool=callgrind` can count the instructions of
/// each case's calls (see BENCHMARKS.md).
#[inline(never)]
fn print_allocations<S>(runtime: &Runtime, name: &str, service: &mut S, post: bool)
where
    S: Service<Req, Response = Res>,
    S::Error: Debug,
{
    let calls: u64 = if is_bench_run() { 1_000 } else { 10 };
    runtime.block_on(async {
        for _ in 0..calls / 10 {
            call(service, request(post)).await;
        }
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..calls {
            let response = call(service, request(post)).await;
            assert_eq!(response.status(), StatusCode::OK, "{name}");
        }
        let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
        println!(
            "allocations per call: {name}: {:.2}",
            allocations as f64 / calls as f64
        );
    });
}

/// One criterion group and the runtime its cases run on.
struct Cases<'a> {
    group: BenchmarkGroup<'a, WallTime>,
    group_name: &'static str,
    runtime: Runtime,
}

impl<'a> Cases<'a> {
    fn new(criterion: &'a mut Criterion, group_name: &'static str) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        Cases {
            group: criterion.benchmark_group(group_name),
            group_name,
            runtime,
        }
    }

    /// Prints the allocations of `service`, then times one call of it.
    fn run<S>(&mut self, name: &str, mut service: S, post: bool)
    where
        S: Service<Req, Response = Res>,
        S::Error: Debug,
    {
        let full_name = format!("{}/{name}", self.group_name);
        print_allocations(&self.runtime, &full_name, &mut service, post);

        let runtime = &self.runtime;
        self.group.bench_function(name, |bencher| {
            bencher.iter_custom(|iterations| {
                runtime.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iterations {
                        black_box(call(&mut service, request(post)).await);
                    }
                    started.elapsed()
                })
            })
        });
    }
}

fn happy_path(criterion: &mut Criterion) {
    let mut cases = Cases::new(criterion, "happy_path");

    cases.run("bare", ok_service(), false);

    let policy = TowerPolicy::new(3, Wait::Ready);
    let service = TowerRetry::new(policy, ok_service());
    cases.run("tower_retry_attempts", service, false);

    let budget = Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2));
    let policy = TowerPolicy::new(3, Wait::Ready).budget(budget, Deposit::OnSuccess);
    let service = TowerRetry::new(policy, ok_service());
    cases.run("tower_retry_tps_budget", service, false);

    let service = backon_service(ok_service(), 3);
    cases.run("backon", service, false);

    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::http()))
        .service(ok_service());
    cases.run("safe_retry_http", service, false);

    let policy = safe_retry_policy(3, Some(RetryBudget::new()));
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(policy))
        .service(ok_service());
    cases.run("safe_retry_budget", service, false);

    let service = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("bench"))
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new(RetryPolicy::http()))
        .service(ok_service());
    cases.run("safe_retry_full_stack", service, false);

    let service = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("bench"))
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new(RetryPolicy::http()))
        .service(ok_service());
    cases.run("safe_retry_full_stack_post", service, true);

    cases.group.finish();
}

/// Calls the flaky service three times without retries: the floor of the
/// `two_failures` group.
fn three_calls<S>(inner: S) -> impl Service<Req, Response = Res, Error = Infallible> + Clone
where
    S: Service<Req, Response = Res, Error = Infallible> + Clone,
{
    service_fn(move |request: Req| {
        let mut inner = inner.clone();
        async move {
            let mut last = None;
            for _ in 0..3 {
                let copy = copy_request(&request);
                last = Some(inner.ready().await?.call(copy).await?);
            }
            Ok(last.expect("three calls were made"))
        }
    })
}

/// Checks that every logical request of the case took three attempts.
fn check_three_attempts(name: &str, calls: &AtomicUsize, logical: usize) {
    let calls = calls.load(Ordering::Relaxed);
    assert_eq!(calls % 3, 0, "{name}: {calls} calls");
    assert!(calls >= 3 * logical, "{name}: {calls} calls");
}

fn two_failures(criterion: &mut Criterion) {
    let mut cases = Cases::new(criterion, "two_failures");

    let (inner, calls) = flaky_service();
    cases.run("three_bare_calls", three_calls(inner), false);
    check_three_attempts("three_bare_calls", &calls, 1);

    let (inner, calls) = flaky_service();
    let service = TowerRetry::new(TowerPolicy::new(3, Wait::Ready), inner);
    cases.run("tower_retry_ready", service, false);
    check_three_attempts("tower_retry_ready", &calls, 1);

    let (inner, calls) = flaky_service();
    let service = TowerRetry::new(TowerPolicy::new(3, Wait::ZeroSleep), inner);
    cases.run("tower_retry_zero_sleep", service, false);
    check_three_attempts("tower_retry_zero_sleep", &calls, 1);

    // Each success deposits two retries, so the budget never suppresses one here.
    let budget = Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 2.0));
    let (inner, calls) = flaky_service();
    let policy = TowerPolicy::new(3, Wait::Ready).budget(budget, Deposit::OnSuccess);
    let service = TowerRetry::new(policy, inner);
    cases.run("tower_retry_tps_budget", service, false);
    check_three_attempts("tower_retry_tps_budget", &calls, 1);

    let (inner, calls) = flaky_service();
    cases.run("backon_zero_delay", backon_service(inner, 3), false);
    check_three_attempts("backon_zero_delay", &calls, 1);

    let (inner, calls) = flaky_service();
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(safe_retry_policy(3, None)))
        .service(inner);
    cases.run("safe_retry_http", service, false);
    check_three_attempts("safe_retry_http", &calls, 1);

    // Each logical request deposits two tokens, so the budget never suppresses a retry.
    let budget = RetryBudget::builder()
        .ratio(2.0)
        .build()
        .expect("a valid budget");
    let (inner, calls) = flaky_service();
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(safe_retry_policy(3, Some(budget))))
        .service(inner);
    cases.run("safe_retry_budget", service, false);
    check_three_attempts("safe_retry_budget", &calls, 1);

    let (inner, calls) = flaky_service();
    let service = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("bench"))
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new(safe_retry_policy(3, None)))
        .service(inner);
    cases.run("safe_retry_full_stack", service, false);
    check_three_attempts("safe_retry_full_stack", &calls, 1);

    cases.group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = happy_path, two_failures
}
criterion_main!(benches);
