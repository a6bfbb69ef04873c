use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use metrics::{SharedString, counter, histogram};

use super::names;
use crate::classify::Decision;
use crate::retry::{BackoffSource, SuppressReason};

/// The per-attempt side of [`RetryMetricsLayer`](super::RetryMetricsLayer).
///
/// The metrics layer puts one into the extensions of each logical request, and the retry
/// layer below it reports every attempt, backoff and declined retry through it. Clones
/// share the attempt count.
#[derive(Clone, Debug)]
pub(crate) struct AttemptObserver {
    state: Arc<State>,
}

#[derive(Debug)]
struct State {
    operation: SharedString,
    attempts: AtomicU32,
}

thread_local! {
    /// The observer of the logical request whose inner `call` is running on this thread.
    static CURRENT: RefCell<Option<AttemptObserver>> = const { RefCell::new(None) };
}

impl AttemptObserver {
    /// Runs `call` with `self` as the current observer, for request types without
    /// extensions: a retry layer whose `call` runs inside picks it up with
    /// [`current`](Self::current).
    pub(crate) fn observe<T>(&self, call: impl FnOnce() -> T) -> T {
        /// Restores the previous observer, also when `call` panics.
        struct Restore(Option<AttemptObserver>);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.set(self.0.take());
            }
        }

        let _restore = Restore(CURRENT.replace(Some(self.clone())));
        call()
    }

    /// The observer of the metrics layer whose `call` is running, if any.
    pub(crate) fn current() -> Option<AttemptObserver> {
        CURRENT.with_borrow(Clone::clone)
    }

    pub(crate) fn new(operation: SharedString) -> Self {
        AttemptObserver {
            state: Arc::new(State {
                operation,
                attempts: AtomicU32::new(0),
            }),
        }
    }

    /// The attempts reported so far; 0 when no retry layer reported any.
    pub(crate) fn attempts(&self) -> u32 {
        self.state.attempts.load(Ordering::Relaxed)
    }

    /// Records one finished attempt.
    pub(crate) fn attempt(&self, decision: Decision, duration: Duration) {
        self.state.attempts.fetch_add(1, Ordering::Relaxed);
        record_attempt(self.state.operation.clone(), decision, duration);
    }

    /// Records a backoff sleep before a retry.
    pub(crate) fn backoff(&self, delay: Duration, source: BackoffSource) {
        histogram!(
            names::BACKOFF_SECONDS,
            "operation" => self.state.operation.clone(),
            "source" => source.as_str(),
        )
        .record(delay.as_secs_f64());
    }

    /// Records a retry that the policy wanted and the layer declined.
    pub(crate) fn suppressed(&self, reason: SuppressReason) {
        counter!(
            names::SUPPRESSED_TOTAL,
            "operation" => self.state.operation.clone(),
            "reason" => reason.as_str(),
        )
        .increment(1);
    }
}

/// Records `retry_attempts_total` and `retry_attempt_duration_seconds` for one attempt.
pub(crate) fn record_attempt(operation: SharedString, decision: Decision, duration: Duration) {
    let (outcome, reason) = match decision {
        Decision::Success => ("success", "none"),
        Decision::Retry { reason, .. } => ("retry", reason.as_str()),
        Decision::Fail { reason } => ("fail", reason.as_str()),
    };
    histogram!(names::ATTEMPT_DURATION_SECONDS, "operation" => operation.clone())
        .record(duration.as_secs_f64());
    counter!(
        names::ATTEMPTS_TOTAL,
        "operation" => operation,
        "outcome" => outcome,
        "reason" => reason,
    )
    .increment(1);
}
