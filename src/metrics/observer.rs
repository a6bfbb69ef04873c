use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::handles::OperationMetrics;
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
    /// The metric handles of the layer that created the observer.
    metrics: Arc<OperationMetrics>,
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

    /// Returns the observer of the metrics layer whose `call` is running, if any.
    pub(crate) fn current() -> Option<AttemptObserver> {
        CURRENT.with_borrow(Clone::clone)
    }

    /// Creates the observer of one logical request, which records into `metrics`.
    pub(crate) fn new(metrics: Arc<OperationMetrics>) -> Self {
        AttemptObserver {
            state: Arc::new(State {
                metrics,
                attempts: AtomicU32::new(0),
            }),
        }
    }

    /// Returns the metric handles this observer records into.
    pub(super) fn metrics(&self) -> &OperationMetrics {
        &self.state.metrics
    }

    /// Returns the attempts reported so far; 0 when no retry layer reported any.
    pub(crate) fn attempts(&self) -> u32 {
        self.state.attempts.load(Ordering::Relaxed)
    }

    /// Records one finished attempt.
    pub(crate) fn attempt(&self, decision: Decision, duration: Duration) {
        self.state.attempts.fetch_add(1, Ordering::Relaxed);
        self.state.metrics.record_attempt(decision, duration);
    }

    /// Records a backoff sleep before a retry.
    pub(crate) fn backoff(&self, delay: Duration, source: BackoffSource) {
        self.state.metrics.record_backoff(delay, source);
    }

    /// Records a retry that the policy wanted and the layer declined.
    pub(crate) fn suppressed(&self, reason: SuppressReason) {
        self.state.metrics.record_suppressed(reason);
    }
}
