//! The meaning of each attempt's outcome for the logical request.
//!
//! Every attempt ends in a response or an error. A [`Classify`] implementation turns
//! that outcome into a [`Decision`]: [`Success`](Decision::Success), a
//! [`Retry`](Decision::Retry) with a [`RetryReason`] and an optional delay the server
//! asked for, or a [`Fail`](Decision::Fail) with a reason. The reason is a closed set
//! so that it can label metrics without unbounded cardinality.
//!
//! [`HttpClassifier`] is the default for `http::Response` and for the errors of hyper,
//! hyper-util and the standard library. Closures implement [`Classify`] too:
//!
//! ```
//! use tower_safe_retry::BoxError;
//! use tower_safe_retry::classify::{Classify, Decision, RetryReason};
//!
//! let classifier = |outcome: Result<&u32, &BoxError>| match outcome {
//!     Ok(_) => Decision::Success,
//!     Err(_) => Decision::retry(RetryReason::Unknown),
//! };
//! assert_eq!(classifier.classify(Ok(&7)), Decision::Success);
//! ```
//!
//! A [`Decision::Retry`] is a request for another attempt, not a promise of one. The retry
//! layer still declines it when the request is not idempotent and the reason does not
//! prove that the request was never processed (see
//! [`RetryReason::proves_not_processed`]). It also declines it when the attempts or the
//! deadline run out, or when the request cannot be copied.

mod grpc;
mod http;

use std::fmt;
use std::time::Duration;

use crate::BoxError;

pub use self::grpc::GrpcClassifier;
pub use self::http::HttpClassifier;

/// Classifies the outcome of one attempt.
///
/// The error is boxed because the retry layer converts the inner service's error into a
/// [`BoxError`] before classifying it, so that its own per-attempt timeout and the
/// inner service's errors are inspected the same way (walk [`std::error::Error::source`]
/// and downcast).
pub trait Classify<Res> {
    /// Returns what the outcome of one attempt means.
    fn classify(&self, outcome: Result<&Res, &BoxError>) -> Decision;
}

impl<F, Res> Classify<Res> for F
where
    F: Fn(Result<&Res, &BoxError>) -> Decision,
{
    fn classify(&self, outcome: Result<&Res, &BoxError>) -> Decision {
        self(outcome)
    }
}

/// The meaning of one attempt's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// The attempt succeeded; return its outcome.
    Success,
    /// The attempt failed in a way that another attempt may fix.
    Retry {
        /// The cause of the failure.
        reason: RetryReason,
        /// The delay the server asked for (`Retry-After`, `grpc-retry-pushback-ms`).
        after: Option<Duration>,
    },
    /// The attempt failed in a way that another attempt will not fix; return its outcome.
    Fail {
        /// The cause of the failure.
        reason: RetryReason,
    },
}

impl Decision {
    /// Creates a [`Decision::Retry`] without a server-given delay.
    pub const fn retry(reason: RetryReason) -> Self {
        Decision::Retry {
            reason,
            after: None,
        }
    }

    /// Creates a [`Decision::Fail`].
    pub const fn fail(reason: RetryReason) -> Self {
        Decision::Fail { reason }
    }

    /// Returns the reason of a retry or a failure, `None` for a success.
    pub const fn reason(&self) -> Option<RetryReason> {
        match self {
            Decision::Success => None,
            Decision::Retry { reason, .. } | Decision::Fail { reason } => Some(*reason),
        }
    }

    /// Returns whether this is [`Decision::Success`].
    pub const fn is_success(&self) -> bool {
        matches!(self, Decision::Success)
    }
}

/// Why an attempt failed: a closed set, usable as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryReason {
    /// `408 Request Timeout`.
    RequestTimeout,
    /// `409 Conflict` with `Retry-After`: the server is still processing another request
    /// with the same idempotency key and did not process this one.
    Conflict,
    /// `429 Too Many Requests`: the server rejected the request without processing it.
    TooManyRequests,
    /// Any other `4xx` status.
    ClientError,
    /// A `5xx` status.
    ServerError,
    /// The connection could not be established, so the request was never sent.
    Connect,
    /// The attempt took longer than the per-attempt timeout.
    Timeout,
    /// The connection was closed or reset before a complete response arrived.
    Reset,
    /// The server refused an HTTP/2 stream with `REFUSED_STREAM`, which RFC 9113
    /// (section 8.7) defines as closed before any processing.
    RefusedStream,
    /// A body failed to send or arrive.
    Body,
    /// A gRPC status other than `OK`.
    Grpc,
    /// An error the classifier could not place.
    Unknown,
}

impl RetryReason {
    /// Returns the metric label of the reason, in `snake_case`.
    pub const fn as_str(&self) -> &'static str {
        match self {
            RetryReason::RequestTimeout => "request_timeout",
            RetryReason::Conflict => "conflict",
            RetryReason::TooManyRequests => "too_many_requests",
            RetryReason::ClientError => "client_error",
            RetryReason::ServerError => "server_error",
            RetryReason::Connect => "connect",
            RetryReason::Timeout => "timeout",
            RetryReason::Reset => "reset",
            RetryReason::RefusedStream => "refused_stream",
            RetryReason::Body => "body",
            RetryReason::Grpc => "grpc",
            RetryReason::Unknown => "unknown",
        }
    }

    /// Returns whether a failure with this reason proves that the server did not process the
    /// request, so that even a request that is not idempotent (a `POST` without an
    /// `Idempotency-Key`) may be sent again.
    ///
    /// True for [`Connect`](Self::Connect), [`RefusedStream`](Self::RefusedStream),
    /// [`TooManyRequests`](Self::TooManyRequests) and [`Conflict`](Self::Conflict).
    pub const fn proves_not_processed(&self) -> bool {
        matches!(
            self,
            RetryReason::Connect
                | RetryReason::RefusedStream
                | RetryReason::TooManyRequests
                | RetryReason::Conflict
        )
    }
}

impl fmt::Display for RetryReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
