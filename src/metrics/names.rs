//! Metric names, stable across releases.

/// Counter of logical requests; labels `operation`, `method`, `outcome`
/// (`success`, `failure`, `error`).
pub const REQUESTS_TOTAL: &str = "retry_requests_total";
/// Histogram of logical request durations in seconds, backoff sleeps included; labels
/// `operation`, `outcome`.
pub const REQUEST_DURATION_SECONDS: &str = "retry_request_duration_seconds";
/// Histogram of attempts per logical request (a first-try success records 1); label
/// `operation`.
pub const REQUEST_ATTEMPTS: &str = "retry_request_attempts";
/// Counter of attempts; labels `operation`, `outcome` (`success`, `retry`, `fail`) and
/// `reason` (a [`RetryReason`](crate::classify::RetryReason) label, or `none`).
pub const ATTEMPTS_TOTAL: &str = "retry_attempts_total";
/// Histogram of attempt durations in seconds; label `operation`.
pub const ATTEMPT_DURATION_SECONDS: &str = "retry_attempt_duration_seconds";
/// Histogram of backoff sleeps in seconds; labels `operation`, `source` (`policy`,
/// `retry_after`).
pub const BACKOFF_SECONDS: &str = "retry_backoff_seconds";
/// Counter of retries the policy wanted and the layer declined; labels `operation`,
/// `reason` (a [`SuppressReason`](crate::retry::SuppressReason) label).
pub const SUPPRESSED_TOTAL: &str = "retry_suppressed_total";
/// Counter of requests seen by the server-side idempotency layer; label `outcome`
/// (`executed`, `replayed`, `in_flight`, `mismatch`, `invalid`, `store_error`, ...).
pub const IDEMPOTENCY_REQUESTS_TOTAL: &str = "idempotency_requests_total";
/// Counter of failed store calls of the server-side idempotency layer after a claim:
/// label `operation` (`complete`, `release`, `renew`). A failed claim counts as
/// `store_error` in [`IDEMPOTENCY_REQUESTS_TOTAL`] instead.
pub const IDEMPOTENCY_STORE_ERRORS_TOTAL: &str = "idempotency_store_errors_total";
