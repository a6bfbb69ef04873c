//! The checkout demo: orders sent to a payment provider that fails in the ways real ones
//! do, three times on the same seed, with no retries, with naive retries and with this
//! crate's client and server stacks.
//!
//! ```text
//! cargo run --release --example checkout -- [--orders N] [--fault-rate F] [--seed S]
//!                                           [--concurrency C] [--replicas R] [--json]
//!                                           [--redis URL]
//! ```
//!
//! With `--replicas R`, the provider runs R replicas behind a round-robin TCP proxy,
//! sharing one idempotency store, as a service behind a load balancer does. With
//! `--redis URL` (build with `--features redis`), that store is a `RedisStore` on the
//! Redis at URL instead of one `MemoryStore`.
//!
//! Everything runs on 127.0.0.1 with ephemeral ports. The provider is an axum service
//! behind `IdempotencyLayer` that keeps a ledger of charges. In front of it, a fault
//! injector picks a fault for each request that reaches it from the seed, the order and
//! how many times that order arrived before, so every run meets the same faults:
//!
//! | fault | what the client sees | was the order charged? |
//! |---|---|---|
//! | `unavailable` | `503` | no |
//! | `rate_limited` | `429` with `Retry-After: 1` | no |
//! | `reset_before` | connection closed before the handler runs | no |
//! | `reset_after` | connection closed after the charge was made and stored | yes |
//! | `slow` | the handler takes longer than the client's per-attempt timeout | yes, later |
//!
//! A double charge is an order the ledger charged more than once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};
use tower_safe_retry::backoff::Backoff;
use tower_safe_retry::{
    BoxError, IdempotencyKeyLayer, IdempotencyLayer, MemoryStore, RetryLayer, RetryMetricsLayer,
    RetryPolicy, RetryReport,
};

/// The per-attempt timeout of every client, and how long a `slow` fault delays the handler.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(200);
const SLOW_HANDLER: Duration = Duration::from_millis(300);

type Checkout = BoxCloneService<Request<Full<Bytes>>, Response<Incoming>, BoxError>;

#[derive(Clone, Debug)]
struct Options {
    orders: u64,
    fault_rate: f64,
    seed: u64,
    concurrency: usize,
    replicas: usize,
    redis: Option<String>,
    json: bool,
}

impl Options {
    fn parse() -> Result<Options, String> {
        let mut options = Options {
            orders: 1000,
            fault_rate: 0.2,
            seed: 7,
            concurrency: 32,
            replicas: 1,
            redis: None,
            json: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--orders" => options.orders = parse_flag(&flag, &value()?)?,
                "--fault-rate" => options.fault_rate = parse_flag(&flag, &value()?)?,
                "--seed" => options.seed = parse_flag(&flag, &value()?)?,
                "--concurrency" => options.concurrency = parse_flag(&flag, &value()?)?,
                "--replicas" => options.replicas = parse_flag(&flag, &value()?)?,
                "--redis" => options.redis = Some(value()?),
                "--json" => options.json = true,
                "--help" | "-h" => return Err(USAGE.to_owned()),
                other => return Err(format!("unknown flag {other}\n{USAGE}")),
            }
        }

        if !(0.0..=1.0).contains(&options.fault_rate) {
            return Err(format!(
                "--fault-rate {} is invalid; use a fraction from 0 to 1",
                options.fault_rate
            ));
        }
        if options.orders == 0 || options.concurrency == 0 || options.replicas == 0 {
            return Err("--orders, --concurrency and --replicas must be at least 1".to_owned());
        }
        if options.redis.is_some() && !cfg!(feature = "redis") {
            return Err(
                "--redis needs the redis feature: cargo run --release --example \
                        checkout --features redis -- --redis URL"
                    .to_owned(),
            );
        }
        Ok(options)
    }
}

const USAGE: &str = "usage: checkout [--orders N (1000)] [--fault-rate F (0.2)] [--seed S (7)] \
                     [--concurrency C (32)] [--replicas R (1)] [--redis URL] [--json]";

fn parse_flag<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{flag} {value:?} is invalid\n{USAGE}"))
}

// ===== the payment provider =====

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Unavailable,
    RateLimited,
    ResetBefore,
    ResetAfter,
    Slow,
}

#[derive(Default)]
struct Provider {
    /// Charges per order.
    ledger: Mutex<HashMap<u64, u32>>,
    /// Requests per order that reached the provider.
    arrivals: Mutex<HashMap<u64, u32>>,
    requests: AtomicU64,
    seed: u64,
    fault_rate: f64,
}

impl Provider {
    /// Picks the fault for the `arrival`-th request of `order`, from the seed alone.
    fn fault(&self, order: u64, arrival: u32) -> Option<Fault> {
        let draw = splitmix64(
            self.seed
                ^ order.wrapping_mul(0xA24B_AED4_963E_E407)
                ^ u64::from(arrival).wrapping_mul(0x9FB2_1C65_1E98_DF25),
        );
        let fraction = (draw >> 11) as f64 / (1u64 << 53) as f64;
        if fraction >= self.fault_rate {
            return None;
        }
        Some(match draw % 5 {
            0 => Fault::Unavailable,
            1 => Fault::RateLimited,
            2 => Fault::ResetBefore,
            3 => Fault::ResetAfter,
            _ => Fault::Slow,
        })
    }

    fn double_charges(&self) -> u64 {
        let ledger = self.ledger.lock().unwrap();
        ledger.values().filter(|charges| **charges > 1).count() as u64
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[derive(serde::Deserialize)]
struct ChargeRequest {
    order: u64,
    amount_cents: u64,
}

/// Charges an order. A `slow` fault delays it before the charge, as a slow database
/// would: a handler dropped during the wait has not charged.
async fn charge(
    State(provider): State<Arc<Provider>>,
    slow: Option<axum::Extension<Fault>>,
    Json(request): Json<ChargeRequest>,
) -> (StatusCode, Json<serde_json::Value>) {
    if slow.is_some() {
        tokio::time::sleep(SLOW_HANDLER).await;
    }
    let charge_id = {
        let mut ledger = provider.ledger.lock().unwrap();
        let charges = ledger.entry(request.order).or_default();
        *charges += 1;
        request.order * 100 + u64::from(*charges)
    };
    let body = serde_json::json!({
        "charge": charge_id,
        "order": request.order,
        "amount_cents": request.amount_cents,
    });
    (StatusCode::CREATED, Json(body))
}

/// Serves `replicas` replicas of the provider, sharing one idempotency store, behind a
/// round-robin proxy, and returns the address clients connect to.
async fn start_provider(provider: Arc<Provider>, options: &Options) -> SocketAddr {
    #[cfg(feature = "redis")]
    if let Some(url) = &options.redis {
        let store = match tower_safe_retry::RedisStore::connect(url).await {
            Ok(store) => store,
            Err(error) => {
                eprintln!("checkout: failed to connect to Redis at {url}: {error}");
                std::process::exit(1);
            }
        };
        // A prefix per run keeps the records of earlier runs out of this one.
        let prefix = format!("checkout-{}", uuid::Uuid::new_v4());
        return start_replicas(provider, store.prefix(prefix), options.replicas).await;
    }
    start_replicas(provider, MemoryStore::new(), options.replicas).await
}

async fn start_replicas<St>(provider: Arc<Provider>, store: St, replicas: usize) -> SocketAddr
where
    St: tower_safe_retry::IdempotencyStore + Clone,
{
    let mut backends = Vec::with_capacity(replicas);
    for _ in 0..replicas {
        backends.push(start_replica(Arc::clone(&provider), store.clone()).await);
    }
    if replicas == 1 {
        return backends[0];
    }
    start_proxy(backends).await
}

/// Forwards each connection to the next replica in turn.
async fn start_proxy(backends: Vec<SocketAddr>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for turn in 0.. {
            let Ok((mut inbound, _)) = listener.accept().await else {
                continue;
            };
            let backend = backends[turn % backends.len()];
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    addr
}

/// Serves one replica on an ephemeral port, with the fault injector in front of it.
async fn start_replica<St>(provider: Arc<Provider>, store: St) -> SocketAddr
where
    St: tower_safe_retry::IdempotencyStore,
{
    let app = Router::new()
        .route("/charges", post(charge))
        .layer(IdempotencyLayer::new(store))
        .with_state(Arc::clone(&provider));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let app = app.clone();
            let provider = Arc::clone(&provider);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    inject_fault(Arc::clone(&provider), app.clone(), request)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Returning an error from a hyper service closes the connection without a response,
/// which is how both reset faults are made.
async fn inject_fault(
    provider: Arc<Provider>,
    app: Router,
    mut request: Request<Incoming>,
) -> Result<Response<axum::body::Body>, BoxError> {
    provider.requests.fetch_add(1, Ordering::Relaxed);
    let order = request
        .headers()
        .get("order-id")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    let arrival = {
        let mut arrivals = provider.arrivals.lock().unwrap();
        let count = arrivals.entry(order).or_default();
        *count += 1;
        *count - 1
    };

    let fault = provider.fault(order, arrival);
    match fault {
        Some(Fault::Unavailable) => return Ok(status_response(StatusCode::SERVICE_UNAVAILABLE)),
        Some(Fault::RateLimited) => {
            let mut response = status_response(StatusCode::TOO_MANY_REQUESTS);
            let retry_after = HeaderValue::from_static("1");
            response.headers_mut().insert("retry-after", retry_after);
            return Ok(response);
        }
        Some(Fault::ResetBefore) => return Err("fault: reset before the handler".into()),
        Some(Fault::Slow) => {
            request.extensions_mut().insert(Fault::Slow);
        }
        Some(Fault::ResetAfter) | None => {}
    }

    let response = app.oneshot(request).await?;
    if fault == Some(Fault::ResetAfter) {
        // Read the whole response, so the idempotency layer has stored it, then drop it.
        let _ = response.into_body().collect().await;
        return Err("fault: reset after the charge".into());
    }
    Ok(response)
}

fn status_response(status: StatusCode) -> Response<axum::body::Body> {
    let mut response = Response::new(axum::body::Body::empty());
    *response.status_mut() = status;
    response
}

// ===== the three checkout clients =====

/// No retries: one attempt with the per-attempt timeout.
fn no_retries(client: HyperClient) -> Checkout {
    let policy = RetryPolicy::builder()
        .max_attempts(1)
        .attempt_timeout(ATTEMPT_TIMEOUT)
        .build()
        .expect("valid policy");
    let service = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("no_retries"))
        .layer(RetryLayer::new(policy))
        .service(client);
    BoxCloneService::new(service)
}

/// Naive retries, as often written by hand: tower's `Retry` resends every error and
/// every `5xx` or `429` up to three times, after a fixed 10 ms, without a key.
fn naive_retries(client: HyperClient) -> Checkout {
    let service = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("naive_retries"))
        .layer(tower::retry::RetryLayer::new(NaivePolicy {
            attempts_left: 2,
        }))
        .layer(tower::timeout::TimeoutLayer::new(ATTEMPT_TIMEOUT))
        .service(client)
        .map_err(BoxError::from);
    BoxCloneService::new(service)
}

/// This crate's client stack.
fn safe_retry(client: HyperClient, seed: u64) -> Checkout {
    let policy = RetryPolicy::builder()
        .max_attempts(6)
        .backoff(Backoff::exponential(
            Duration::from_millis(5),
            Duration::from_millis(100),
        ))
        .attempt_timeout(ATTEMPT_TIMEOUT)
        .deadline(Duration::from_secs(10))
        .max_retry_after(Duration::from_secs(2))
        .seed(seed)
        .build()
        .expect("valid policy");
    let service = ServiceBuilder::new()
        .layer(RetryMetricsLayer::new("safe_retry"))
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new(policy))
        .service(client);
    BoxCloneService::new(service)
}

type HyperClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

#[derive(Clone)]
struct NaivePolicy {
    attempts_left: u32,
}

impl<E> tower::retry::Policy<Request<Full<Bytes>>, Response<Incoming>, E> for NaivePolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _request: &mut Request<Full<Bytes>>,
        result: &mut Result<Response<Incoming>, E>,
    ) -> Option<Self::Future> {
        let failed = match result {
            Ok(response) => {
                response.status().is_server_error()
                    || response.status() == StatusCode::TOO_MANY_REQUESTS
            }
            Err(_) => true,
        };
        if !failed || self.attempts_left == 0 {
            return None;
        }
        self.attempts_left -= 1;
        Some(tokio::time::sleep(Duration::from_millis(10)))
    }

    fn clone_request(&mut self, request: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        let mut copy = Request::new(request.body().clone());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.headers_mut() = request.headers().clone();
        Some(copy)
    }
}

// ===== one run =====

#[derive(Debug, serde::Serialize)]
struct RunResult {
    run: &'static str,
    orders: u64,
    completed: u64,
    double_charges: u64,
    attempts: u64,
    retries: u64,
    p50_ms: f64,
    p99_ms: f64,
    seconds: f64,
}

async fn run(name: &'static str, options: &Options) -> RunResult {
    let provider = Arc::new(Provider {
        seed: options.seed,
        fault_rate: options.fault_rate,
        ..Provider::default()
    });
    let addr = start_provider(Arc::clone(&provider), options).await;
    let client: HyperClient = Client::builder(TokioExecutor::new()).build_http();
    let checkout = match name {
        "no_retries" => no_retries(client),
        "naive_retries" => naive_retries(client),
        _ => safe_retry(client, options.seed),
    };

    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(options.concurrency));
    let mut tasks = Vec::new();
    for order in 0..options.orders {
        let permit = Arc::clone(&permits).acquire_owned().await.unwrap();
        let checkout = checkout.clone();
        tasks.push(tokio::spawn(async move {
            let began = Instant::now();
            let completed = place_order(checkout, addr, order).await;
            drop(permit);
            (completed, began.elapsed())
        }));
    }

    let mut completed = 0;
    let mut latencies = Vec::with_capacity(tasks.len());
    for task in tasks {
        let (ok, latency) = task.await.unwrap();
        completed += u64::from(ok);
        latencies.push(latency);
    }
    latencies.sort();

    let attempts = provider.requests.load(Ordering::Relaxed);
    RunResult {
        run: name,
        orders: options.orders,
        completed,
        double_charges: provider.double_charges(),
        attempts,
        retries: attempts.saturating_sub(options.orders),
        p50_ms: percentile_ms(&latencies, 50),
        p99_ms: percentile_ms(&latencies, 99),
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Sends one order; true when the provider confirmed the charge.
async fn place_order(checkout: Checkout, addr: SocketAddr, order: u64) -> bool {
    let body = format!(r#"{{"order":{order},"amount_cents":1299}}"#);
    let request = Request::post(format!("http://{addr}/charges"))
        .header("content-type", "application/json")
        .header("order-id", order)
        .body(Full::new(Bytes::from(body)))
        .unwrap();

    let Ok(response) = checkout.oneshot(request).await else {
        return false;
    };
    let success = response.status().is_success();
    success && response.into_body().collect().await.is_ok()
}

/// Returns the nearest-rank percentile, in milliseconds.
fn percentile_ms(sorted: &[Duration], percent: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1].as_secs_f64() * 1000.0
}

fn print_table(results: &[RunResult]) {
    println!(
        "{:<14} {:>7} {:>10} {:>15} {:>9} {:>8} {:>9} {:>9}",
        "run", "orders", "completed", "double charges", "attempts", "retries", "p50 ms", "p99 ms"
    );
    for result in results {
        println!(
            "{:<14} {:>7} {:>10} {:>15} {:>9} {:>8} {:>9.1} {:>9.1}",
            result.run,
            result.orders,
            result.completed,
            result.double_charges,
            result.attempts,
            result.retries,
            result.p50_ms,
            result.p99_ms,
        );
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match Options::parse() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };

    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("no other metrics recorder is installed");

    if !options.json {
        println!(
            "checkout: {} orders, fault rate {}, seed {}, concurrency {}, replicas {}, store {}\n",
            options.orders,
            options.fault_rate,
            options.seed,
            options.concurrency,
            options.replicas,
            options.redis.as_deref().unwrap_or("memory"),
        );
    }

    let mut results = Vec::new();
    for name in ["no_retries", "naive_retries", "safe_retry"] {
        let result = run(name, &options).await;
        if options.json {
            println!("{}", serde_json::to_string(&result).unwrap());
        }
        results.push(result);
    }

    if !options.json {
        print_table(&results);
        println!();
        print!("{}", RetryReport::from_snapshot(snapshotter.snapshot()));
    }
    ExitCode::SUCCESS
}
