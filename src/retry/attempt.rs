//! The state the retry layer passes to the layers around it about a logical request: the attempt
//! number, per-request overrides, and whether another retry layer is already retrying.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Replay, RetryPolicy};
use crate::idempotency::LogicalRequest;
use crate::metrics::AttemptObserver;

/// The number of the attempt a request belongs to, in its extensions.
///
/// [`Retry`](super::Retry) inserts it into the request of every retry (attempt 2 and
/// later). The first attempt is not marked, which keeps a request that succeeds at once
/// free of allocations, so read it with [`Attempt::of`], which returns 1 for an unmarked
/// request. With [`RetryPolicyBuilder::attempt_header`](super::RetryPolicyBuilder::attempt_header),
/// every attempt, the first included, also carries the number in a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    number: u32,
}

impl Attempt {
    /// Returns the attempt number, starting at 1.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// Returns the attempt number recorded in `extensions`, or 1 when there is none.
    pub fn of(extensions: &http::Extensions) -> u32 {
        extensions.get::<Attempt>().map_or(1, Attempt::number)
    }

    pub(crate) fn new(number: u32) -> Self {
        Attempt { number }
    }
}

/// A per-request change to the retry policy, read from the request's extensions.
///
/// ```
/// use tower_safe_retry::retry::RetryOverride;
///
/// let mut request = http::Request::post("http://example.test/refunds").body(()).unwrap();
/// request.extensions_mut().insert(RetryOverride::disabled());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryOverride {
    max_attempts: u32,
}

impl RetryOverride {
    /// Sends the request once, whatever the policy allows.
    pub const fn disabled() -> Self {
        RetryOverride { max_attempts: 1 }
    }

    /// Allows at most `max_attempts` attempts for this request, the first included. A
    /// value of 0 is read as 1. The policy's deadline, budget and method safety still
    /// apply.
    pub const fn max_attempts(max_attempts: u32) -> Self {
        let max_attempts = if max_attempts == 0 { 1 } else { max_attempts };
        RetryOverride { max_attempts }
    }
}

thread_local! {
    /// Set while a retry layer calls its inner service, so that a retry layer below it
    /// detects that it is nested.
    static CALLING_INNER: Cell<bool> = const { Cell::new(false) };
}

/// Runs `call` with the mark that a retry layer is calling its inner service.
pub(super) fn calling_inner<T>(call: impl FnOnce() -> T) -> T {
    /// Restores the previous mark, also when `call` panics.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            CALLING_INNER.set(self.0);
        }
    }

    let _restore = Restore(CALLING_INNER.replace(true));
    call()
}

/// Facts about a logical request, gathered before its first attempt.
pub(super) struct Setup {
    pub(super) idempotent: bool,
    pub(super) max_attempts: u32,
    pub(super) mark: Option<LogicalRequest>,
    pub(super) observer: Option<AttemptObserver>,
}

impl Setup {
    /// Inspects and marks `request`, and deposits its share in the budget.
    pub(super) fn new<Req, C, R: Replay<Req>>(
        policy: &RetryPolicy<C, R>,
        request: &mut Req,
    ) -> Self {
        let idempotent = policy.replay.is_idempotent(request);
        if let Some(budget) = &policy.budget {
            budget.deposit();
        }

        let mut max_attempts = policy.max_attempts;
        let mut nested = CALLING_INNER.get();
        let mut observer;
        let mut mark = None;
        if let Some(extensions) = policy.replay.extensions_mut(request) {
            nested |= extensions.get::<Attempt>().is_some();
            if let Some(limit) = extensions.get::<RetryOverride>() {
                max_attempts = limit.max_attempts;
            }
            observer = extensions.get::<AttemptObserver>().cloned();
            // The mark lets an `IdempotencyKeyLayer` below this layer give every attempt
            // the same key, and shows this layer that the request got one.
            if max_attempts > 1 && !idempotent && !nested {
                let logical = LogicalRequest::new();
                extensions.insert(logical.clone());
                mark = Some(logical);
            }
        } else {
            // A request type without extensions gets the observer of a metrics layer
            // whose `call` is running on this thread.
            observer = AttemptObserver::current();
        }
        if nested {
            warn_nested_once();
            max_attempts = 1;
            // The outer layer reports the attempts; this one would count them twice.
            observer = None;
        }

        Setup {
            idempotent,
            max_attempts,
            mark,
            observer,
        }
    }
}

/// Logs once per process that a retry layer runs inside another, which would multiply
/// the attempts; the inner layer stops retrying.
fn warn_nested_once() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "a RetryLayer is nested inside another RetryLayer; only the outer one retries"
        );
    }
}
