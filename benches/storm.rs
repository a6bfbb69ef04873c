//! Retry storm: how many upstream calls each logical request costs while the upstream
//! is fully down.
//!
//! Each case sends 1,000 logical `GET` requests per second for 10 s against an upstream
//! that returns `503` to every call, with `max_attempts` 5 and no delay between attempts.
//! Time is tokio's paused clock, moved 1 ms after each request with
//! `tokio::time::advance`, so a run takes well under a second of real time. A cold run
//! starts with a new budget. A warm run first sends 10,000 requests at the same rate while
//! the upstream is healthy.

mod common;

use std::convert::Infallible;
use std::future::ready;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::retry::Retry as TowerRetry;
use tower::retry::budget::TpsBudget;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_safe_retry::backoff::Backoff;
use tower_safe_retry::budget::RetryBudget;
use tower_safe_retry::{BoxError, RetryLayer, RetryPolicy};

use common::{Deposit, TowerPolicy, Wait, get_request};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

const MAX_ATTEMPTS: u32 = 5;
const REQUESTS_PER_SECOND: u64 = 1_000;
const STORM_SECONDS: u64 = 10;
const WARM_UP_REQUESTS: u64 = 10_000;
/// The maximum upstream calls per logical request that the budget target allows.
const TARGET_AMPLIFICATION: f64 = 1.25;

/// The upstream: a switch between healthy (`200`) and down (`503`), and a call counter.
#[derive(Clone, Default)]
struct Upstream {
    down: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
}

impl Upstream {
    fn service(&self) -> impl Service<Req, Response = Res, Error = Infallible> + Clone {
        let upstream = self.clone();
        service_fn(move |_request: Req| {
            upstream.calls.fetch_add(1, Ordering::Relaxed);
            let mut response = Response::new(Full::new(Bytes::new()));
            if upstream.down.load(Ordering::Relaxed) {
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            ready(Ok(response))
        })
    }
}

/// The retry client of one row of the table.
#[derive(Clone, Copy, Debug)]
enum Peer {
    TowerNoBudget,
    TowerTpsBudgetOnSuccess,
    TowerTpsBudgetPerRequest,
    SafeRetryNoBudget,
    SafeRetryBudget,
}

impl Peer {
    const ALL: [Peer; 5] = [
        Peer::TowerNoBudget,
        Peer::TowerTpsBudgetOnSuccess,
        Peer::TowerTpsBudgetPerRequest,
        Peer::SafeRetryNoBudget,
        Peer::SafeRetryBudget,
    ];

    fn name(self) -> &'static str {
        match self {
            Peer::TowerNoBudget => "tower Retry, no budget",
            Peer::TowerTpsBudgetOnSuccess => "tower Retry + TpsBudget, deposit on success",
            Peer::TowerTpsBudgetPerRequest => "tower Retry + TpsBudget, deposit per request",
            Peer::SafeRetryNoBudget => "RetryLayer, no budget",
            Peer::SafeRetryBudget => "RetryLayer + RetryBudget::new()",
        }
    }

    fn has_budget(self) -> bool {
        !matches!(self, Peer::TowerNoBudget | Peer::SafeRetryNoBudget)
    }
}

/// Sends `count` logical requests through `client`, 1 ms of paused time apart.
async fn send_requests<S>(client: &mut S, count: u64)
where
    S: Service<Req, Response = Res, Error = BoxError>,
{
    let gap = Duration::from_secs(1) / REQUESTS_PER_SECOND as u32;
    for _ in 0..count {
        let ready = client.ready().await.expect("the client is ready");
        ready
            .call(get_request("http://127.0.0.1/storm"))
            .await
            .expect("the upstream returns a response");
        tokio::time::advance(gap).await;
    }
}

/// Runs one storm and returns the upstream calls per logical request during it.
async fn storm<S>(mut client: S, upstream: &Upstream, warm: bool) -> f64
where
    S: Service<Req, Response = Res, Error = BoxError>,
{
    if warm {
        upstream.down.store(false, Ordering::Relaxed);
        send_requests(&mut client, WARM_UP_REQUESTS).await;
    }

    upstream.down.store(true, Ordering::Relaxed);
    let before = upstream.calls.load(Ordering::Relaxed);
    let logical = REQUESTS_PER_SECOND * STORM_SECONDS;
    send_requests(&mut client, logical).await;
    let calls = upstream.calls.load(Ordering::Relaxed) - before;

    calls as f64 / logical as f64
}

/// Builds the client of `peer` on a new upstream and budget, and runs one storm.
async fn run(peer: Peer, warm: bool) -> f64 {
    let upstream = Upstream::default();
    let inner = upstream.service();
    let tps_budget = || Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2));
    let tower_client = |policy: TowerPolicy| {
        ServiceBuilder::new()
            .map_err(BoxError::from)
            .service(TowerRetry::new(policy, inner.clone()))
    };
    let safe_client = |budget: Option<RetryBudget>| {
        let builder = RetryPolicy::builder()
            .max_attempts(MAX_ATTEMPTS)
            .backoff(Backoff::constant(Duration::ZERO));
        let builder = match budget {
            Some(budget) => builder.budget(budget),
            None => builder,
        };
        let policy = builder.build().expect("a valid policy");
        ServiceBuilder::new()
            .layer(RetryLayer::new(policy))
            .service(inner.clone())
    };

    let attempts_only = TowerPolicy::new(MAX_ATTEMPTS, Wait::Ready);
    match peer {
        Peer::TowerNoBudget => storm(tower_client(attempts_only), &upstream, warm).await,
        Peer::TowerTpsBudgetOnSuccess => {
            let policy = attempts_only.budget(tps_budget(), Deposit::OnSuccess);
            storm(tower_client(policy), &upstream, warm).await
        }
        Peer::TowerTpsBudgetPerRequest => {
            let policy = attempts_only.budget(tps_budget(), Deposit::PerRequest);
            storm(tower_client(policy), &upstream, warm).await
        }
        Peer::SafeRetryNoBudget => storm(safe_client(None), &upstream, warm).await,
        Peer::SafeRetryBudget => {
            storm(safe_client(Some(RetryBudget::new())), &upstream, warm).await
        }
    }
}

/// Runs `peer` on a current-thread runtime whose clock starts paused at zero.
fn run_paused(peer: Peer, warm: bool) -> f64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
    runtime.block_on(run(peer, warm))
}

fn verdict(peer: Peer, cold: f64, warm: f64) -> &'static str {
    if !peer.has_budget() {
        "no budget"
    } else if cold <= TARGET_AMPLIFICATION && warm <= TARGET_AMPLIFICATION {
        "met"
    } else {
        "missed"
    }
}

fn main() {
    println!(
        "retry storm: {REQUESTS_PER_SECOND} requests/s for {STORM_SECONDS} s, upstream down, \
         max_attempts {MAX_ATTEMPTS}, zero backoff; warm = after {WARM_UP_REQUESTS} successes"
    );
    println!("target: at most {TARGET_AMPLIFICATION:.2} upstream calls per logical request\n");
    println!(
        "| {:<46} | {:>10} | {:>10} | {:<9} |",
        "peer", "cold", "warm", "target"
    );
    println!("|{:-<48}|{:->12}|{:->12}|{:-<11}|", "", ":", ":", "");
    for peer in Peer::ALL {
        let cold = run_paused(peer, false);
        let warm = run_paused(peer, true);
        println!(
            "| {:<46} | {:>9.3}x | {:>9.3}x | {:<9} |",
            peer.name(),
            cold,
            warm,
            verdict(peer, cold, warm)
        );
    }
}
