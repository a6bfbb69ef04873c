//! Metric handles of one operation, registered on first use and then reused.
//!
//! The `counter!` and `histogram!` macros build a [`metrics::Key`] with a heap-allocated
//! label vector and ask the recorder for a handle on every call, even when no recorder
//! is installed. Every label of these metrics has a bounded set of values, so
//! [`OperationMetrics`] keeps one slot per label set and registers each handle once.

use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use http::Method;
use metrics::{Counter, Histogram, SharedString, counter, histogram};

use super::names;
use crate::classify::{Decision, RetryReason};
use crate::retry::{BackoffSource, SuppressReason};

/// The `method` label values: the nine methods of RFC 9110 and RFC 5789, then `other`
/// for any extension method. [`method_index`] returns an index into this array.
const METHOD_LABELS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "other",
];

/// The number of [`RetryReason`] variants. [`reason_index`] maps each to one below it.
const REASON_COUNT: usize = 12;

/// The number of [`SuppressReason`] variants. [`suppress_index`] maps each to one below
/// it.
const SUPPRESS_REASON_COUNT: usize = 7;

/// The number of [`BackoffSource`] variants.
const BACKOFF_SOURCE_COUNT: usize = 2;

/// The label sets of `retry_attempts_total`: outcome `success` with reason `none`, then
/// outcomes `retry` and `fail` with each [`RetryReason`].
const ATTEMPT_LABEL_COUNT: usize = 1 + 2 * REASON_COUNT;

/// The `outcome` of a logical request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RequestOutcome {
    /// A response that `HttpClassifier` classifies as a success.
    Success,
    /// Any other response.
    Failure,
    /// The service returned an error.
    Error,
}

impl RequestOutcome {
    const COUNT: usize = 3;

    const fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Success => "success",
            RequestOutcome::Failure => "failure",
            RequestOutcome::Error => "error",
        }
    }
}

/// The metric handles of one operation, shared by a [`RetryMetricsLayer`], its clones,
/// the services it wraps and the observers of their requests.
///
/// Each handle is registered with the recorder that is current (the thread-local one of
/// `metrics::set_default_local_recorder`, else the global one) when the layer first
/// records that metric with that label set. Later records reuse the handle, so a
/// recorder installed after that point does not receive them.
///
/// [`RetryMetricsLayer`]: super::RetryMetricsLayer
pub(crate) struct OperationMetrics {
    operation: SharedString,
    /// `retry_requests_total`, indexed by `method * RequestOutcome::COUNT + outcome`.
    requests_total: [OnceLock<Counter>; METHOD_LABELS.len() * RequestOutcome::COUNT],
    /// `retry_request_duration_seconds`, indexed by outcome.
    request_duration: [OnceLock<Histogram>; RequestOutcome::COUNT],
    request_attempts: OnceLock<Histogram>,
    /// `retry_attempts_total`, indexed by [`attempt_index`].
    attempts_total: [OnceLock<Counter>; ATTEMPT_LABEL_COUNT],
    attempt_duration: OnceLock<Histogram>,
    /// `retry_backoff_seconds`, indexed by [`backoff_index`].
    backoff: [OnceLock<Histogram>; BACKOFF_SOURCE_COUNT],
    /// `retry_suppressed_total`, indexed by [`suppress_index`].
    suppressed_total: [OnceLock<Counter>; SUPPRESS_REASON_COUNT],
}

impl OperationMetrics {
    /// Creates empty slots for `operation`, without registering any handle.
    pub(super) fn new(operation: SharedString) -> Self {
        OperationMetrics {
            operation,
            requests_total: [const { OnceLock::new() };
                METHOD_LABELS.len() * RequestOutcome::COUNT],
            request_duration: [const { OnceLock::new() }; RequestOutcome::COUNT],
            request_attempts: OnceLock::new(),
            attempts_total: [const { OnceLock::new() }; ATTEMPT_LABEL_COUNT],
            attempt_duration: OnceLock::new(),
            backoff: [const { OnceLock::new() }; BACKOFF_SOURCE_COUNT],
            suppressed_total: [const { OnceLock::new() }; SUPPRESS_REASON_COUNT],
        }
    }

    /// Returns the `operation` label.
    pub(super) fn operation(&self) -> &SharedString {
        &self.operation
    }

    /// Records the three metrics of a finished logical request, which took `attempts`
    /// attempts (at least 1).
    pub(super) fn record_request(
        &self,
        method: usize,
        outcome: RequestOutcome,
        duration: Duration,
        attempts: u32,
    ) {
        let slot = &self.requests_total[method * RequestOutcome::COUNT + outcome as usize];
        let requests = slot.get_or_init(|| {
            counter!(
                names::REQUESTS_TOTAL,
                "operation" => self.operation.clone(),
                "method" => METHOD_LABELS[method],
                "outcome" => outcome.as_str(),
            )
        });
        requests.increment(1);

        let request_duration = self.request_duration[outcome as usize].get_or_init(|| {
            histogram!(
                names::REQUEST_DURATION_SECONDS,
                "operation" => self.operation.clone(),
                "outcome" => outcome.as_str(),
            )
        });
        request_duration.record(duration.as_secs_f64());

        let request_attempts = self.request_attempts.get_or_init(
            || histogram!(names::REQUEST_ATTEMPTS, "operation" => self.operation.clone()),
        );
        request_attempts.record(f64::from(attempts));
    }

    /// Records `retry_attempts_total` and `retry_attempt_duration_seconds` for one attempt.
    pub(super) fn record_attempt(&self, decision: Decision, duration: Duration) {
        let attempt_duration = self.attempt_duration.get_or_init(
            || histogram!(names::ATTEMPT_DURATION_SECONDS, "operation" => self.operation.clone()),
        );
        attempt_duration.record(duration.as_secs_f64());

        let attempts = self.attempts_total[attempt_index(decision)].get_or_init(|| {
            let (outcome, reason) = match decision {
                Decision::Success => ("success", "none"),
                Decision::Retry { reason, .. } => ("retry", reason.as_str()),
                Decision::Fail { reason } => ("fail", reason.as_str()),
            };
            counter!(
                names::ATTEMPTS_TOTAL,
                "operation" => self.operation.clone(),
                "outcome" => outcome,
                "reason" => reason,
            )
        });
        attempts.increment(1);
    }

    /// Records a backoff sleep before a retry.
    pub(super) fn record_backoff(&self, delay: Duration, source: BackoffSource) {
        let backoff = self.backoff[backoff_index(source)].get_or_init(|| {
            histogram!(
                names::BACKOFF_SECONDS,
                "operation" => self.operation.clone(),
                "source" => source.as_str(),
            )
        });
        backoff.record(delay.as_secs_f64());
    }

    /// Records a retry that the policy requested and the layer declined.
    pub(super) fn record_suppressed(&self, reason: SuppressReason) {
        let suppressed = self.suppressed_total[suppress_index(reason)].get_or_init(|| {
            counter!(
                names::SUPPRESSED_TOTAL,
                "operation" => self.operation.clone(),
                "reason" => reason.as_str(),
            )
        });
        suppressed.increment(1);
    }
}

impl fmt::Debug for OperationMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OperationMetrics")
            .field("operation", &self.operation)
            .finish_non_exhaustive()
    }
}

/// Returns the index of the `method` label in [`METHOD_LABELS`].
pub(super) fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::CONNECT => 5,
        Method::OPTIONS => 6,
        Method::TRACE => 7,
        Method::PATCH => 8,
        _ => 9,
    }
}

/// Returns the slot of an attempt's `outcome` and `reason` labels in `attempts_total`.
fn attempt_index(decision: Decision) -> usize {
    match decision {
        Decision::Success => 0,
        Decision::Retry { reason, .. } => 1 + reason_index(reason),
        Decision::Fail { reason } => 1 + REASON_COUNT + reason_index(reason),
    }
}

// The matches below list every variant without a wildcard. The enums are
// `#[non_exhaustive]` only for other crates, so a new variant fails to compile here
// until it gets a slot.

const fn reason_index(reason: RetryReason) -> usize {
    match reason {
        RetryReason::RequestTimeout => 0,
        RetryReason::Conflict => 1,
        RetryReason::TooManyRequests => 2,
        RetryReason::ClientError => 3,
        RetryReason::ServerError => 4,
        RetryReason::Connect => 5,
        RetryReason::Timeout => 6,
        RetryReason::Reset => 7,
        RetryReason::Body => 8,
        RetryReason::Grpc => 9,
        RetryReason::Unknown => 10,
        RetryReason::RefusedStream => 11,
    }
}

const fn suppress_index(reason: SuppressReason) -> usize {
    match reason {
        SuppressReason::MaxAttempts => 0,
        SuppressReason::Deadline => 1,
        SuppressReason::NotIdempotent => 2,
        SuppressReason::NotReplayable => 3,
        SuppressReason::RetryAfter => 4,
        SuppressReason::Budget => 5,
        SuppressReason::BodyTooLarge => 6,
    }
}

const fn backoff_index(source: BackoffSource) -> usize {
    match source {
        BackoffSource::Policy => 0,
        BackoffSource::RetryAfter => 1,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    const REASONS: [RetryReason; REASON_COUNT] = [
        RetryReason::RequestTimeout,
        RetryReason::Conflict,
        RetryReason::TooManyRequests,
        RetryReason::ClientError,
        RetryReason::ServerError,
        RetryReason::Connect,
        RetryReason::Timeout,
        RetryReason::Reset,
        RetryReason::Body,
        RetryReason::Grpc,
        RetryReason::Unknown,
        RetryReason::RefusedStream,
    ];

    #[test]
    fn attempt_indexes_distinct() {
        let mut indexes = HashSet::new();
        assert!(indexes.insert(attempt_index(Decision::Success)));
        for reason in REASONS {
            assert!(
                indexes.insert(attempt_index(Decision::retry(reason))),
                "{reason}"
            );
            assert!(
                indexes.insert(attempt_index(Decision::fail(reason))),
                "{reason}"
            );
        }
        assert_eq!(indexes.len(), ATTEMPT_LABEL_COUNT);
        assert!(indexes.iter().all(|&index| index < ATTEMPT_LABEL_COUNT));
    }

    #[test]
    fn suppress_indexes_distinct() {
        let reasons = [
            SuppressReason::MaxAttempts,
            SuppressReason::Deadline,
            SuppressReason::NotIdempotent,
            SuppressReason::NotReplayable,
            SuppressReason::RetryAfter,
            SuppressReason::Budget,
            SuppressReason::BodyTooLarge,
        ];
        let indexes: HashSet<usize> = reasons.into_iter().map(suppress_index).collect();
        assert_eq!(indexes.len(), SUPPRESS_REASON_COUNT);
        assert!(indexes.iter().all(|&index| index < SUPPRESS_REASON_COUNT));
    }

    #[test]
    fn method_labels_match_methods() {
        let methods = [
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::CONNECT,
            Method::OPTIONS,
            Method::TRACE,
            Method::PATCH,
        ];
        for method in methods {
            assert_eq!(METHOD_LABELS[method_index(&method)], method.as_str());
        }
        let purge = Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(METHOD_LABELS[method_index(&purge)], "other");
    }
}
