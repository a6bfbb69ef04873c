//! The server-side `IdempotencyLayer` over loopback HTTP, with each store, against the
//! same axum handler without the layer.
//!
//! The servers run on one current-thread runtime in a thread of their own and listen on
//! ephemeral ports of 127.0.0.1. The client is the hyper-util legacy client on a second
//! current-thread runtime in the main thread. Every request is a `POST /charges` with a
//! small JSON body and an `Idempotency-Key`. Each case sends a fixed number of requests
//! from a fixed number of concurrent workers. It records wall time, the latency of each
//! request and the CPU time of the server thread (`CLOCK_THREAD_CPUTIME_ID`). That thread
//! also runs the Redis and PostgreSQL client tasks, but not the Redis or PostgreSQL
//! servers. The cases run in turn for several rounds, and the table shows each metric's
//! median.
//!
//! A second pass counts the store's commands per request: Redis from the difference of
//! `INFO commandstats`, PostgreSQL from the protocol messages that pass through a proxy
//! (see [`postgres_proxy`]).
//!
//! Redis comes from `REDIS_URL` (default `redis://127.0.0.1:6379`) and PostgreSQL from
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`). A backend whose
//! variable is unset and that cannot be reached at the default address is skipped. The
//! Redis records use a key prefix unique to the run and are deleted at the end, and the
//! PostgreSQL table has a name unique to the run and is dropped at the end.

mod common;
mod postgres_proxy;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::future::join_all;
use http::header::CONTENT_TYPE;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as LegacyClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tower_safe_retry::idempotency::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};
use tower_safe_retry::{IdempotencyLayer, MemoryStore, PostgresStore, RedisStore};

use common::is_bench_run;
use postgres_proxy::{MessageCounts, PostgresProxy};

const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The body of every request.
const CHARGE: &[u8] = br#"{"amount":1250,"currency":"eur","customer":"cus_42"}"#;

/// The number of keys that the replay cases cycle through.
const REPLAY_KEYS: usize = 8;

/// How long a completed record stays in a store. It only needs to outlive the run, and it
/// keeps Redis from holding records for a day if the cleanup at the end does not run.
const REPLAY_TTL: Duration = Duration::from_secs(600);

/// The commands that the Lua scripts of `RedisStore` call. Redis counts them in
/// `INFO commandstats` as well, but they run inside the server and cost no round trip.
const SCRIPT_COMMANDS: [&str; 8] = [
    "hget", "hset", "pexpire", "hexists", "pttl", "hmget", "hdel", "del",
];

type HttpClient = LegacyClient<HttpConnector, Full<Bytes>>;

/// Request counts of one run.
#[derive(Clone, Copy)]
struct Load {
    requests: usize,
    concurrency: usize,
    warm_up: usize,
    rounds: usize,
    /// Requests per phase of the command count.
    counted: usize,
}

impl Load {
    fn for_this_run() -> Self {
        if is_bench_run() {
            Load {
                requests: 2_000,
                concurrency: 16,
                warm_up: 200,
                rounds: 7,
                counted: 1_000,
            }
        } else {
            Load {
                requests: 40,
                concurrency: 4,
                warm_up: 4,
                rounds: 1,
                counted: 40,
            }
        }
    }
}

#[derive(Deserialize)]
struct Charge {
    amount: u64,
    currency: String,
}

#[derive(Serialize)]
struct Receipt {
    id: &'static str,
    amount: u64,
    currency: String,
    status: &'static str,
}

async fn create_charge(Json(charge): Json<Charge>) -> Json<Receipt> {
    Json(Receipt {
        id: "ch_1",
        amount: charge.amount,
        currency: charge.currency,
        status: "succeeded",
    })
}

fn charges_router() -> Router {
    Router::new().route("/charges", post(create_charge))
}

/// Returns the CPU time that the calling thread has used.
fn thread_cpu_time() -> Duration {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid, writable `timespec` for the duration of the call.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time) };
    assert_eq!(result, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(time.tv_sec as u64, time.tv_nsec as u32)
}

/// A current-thread runtime in its own thread that runs every server and store task.
struct ServerThread {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    fn start() -> Self {
        let (handle_sender, handle_receiver) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("server".to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                handle_sender
                    .send(runtime.handle().clone())
                    .expect("the main thread waits for the handle");
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .expect("failed to start the server thread");
        let handle = handle_receiver.recv().expect("the server thread's handle");
        ServerThread {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Runs `future` on the server thread and returns its output.
    async fn run<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle
            .spawn(future)
            .await
            .expect("the server task panicked")
    }

    /// Returns the CPU time of the server thread.
    async fn cpu_time(&self) -> Duration {
        self.run(async { thread_cpu_time() }).await
    }

    /// Serves `router` on an ephemeral port of 127.0.0.1 and returns its `/charges` URI.
    async fn serve(&self, router: Router) -> Uri {
        let port = self
            .run(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("failed to bind 127.0.0.1:0");
                let port = listener.local_addr().expect("a local address").port();
                tokio::spawn(async move {
                    axum::serve(listener, router)
                        .await
                        .expect("the server failed");
                });
                port
            })
            .await;
        format!("http://127.0.0.1:{port}/charges")
            .parse()
            .expect("a valid URI")
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether every request of a case has a new key or reuses a completed one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    FirstExecution,
    Replay,
}

/// The keys that requests send: new ones from a counter, or the completed replay keys.
struct Keys {
    run_tag: String,
    next: AtomicUsize,
    replay: Vec<String>,
}

impl Keys {
    fn new(run_tag: &str) -> Self {
        Keys {
            run_tag: run_tag.to_owned(),
            next: AtomicUsize::new(0),
            replay: (0..REPLAY_KEYS)
                .map(|index| format!("{run_tag}-replay-{index}"))
                .collect(),
        }
    }

    fn key(&self, mode: Mode, index: usize) -> String {
        match mode {
            Mode::FirstExecution => {
                let serial = self.next.fetch_add(1, Ordering::Relaxed);
                format!("{}-{serial}", self.run_tag)
            }
            Mode::Replay => self.replay[index % self.replay.len()].clone(),
        }
    }
}

/// One server under test.
struct Target {
    name: &'static str,
    uri: Uri,
    /// Whether the server has the idempotency layer, so that a replay is marked.
    layered: bool,
}

/// Sends one `POST /charges`, reads the whole body and checks whether it was replayed.
async fn post_charge(client: &HttpClient, target: &Target, key: &str, mode: Mode) {
    let request = Request::post(target.uri.clone())
        .header(CONTENT_TYPE, "application/json")
        .header(IDEMPOTENCY_KEY, key)
        .body(Full::new(Bytes::from_static(CHARGE)))
        .expect("a valid request");
    let response = client.request(request).await.expect("a response");
    let status = response.status();
    let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    assert_eq!(
        status,
        StatusCode::OK,
        "{} returned {status} for key {key}: {}",
        target.name,
        String::from_utf8_lossy(&body)
    );
    assert!(body.starts_with(b"{\"id\""), "unexpected body {body:?}");
    let expect_replay = target.layered && mode == Mode::Replay;
    assert_eq!(
        replayed, expect_replay,
        "{}: key {key} replayed = {replayed}",
        target.name
    );
}

/// Sends `requests` requests from `concurrency` workers and returns every latency.
async fn send(
    client: &HttpClient,
    target: &Target,
    keys: &Keys,
    mode: Mode,
    requests: usize,
    concurrency: usize,
) -> Vec<Duration> {
    let next = AtomicUsize::new(0);
    let workers = (0..concurrency).map(|_| async {
        let mut latencies = Vec::with_capacity(requests / concurrency + 1);
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= requests {
                break;
            }
            let key = keys.key(mode, index);
            let started = Instant::now();
            post_charge(client, target, &key, mode).await;
            latencies.push(started.elapsed());
        }
        latencies
    });
    join_all(workers).await.into_iter().flatten().collect()
}

/// Sends each replay key once, so that the replay cases find completed records.
async fn complete_replay_keys(client: &HttpClient, target: &Target, keys: &Keys) {
    for key in &keys.replay {
        post_charge(client, target, key, Mode::FirstExecution).await;
    }
}

/// The measurements of one case in one round.
#[derive(Clone, Copy, Default)]
struct Sample {
    requests_per_second: f64,
    p50: Duration,
    p99: Duration,
    server_cpu_per_request: Duration,
}

struct Case {
    name: String,
    target: usize,
    mode: Mode,
}

async fn measure(
    server: &ServerThread,
    client: &HttpClient,
    target: &Target,
    keys: &Keys,
    mode: Mode,
    load: Load,
) -> Sample {
    send(client, target, keys, mode, load.warm_up, load.concurrency).await;

    let cpu_before = server.cpu_time().await;
    let started = Instant::now();
    let mut latencies = send(client, target, keys, mode, load.requests, load.concurrency).await;
    let elapsed = started.elapsed();
    let cpu = server.cpu_time().await - cpu_before;

    latencies.sort_unstable();
    let percentile = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    Sample {
        requests_per_second: load.requests as f64 / elapsed.as_secs_f64(),
        p50: percentile(0.50),
        p99: percentile(0.99),
        server_cpu_per_request: cpu / load.requests as u32,
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
        server_cpu_per_request: median(samples.iter().map(|s| s.server_cpu_per_request).collect()),
    }
}

/// Reads a backend's URL from `variable`, or the default address when it is unset.
/// Returns the URL and whether it came from the variable.
fn backend_url(variable: &str, default: &str) -> (String, bool) {
    match std::env::var(variable) {
        Ok(url) => (url, true),
        Err(_) => (default.to_owned(), false),
    }
}

/// Returns `Some(value)`, or prints why the backend is skipped and returns `None` when
/// its variable is unset. Panics when the variable is set, because a URL given on
/// purpose that fails is an error and not a missing backend.
fn connected<T, E: std::fmt::Display>(
    backend: &str,
    variable: &str,
    url: &str,
    from_variable: bool,
    result: Result<T, E>,
) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(error) if !from_variable => {
            println!(
                "{backend}: skipped, because {variable} is unset and {url} cannot be reached: \
                 {error}"
            );
            None
        }
        Err(error) => panic!("failed to connect to {backend} at {variable}={url}: {error}"),
    }
}

/// Parses `INFO commandstats` into the `calls` count of each command.
fn command_calls(info: &str) -> BTreeMap<String, u64> {
    let mut calls = BTreeMap::new();
    for line in info.lines() {
        let Some((name, fields)) = line
            .strip_prefix("cmdstat_")
            .and_then(|rest| rest.split_once(':'))
        else {
            continue;
        };
        let count = fields
            .split(',')
            .find_map(|field| field.strip_prefix("calls="))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no calls= field in INFO commandstats line {line:?}"));
        calls.insert(name.to_owned(), count);
    }
    calls
}

async fn redis_command_calls(
    connection: &mut redis::aio::MultiplexedConnection,
) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(connection)
        .await
        .expect("INFO commandstats failed");
    command_calls(&info)
}

/// Commands per request between two `INFO commandstats` snapshots.
struct CommandCount {
    /// Commands sent by clients, without the `INFO` that took the first snapshot.
    round_trips: f64,
    /// Every command per request, also those that the scripts ran inside Redis.
    breakdown: Vec<(String, f64)>,
}

fn command_count(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    requests: usize,
) -> CommandCount {
    let mut round_trips = 0;
    let mut breakdown = Vec::new();
    for (name, &calls) in after {
        // The snapshot before counts its own INFO, and no other command is sent on the
        // measurement connection between the snapshots.
        let mut delta = calls - before.get(name).copied().unwrap_or(0);
        if name == "info" {
            delta -= 1;
        }
        if delta == 0 {
            continue;
        }
        if !SCRIPT_COMMANDS.contains(&name.as_str()) {
            round_trips += delta;
        }
        breakdown.push((name.clone(), delta as f64 / requests as f64));
    }
    CommandCount {
        round_trips: round_trips as f64 / requests as f64,
        breakdown,
    }
}

fn format_breakdown(breakdown: &[(String, f64)]) -> String {
    let parts: Vec<String> = breakdown
        .iter()
        .map(|(name, per_request)| format!("{name} {per_request:.3}"))
        .collect();
    parts.join(", ")
}

/// Deletes every Redis key under `prefix`.
async fn delete_redis_records(connection: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let pattern = format!("{prefix}:*");
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, names): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(connection)
            .await
            .expect("SCAN failed");
        if !names.is_empty() {
            let removed: usize = redis::cmd("DEL")
                .arg(&names)
                .query_async(connection)
                .await
                .expect("DEL failed");
            deleted += removed;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    println!("redis: deleted {deleted} records under the prefix {prefix}");
}

/// Formats `error` with each of its sources, which hold the cause of a store error.
fn error_chain(error: impl std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// A unique suffix for keys, the Redis prefix and the PostgreSQL table of this run.
fn run_tag() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos();
    format!("{}_{}", std::process::id(), nanos % 1_000_000_000_000)
}

fn ratio(value: f64, baseline: f64) -> f64 {
    value / baseline
}

/// The ratios of one case to the bare handler, each the median over the rounds of the
/// ratio within a round. The bare handler runs right before the other cases of its
/// round, so a change of load between rounds cancels out.
struct Ratios {
    requests_per_second: f64,
    p50: f64,
    p99: f64,
    server_cpu_per_request: f64,
}

fn round_ratios(rounds: &[Sample], bare: &[Sample]) -> Ratios {
    let median_ratio = |metric: fn(&Sample) -> f64| {
        median(
            rounds
                .iter()
                .zip(bare)
                .map(|(sample, base)| ratio(metric(sample), metric(base)))
                .collect(),
        )
    };
    Ratios {
        requests_per_second: median_ratio(|s| s.requests_per_second),
        p50: median_ratio(|s| s.p50.as_secs_f64()),
        p99: median_ratio(|s| s.p99.as_secs_f64()),
        server_cpu_per_request: median_ratio(|s| s.server_cpu_per_request.as_secs_f64()),
    }
}

fn print_table(cases: &[Case], samples: &[Vec<Sample>], load: Load) {
    println!(
        "idempotency: {} POST requests per case, {} concurrent, median of {} rounds; server \
         CPU is CLOCK_THREAD_CPUTIME_ID of the server thread (with the store's client tasks); \
         ratios are medians of the ratio to the bare handler within each round",
        load.requests, load.concurrency, load.rounds
    );
    println!(
        "| {:<28} | {:>8} | {:>8} | {:>8} | {:>10} | {:>6} | {:>6} | {:>6} | {:>6} |",
        "case", "req/s", "p50 µs", "p99 µs", "CPU µs/req", "rps x", "p50 x", "p99 x", "CPU x"
    );
    println!(
        "|{:-<30}|{:->10}|{:->10}|{:->10}|{:->12}|{:->8}|{:->8}|{:->8}|{:->8}|",
        "", ":", ":", ":", ":", ":", ":", ":", ":"
    );
    let bare = &samples[0];
    for (case, rounds) in cases.iter().zip(samples) {
        let result = median_sample(rounds);
        let ratios = round_ratios(rounds, bare);
        println!(
            "| {:<28} | {:>8.0} | {:>8.1} | {:>8.1} | {:>10.2} | {:>6.3} | {:>6.3} | {:>6.3} | {:>6.3} |",
            case.name,
            result.requests_per_second,
            result.p50.as_secs_f64() * 1e6,
            result.p99.as_secs_f64() * 1e6,
            result.server_cpu_per_request.as_secs_f64() * 1e6,
            ratios.requests_per_second,
            ratios.p50,
            ratios.p99,
            ratios.server_cpu_per_request,
        );
    }
    for (case, rounds) in cases.iter().zip(samples) {
        if !case.name.starts_with("memory") {
            continue;
        }
        let change = round_ratios(rounds, bare).requests_per_second - 1.0;
        let verdict = if change >= -0.10 { "met" } else { "missed" };
        println!(
            "target: {} within 10% of the bare handler's req/s: {:+.1}% ({verdict})",
            case.name,
            change * 100.0
        );
    }
}

/// Counts Redis commands per request over `load.counted` first executions and as many
/// replays, and prints them with the targets.
async fn count_redis_commands(
    client: &HttpClient,
    target: &Target,
    keys: &Keys,
    redis_url: &str,
    load: Load,
) {
    let measurement = redis::Client::open(redis_url).expect("a valid Redis URL");
    let mut connection = measurement
        .get_multiplexed_async_connection()
        .await
        .expect("a measurement connection to Redis");

    let before = redis_command_calls(&mut connection).await;
    send(
        client,
        target,
        keys,
        Mode::FirstExecution,
        load.counted,
        load.concurrency,
    )
    .await;
    let middle = redis_command_calls(&mut connection).await;
    send(
        client,
        target,
        keys,
        Mode::Replay,
        load.counted,
        load.concurrency,
    )
    .await;
    let after = redis_command_calls(&mut connection).await;

    let targets = [
        ("first execution", &before, &middle, 2.0),
        ("replay", &middle, &after, 1.0),
    ];
    for (phase, start, end, target_round_trips) in targets {
        let count = command_count(start, end, load.counted);
        let verdict = if count.round_trips <= target_round_trips {
            "met"
        } else {
            "missed"
        };
        println!(
            "redis {phase}: {:.3} commands sent per request over {} requests, target at most \
             {target_round_trips} ({verdict}); INFO commandstats per request: {}",
            count.round_trips,
            load.counted,
            format_breakdown(&count.breakdown)
        );
    }
}

/// Prints the PostgreSQL messages per request of one phase.
fn print_postgres_counts(phase: &str, counts: MessageCounts, requests: usize) {
    let per_request = |count: u64| count as f64 / requests as f64;
    println!(
        "postgres {phase}: per request over {requests} requests: {:.3} statements executed \
         (Execute), {:.3} round trips (Sync), {:.3} prepares (Parse), {:.3} simple queries",
        per_request(counts.executes),
        per_request(counts.syncs),
        per_request(counts.parses),
        per_request(counts.simple_queries),
    );
}

/// Returns `config` with the proxy on 127.0.0.1:`port` as its only host.
/// `Config::host` adds a host to the list rather than replacing it, so this copies the
/// other settings into a new config.
fn proxied_config(config: &tokio_postgres::Config, port: u16) -> tokio_postgres::Config {
    let mut proxied = tokio_postgres::Config::new();
    proxied
        .host("127.0.0.1")
        .port(port)
        .ssl_mode(config.get_ssl_mode());
    if let Some(user) = config.get_user() {
        proxied.user(user);
    }
    if let Some(password) = config.get_password() {
        proxied.password(password);
    }
    if let Some(dbname) = config.get_dbname() {
        proxied.dbname(dbname);
    }
    if let Some(options) = config.get_options() {
        proxied.options(options);
    }
    if let Some(application_name) = config.get_application_name() {
        proxied.application_name(application_name);
    }
    proxied
}

/// Counts PostgreSQL statements per request through a proxy, over `load.counted` first
/// executions and as many replays on a server of its own.
async fn count_postgres_statements(
    server: &ServerThread,
    client: &HttpClient,
    keys: &Keys,
    database_url: &str,
    table: &str,
    load: Load,
) {
    let config: tokio_postgres::Config = database_url.parse().expect("a valid DATABASE_URL");
    let proxy = server
        .run(PostgresProxy::start(config.clone()))
        .await
        .expect("failed to start the PostgreSQL proxy");

    let proxied = proxied_config(&config, proxy.port());
    let manager = deadpool_postgres::Manager::from_config(
        proxied,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    let pool = deadpool_postgres::Pool::builder(manager)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .expect("a PostgreSQL pool");
    let store = PostgresStore::from_pool(pool).table(table);
    let router = charges_router().layer(IdempotencyLayer::new(store).replay_ttl(REPLAY_TTL));
    let target = Target {
        name: "postgres (proxied)",
        uri: server.serve(router).await,
        layered: true,
    };

    let before = proxy.counts();
    send(
        client,
        &target,
        keys,
        Mode::FirstExecution,
        load.counted,
        load.concurrency,
    )
    .await;
    let middle = proxy.counts();
    send(
        client,
        &target,
        keys,
        Mode::Replay,
        load.counted,
        load.concurrency,
    )
    .await;
    let after = proxy.counts();

    print_postgres_counts("first execution", middle - before, load.counted);
    print_postgres_counts("replay", after - middle, load.counted);
}

async fn drop_table(database_url: &str, table: &str) {
    let (database, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .expect("a connection to drop the table");
    let connection = tokio::spawn(connection);
    database
        .batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
        .await
        .expect("failed to drop the table");
    drop(database);
    let _ = connection.await;
    println!("postgres: dropped the table {table}");
}

/// Returns the first argument that is not a flag, such as `memory` in
/// `cargo bench --bench idempotency -- memory`: only the stores whose name contains it
/// run, next to the bare handler.
fn store_filter() -> Option<String> {
    std::env::args()
        .skip(1)
        .find(|argument| !argument.starts_with('-'))
}

/// Returns whether the store called `name` runs in this invocation.
fn selected(filter: &Option<String>, name: &str) -> bool {
    filter
        .as_ref()
        .is_none_or(|filter| name.contains(filter.as_str()))
}

fn main() {
    let load = Load::for_this_run();
    let filter = store_filter();
    let tag = run_tag();
    let keys = Keys::new(&tag);
    let redis_prefix = format!("tsr-idembench-{tag}");
    let table = format!("tsr_idembench_{tag}");
    let (redis_url, redis_from_variable) = backend_url("REDIS_URL", DEFAULT_REDIS_URL);
    let (database_url, database_from_variable) = backend_url("DATABASE_URL", DEFAULT_DATABASE_URL);

    let server = ServerThread::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");

    runtime.block_on(async {
        let redis_store = if !selected(&filter, "redis") {
            None
        } else {
            let url = redis_url.clone();
            let prefix = redis_prefix.clone();
            let result = server
                .run(async move {
                    let store = RedisStore::connect(&url).await.map_err(error_chain)?;
                    Ok::<_, String>(store.prefix(prefix))
                })
                .await;
            connected(
                "redis",
                "REDIS_URL",
                &redis_url,
                redis_from_variable,
                result,
            )
        };
        let postgres_store = if !selected(&filter, "postgres") {
            None
        } else {
            let url = database_url.clone();
            let table = table.clone();
            let result = server
                .run(async move {
                    let store = PostgresStore::connect(&url)
                        .await
                        .map_err(error_chain)?
                        .table(&table);
                    store.migrate().await.map_err(error_chain)?;
                    Ok::<_, String>(store)
                })
                .await;
            connected(
                "postgres",
                "DATABASE_URL",
                &database_url,
                database_from_variable,
                result,
            )
        };

        let mut targets =
            vec![
                Target {
                    name: "bare handler",
                    uri: server.serve(charges_router()).await,
                    layered: false,
                },
                Target {
                    name: "memory",
                    uri: server
                        .serve(charges_router().layer(
                            IdempotencyLayer::new(MemoryStore::new()).replay_ttl(REPLAY_TTL),
                        ))
                        .await,
                    layered: true,
                },
            ];
        let redis_target = redis_store.is_some().then_some(targets.len());
        if let Some(store) = redis_store {
            let layer = IdempotencyLayer::new(store).replay_ttl(REPLAY_TTL);
            targets.push(Target {
                name: "redis",
                uri: server.serve(charges_router().layer(layer)).await,
                layered: true,
            });
        }
        let postgres_target = postgres_store.is_some().then_some(targets.len());
        if let Some(store) = postgres_store {
            let layer = IdempotencyLayer::new(store).replay_ttl(REPLAY_TTL);
            targets.push(Target {
                name: "postgres",
                uri: server.serve(charges_router().layer(layer)).await,
                layered: true,
            });
        }

        let client = LegacyClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut cases = vec![Case {
            name: "bare handler".to_owned(),
            target: 0,
            mode: Mode::FirstExecution,
        }];
        for (index, target) in targets.iter().enumerate().skip(1) {
            complete_replay_keys(&client, target, &keys).await;
            cases.push(Case {
                name: format!("{}, first execution", target.name),
                target: index,
                mode: Mode::FirstExecution,
            });
            cases.push(Case {
                name: format!("{}, replay", target.name),
                target: index,
                mode: Mode::Replay,
            });
        }

        let mut samples = vec![Vec::new(); cases.len()];
        for _ in 0..load.rounds {
            for (index, case) in cases.iter().enumerate() {
                let target = &targets[case.target];
                let sample = measure(&server, &client, target, &keys, case.mode, load).await;
                samples[index].push(sample);
            }
        }
        print_table(&cases, &samples, load);

        if let Some(index) = redis_target {
            count_redis_commands(&client, &targets[index], &keys, &redis_url, load).await;
            let measurement = redis::Client::open(redis_url.as_str()).expect("a valid Redis URL");
            let mut connection = measurement
                .get_multiplexed_async_connection()
                .await
                .expect("a connection to Redis for the cleanup");
            delete_redis_records(&mut connection, &redis_prefix).await;
        }
        if postgres_target.is_some() {
            count_postgres_statements(&server, &client, &keys, &database_url, &table, load).await;
            drop_table(&database_url, &table).await;
        }
    });
    drop(server);
}
