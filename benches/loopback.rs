//! HTTP clients with and without retry middleware, against an axum server on loopback.
//!
//! The binary starts itself a second time as the server (see [`SERVER_VARIABLE`]), which
//! listens on an ephemeral port of 127.0.0.1 and prints the port. The parent process is the
//! client, so its CPU time is the client's alone. Each case sends a fixed number of `GET`
//! requests from a fixed number of concurrent workers on one current-thread runtime, and
//! records wall time, the latency of each request, and the process CPU time
//! (`CLOCK_PROCESS_CPUTIME_ID`) that the requests took. The cases run in turn for several
//! rounds, and the table shows each metric's median over the rounds.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as LegacyClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use reqwest_retry::RetryTransientMiddleware;
use reqwest_retry::policies::ExponentialBackoff;
use tower::retry::Retry as TowerRetry;
use tower::{ServiceBuilder, ServiceExt};
use tower_safe_retry::idempotency::IdempotencyKey;
use tower_safe_retry::metrics::RetryMetrics;
use tower_safe_retry::retry::Retry;
use tower_safe_retry::{IdempotencyKeyLayer, RetryLayer, RetryMetricsLayer, RetryPolicy};

use common::{TowerPolicy, Wait, is_bench_run};

/// The environment variable that makes the binary run as the server.
const SERVER_VARIABLE: &str = "TOWER_SAFE_RETRY_BENCH_SERVER";

type HyperClient = LegacyClient<HttpConnector, Full<Bytes>>;
type FullStack = RetryMetrics<IdempotencyKey<Retry<HyperClient>>>;

/// Request counts of one run.
#[derive(Clone, Copy)]
struct Load {
    requests: usize,
    concurrency: usize,
    warm_up: usize,
    rounds: usize,
}

impl Load {
    fn for_this_run() -> Self {
        if is_bench_run() {
            Load {
                requests: 2_000,
                concurrency: 16,
                warm_up: 200,
                rounds: 7,
            }
        } else {
            Load {
                requests: 40,
                concurrency: 4,
                warm_up: 4,
                rounds: 1,
            }
        }
    }
}

/// The client of one case.
enum Client {
    HyperBare(HyperClient),
    HyperTowerRetry(TowerRetry<TowerPolicy, HyperClient>),
    HyperRetryLayer(Retry<HyperClient>),
    HyperFullStack(FullStack),
    ReqwestBare(reqwest::Client),
    ReqwestRetry(reqwest_middleware::ClientWithMiddleware),
}

impl Client {
    fn name(&self) -> &'static str {
        match self {
            Client::HyperBare(_) => "hyper-util legacy client",
            Client::HyperTowerRetry(_) => "hyper-util + tower Retry",
            Client::HyperRetryLayer(_) => "hyper-util + RetryLayer",
            Client::HyperFullStack(_) => "hyper-util + metrics + key + RetryLayer",
            Client::ReqwestBare(_) => "reqwest",
            Client::ReqwestRetry(_) => "reqwest + reqwest-retry",
        }
    }

    /// Returns the index of this case's bare client in [`Client::all`].
    fn baseline(&self) -> usize {
        match self {
            Client::HyperBare(_)
            | Client::HyperTowerRetry(_)
            | Client::HyperRetryLayer(_)
            | Client::HyperFullStack(_) => 0,
            Client::ReqwestBare(_) | Client::ReqwestRetry(_) => 4,
        }
    }

    fn all() -> Vec<Client> {
        let hyper = LegacyClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let tower_retry = TowerRetry::new(TowerPolicy::new(3, Wait::Ready), hyper.clone());
        let retry_layer = ServiceBuilder::new()
            .layer(RetryLayer::new(RetryPolicy::http()))
            .service(hyper.clone());
        let full_stack = ServiceBuilder::new()
            .layer(RetryMetricsLayer::new("bench"))
            .layer(IdempotencyKeyLayer::new())
            .layer(RetryLayer::new(RetryPolicy::http()))
            .service(hyper.clone());

        let reqwest = reqwest::Client::new();
        let policy = ExponentialBackoff::builder().build_with_max_retries(2);
        let reqwest_retry = reqwest_middleware::ClientBuilder::new(reqwest.clone())
            .with(RetryTransientMiddleware::new_with_policy(policy))
            .build();

        vec![
            Client::HyperBare(hyper),
            Client::HyperTowerRetry(tower_retry),
            Client::HyperRetryLayer(retry_layer),
            Client::HyperFullStack(full_stack),
            Client::ReqwestBare(reqwest),
            Client::ReqwestRetry(reqwest_retry),
        ]
    }

    /// Sends one `GET` and reads the whole body.
    async fn get(&self, uri: &Uri, url: &reqwest::Url) {
        let request = || {
            Request::get(uri.clone())
                .body(Full::new(Bytes::new()))
                .expect("a valid request")
        };
        let (status, body) = match self {
            Client::HyperBare(client) => {
                let response = client.request(request()).await.expect("a response");
                read_hyper(response).await
            }
            Client::HyperTowerRetry(client) => {
                let response = client.clone().oneshot(request()).await.expect("a response");
                read_hyper(response).await
            }
            Client::HyperRetryLayer(client) => {
                let response = client.clone().oneshot(request()).await.expect("a response");
                read_hyper(response).await
            }
            Client::HyperFullStack(client) => {
                let response = client.clone().oneshot(request()).await.expect("a response");
                read_hyper(response).await
            }
            Client::ReqwestBare(client) => {
                let response = client.get(url.clone()).send().await.expect("a response");
                let status = response.status();
                (status, response.bytes().await.expect("a body"))
            }
            Client::ReqwestRetry(client) => {
                let response = client.get(url.clone()).send().await.expect("a response");
                let status = response.status();
                (status, response.bytes().await.expect("a body"))
            }
        };
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"ok");
    }
}

async fn read_hyper(response: http::Response<hyper::body::Incoming>) -> (StatusCode, Bytes) {
    let status = response.status();
    let body = response.into_body().collect().await.expect("a body");
    (status, body.to_bytes())
}

/// The measurements of one case in one round.
#[derive(Clone, Copy, Default)]
struct Sample {
    requests_per_second: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_request: Duration,
}

/// Returns the CPU time that all threads of this process have used.
fn process_cpu_time() -> Duration {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid, writable `timespec` for the duration of the call.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut time) };
    assert_eq!(result, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID) failed");
    Duration::new(time.tv_sec as u64, time.tv_nsec as u32)
}

/// Sends `requests` requests from `concurrency` workers and returns every latency.
async fn send(
    client: &Client,
    uri: &Uri,
    url: &reqwest::Url,
    requests: usize,
    concurrency: usize,
) -> Vec<Duration> {
    let next = AtomicUsize::new(0);
    let workers = (0..concurrency).map(|_| async {
        let mut latencies = Vec::with_capacity(requests / concurrency + 1);
        while next.fetch_add(1, Ordering::Relaxed) < requests {
            let started = Instant::now();
            client.get(uri, url).await;
            latencies.push(started.elapsed());
        }
        latencies
    });
    join_all(workers).await.into_iter().flatten().collect()
}

async fn measure(client: &Client, uri: &Uri, url: &reqwest::Url, load: Load) -> Sample {
    send(client, uri, url, load.warm_up, load.concurrency).await;

    let cpu_before = process_cpu_time();
    let started = Instant::now();
    let mut latencies = send(client, uri, url, load.requests, load.concurrency).await;
    let elapsed = started.elapsed();
    let cpu = process_cpu_time() - cpu_before;

    latencies.sort_unstable();
    let percentile = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    Sample {
        requests_per_second: load.requests as f64 / elapsed.as_secs_f64(),
        p50: percentile(0.50),
        p99: percentile(0.99),
        cpu_per_request: cpu / load.requests as u32,
    }
}

fn median<T: Copy + PartialOrd>(mut values: Vec<T>) -> T {
    values.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    values[values.len() / 2]
}

/// Combines the rounds of one case into the median of each metric.
fn median_sample(samples: &[Sample]) -> Sample {
    Sample {
        requests_per_second: median(samples.iter().map(|s| s.requests_per_second).collect()),
        p50: median(samples.iter().map(|s| s.p50).collect()),
        p99: median(samples.iter().map(|s| s.p99).collect()),
        cpu_per_request: median(samples.iter().map(|s| s.cpu_per_request).collect()),
    }
}

/// Starts this binary as the server and returns the child and its port.
fn start_server() -> (Child, u16) {
    let executable = std::env::current_exe().expect("the path of this binary");
    let mut child = Command::new(executable)
        .env(SERVER_VARIABLE, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("failed to start the server process");
    let stdout = child.stdout.take().expect("the server's stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the server prints its port");
    let port = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("invalid port line from the server: {line:?}"));
    (child, port)
}

/// Serves `GET /` with `ok` on an ephemeral port of 127.0.0.1 until stdin closes.
fn run_server() {
    // The parent closes stdin when it is done, or when it dies, so the server never
    // outlives it.
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        std::process::exit(0);
    });

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("failed to bind 127.0.0.1:0");
        let port = listener.local_addr().expect("a local address").port();
        let mut stdout = std::io::stdout();
        writeln!(stdout, "{port}").expect("failed to print the port");
        stdout.flush().expect("failed to flush stdout");

        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        axum::serve(listener, router)
            .await
            .expect("the server failed");
    });
}

fn ratio(value: f64, baseline: f64) -> f64 {
    value / baseline
}

fn main() {
    if std::env::var_os(SERVER_VARIABLE).is_some() {
        run_server();
        return;
    }

    let load = Load::for_this_run();
    let (mut server, port) = start_server();
    let uri: Uri = format!("http://127.0.0.1:{port}/")
        .parse()
        .expect("a valid URI");
    let url = reqwest::Url::parse(&uri.to_string()).expect("a valid URL");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let clients = runtime.block_on(async { Client::all() });
    let mut samples = vec![Vec::new(); clients.len()];
    runtime.block_on(async {
        for _ in 0..load.rounds {
            for (index, client) in clients.iter().enumerate() {
                samples[index].push(measure(client, &uri, &url, load).await);
            }
        }
    });
    drop(server.stdin.take());
    server.wait().expect("the server exits");

    let results: Vec<Sample> = samples.iter().map(|rounds| median_sample(rounds)).collect();
    println!(
        "loopback: {} GET requests, {} concurrent, median of {} rounds; client CPU is \
         CLOCK_PROCESS_CPUTIME_ID of the client process (the server is a child process)",
        load.requests, load.concurrency, load.rounds
    );
    println!(
        "| {:<40} | {:>9} | {:>8} | {:>8} | {:>9} | {:>6} | {:>6} | {:>6} | {:>6} |",
        "client", "req/s", "p50 µs", "p99 µs", "CPU µs/req", "rps x", "p50 x", "p99 x", "CPU x"
    );
    println!(
        "|{:-<42}|{:->11}|{:->10}|{:->10}|{:->12}|{:->8}|{:->8}|{:->8}|{:->8}|",
        "", ":", ":", ":", ":", ":", ":", ":", ":"
    );
    for (client, result) in clients.iter().zip(&results) {
        let base = results[client.baseline()];
        println!(
            "| {:<40} | {:>9.0} | {:>8.1} | {:>8.1} | {:>10.2} | {:>6.3} | {:>6.3} | {:>6.3} | {:>6.3} |",
            client.name(),
            result.requests_per_second,
            result.p50.as_secs_f64() * 1e6,
            result.p99.as_secs_f64() * 1e6,
            result.cpu_per_request.as_secs_f64() * 1e6,
            ratio(result.requests_per_second, base.requests_per_second),
            ratio(result.p50.as_secs_f64(), base.p50.as_secs_f64()),
            ratio(result.p99.as_secs_f64(), base.p99.as_secs_f64()),
            ratio(
                result.cpu_per_request.as_secs_f64(),
                base.cpu_per_request.as_secs_f64()
            ),
        );
    }

    let full_stack = ratio(
        results[3].cpu_per_request.as_secs_f64(),
        results[0].cpu_per_request.as_secs_f64(),
    );
    let verdict = if full_stack <= 1.03 { "met" } else { "missed" };
    println!(
        "target: full stack client CPU per request within 3% of bare hyper-util: {:+.1}% ({verdict})",
        (full_stack - 1.0) * 100.0
    );
    println!(
        "reqwest + this crate's stack: not measured, the crate does not accept reqwest::Request"
    );
}
