//! Pieces that every benchmark binary uses: the request shape and a tower retry policy
//! written the way tower's documentation suggests.

// Each binary uses a different subset of these items.
#![allow(dead_code)]

use std::future::{Ready, ready};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use http::{Request, Response};
use http_body_util::Full;
use tokio::time::Sleep;
use tower::retry::Policy;
use tower::retry::budget::{Budget, TpsBudget};

/// Returns whether the binary runs under `cargo bench` (full runs) rather than
/// `cargo test --benches` (one short pass to show that it works).
pub fn is_bench_run() -> bool {
    std::env::args().any(|argument| argument == "--bench")
}

/// Copies a request with a cloneable body, as every peer needs to for a retry.
pub fn copy_request<B: Clone>(request: &Request<B>) -> Request<B> {
    let mut copy = Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// When a tower [`Policy`] deposits into its [`TpsBudget`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deposit {
    /// After a successful response, as in the example of tower 0.5's `budget` module.
    OnSuccess,
    /// Once per logical request, at its first outcome, as `RetryBudget` does.
    PerRequest,
}

/// The wait of a tower [`Policy`] before a retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// `std::future::ready(())`: no wait and no timer.
    Ready,
    /// `tokio::time::sleep(Duration::ZERO)`: no delay, but through tokio's timer.
    ZeroSleep,
}

/// A tower retry policy: retries 5xx responses and errors up to `max_attempts` attempts,
/// optionally limited by a shared [`TpsBudget`].
#[derive(Clone, Debug)]
pub struct TowerPolicy {
    retries_left: u32,
    budget: Option<(Arc<TpsBudget>, Deposit)>,
    wait: Wait,
    deposited: bool,
}

impl TowerPolicy {
    pub fn new(max_attempts: u32, wait: Wait) -> Self {
        TowerPolicy {
            retries_left: max_attempts - 1,
            budget: None,
            wait,
            deposited: false,
        }
    }

    pub fn budget(mut self, budget: Arc<TpsBudget>, deposit: Deposit) -> Self {
        self.budget = Some((budget, deposit));
        self
    }
}

impl<B: Clone, ResB, E> Policy<Request<B>, Response<ResB>, E> for TowerPolicy {
    type Future = Either<Ready<()>, Sleep>;

    fn retry(
        &mut self,
        _request: &mut Request<B>,
        result: &mut Result<Response<ResB>, E>,
    ) -> Option<Self::Future> {
        let failed = match result {
            Ok(response) => response.status().is_server_error(),
            Err(_) => true,
        };

        if let Some((budget, deposit)) = &self.budget {
            let first_outcome = !self.deposited;
            self.deposited = true;
            let deposits = match deposit {
                Deposit::OnSuccess => !failed,
                Deposit::PerRequest => first_outcome,
            };
            if deposits {
                budget.deposit();
            }
        }

        if !failed || self.retries_left == 0 {
            return None;
        }
        if let Some((budget, _)) = &self.budget
            && !budget.withdraw()
        {
            return None;
        }
        self.retries_left -= 1;

        Some(match self.wait {
            Wait::Ready => Either::Left(ready(())),
            Wait::ZeroSleep => Either::Right(tokio::time::sleep(Duration::ZERO)),
        })
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        Some(copy_request(request))
    }
}

/// Builds a `GET` with an empty body and a static URI, so that building it does not allocate.
pub fn get_request(uri: &'static str) -> Request<Full<Bytes>> {
    Request::get(http::Uri::from_static(uri))
        .body(Full::new(Bytes::new()))
        .expect("a valid request")
}
