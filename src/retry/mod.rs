//! Retries with classification, backoff, deadlines and method safety.
//!
//! [`Retry`] sends a request, classifies the outcome with the policy's
//! [`Classify`] implementation and, when the outcome is worth
//! another attempt and the request may be sent again, sleeps by the policy's
//! [`Backoff`](crate::backoff::Backoff) and sends a copy.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_safe_retry::backoff::Backoff;
//! use tower_safe_retry::{RetryLayer, RetryPolicy};
//!
//! // A service that fails twice with 503, then responds with 200.
//! let calls = Arc::new(AtomicU32::new(0));
//! let counter = Arc::clone(&calls);
//! let flaky = service_fn(move |_request: Request<Full<Bytes>>| {
//!     let call = counter.fetch_add(1, Ordering::SeqCst);
//!     let status = if call < 2 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
//!     async move {
//!         let mut response = Response::new(());
//!         *response.status_mut() = status;
//!         Ok::<_, std::convert::Infallible>(response)
//!     }
//! });
//!
//! let policy = RetryPolicy::builder()
//!     .backoff(Backoff::constant(Duration::ZERO))
//!     .build()
//!     .unwrap();
//! let client = ServiceBuilder::new().layer(RetryLayer::new(policy)).service(flaky);
//!
//! let request = Request::get("http://example.test/").body(Full::default()).unwrap();
//! let response = client.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), StatusCode::OK);
//! assert_eq!(calls.load(Ordering::SeqCst), 3);
//! # }
//! ```
//!
//! # When a request is not retried
//!
//! An attempt whose outcome the classifier calls [`Decision::Success`] or
//! [`Decision::Fail`] is returned as it is. An attempt it calls [`Decision::Retry`] is
//! still returned without another attempt, and the reason is counted in
//! `retry_suppressed_total` (when a [`RetryMetricsLayer`](crate::RetryMetricsLayer) is
//! above) and logged at DEBUG, in each of these cases:
//!
//! | case | [`SuppressReason`] |
//! |---|---|
//! | the request is not idempotent (a `POST` or `PATCH` without `Idempotency-Key`) and the failure does not prove it was never processed (anything but a connect error, an HTTP/2 `REFUSED_STREAM`, `429` or `409` with `Retry-After`) | `not_idempotent` |
//! | `max_attempts` attempts were made (the policy's, or a [`RetryOverride`] in the request's extensions) | `max_attempts` |
//! | this layer runs inside another retry layer, which does the retrying (logged once at WARN, and not counted, because the outer layer counts the attempts) | none |
//! | the request could not be copied for another attempt | `not_replayable` |
//! | the server asked for a delay (`Retry-After`) above `max_retry_after` | `retry_after` |
//! | the next attempt would start after the deadline | `deadline` |
//! | the policy's [`RetryBudget`](crate::budget::RetryBudget) is spent | `budget` |
//! | the body was announced or found to be over [`BodyReplay`]'s cap (64 KiB by default) | `body_too_large` |
//!
//! When the deadline passes while an attempt is in flight, the attempt is cancelled, the
//! caller gets [`DeadlineExceeded`], and a `deadline` suppression is counted. When it
//! passes while the layer waits for the inner service to be ready for a retry, the caller
//! gets the previous attempt's outcome, also counted as `deadline`. Both are logged at
//! WARN. An error from the inner service's `poll_ready` is returned at once.
//!
//! [`Decision::Success`]: crate::classify::Decision::Success
//! [`Decision::Fail`]: crate::classify::Decision::Fail
//! [`Decision::Retry`]: crate::classify::Decision::Retry

mod attempt;
mod error;
mod future;
mod layer;
mod plan;
mod policy;
mod replay;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use crate::BoxError;
use crate::classify::{Classify, HttpClassifier};

use self::attempt::{Setup, calling_inner};

pub use self::attempt::{Attempt, RetryOverride};
pub use self::error::{AttemptTimeout, DeadlineExceeded, InvalidPolicy};
pub use self::future::ResponseFuture;
pub use self::layer::RetryLayer;
pub use self::policy::{RetryEvent, RetryPolicy, RetryPolicyBuilder};
pub use self::replay::{BodyReplay, BodySource, CloneReplay, HttpReplay, Replay};

/// Retries requests to the inner service by a [`RetryPolicy`].
///
/// The first attempt goes to the service that was polled ready; each retry polls its own
/// clone of the inner service ready first. Dropping the [`ResponseFuture`] cancels the
/// attempt in flight and any pending sleep. No task is spawned.
pub struct Retry<S, C = HttpClassifier, R = HttpReplay> {
    inner: S,
    policy: Arc<RetryPolicy<C, R>>,
}

impl<S, C, R> Retry<S, C, R> {
    /// Wraps `inner`, retrying by `policy`.
    pub fn new(inner: S, policy: RetryPolicy<C, R>) -> Self {
        Retry::from_shared(inner, Arc::new(policy))
    }

    pub(crate) fn from_shared(inner: S, policy: Arc<RetryPolicy<C, R>>) -> Self {
        Retry { inner, policy }
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy<C, R> {
        &self.policy
    }

    /// Returns a reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Returns a mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, C, R> Clone for Retry<S, C, R> {
    fn clone(&self) -> Self {
        Retry {
            inner: self.inner.clone(),
            policy: Arc::clone(&self.policy),
        }
    }
}

impl<S: fmt::Debug, C, R> fmt::Debug for Retry<S, C, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .finish()
    }
}

impl<S, C, R, Req> Service<Req> for Retry<S, C, R>
where
    R: Replay<Req>,
    S: Service<R::Attempt> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, C, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Req) -> Self::Future {
        let setup = Setup::new(&self.policy, &mut request);
        let keep = setup.max_attempts > 1;
        let (mut attempt, source) = self.policy.replay.first(request, keep);
        self.policy.stamp(&mut attempt, 1);
        let future = calling_inner(|| self.inner.call(attempt));
        let service = self.inner.clone();
        ResponseFuture::new(future, service, Arc::clone(&self.policy), setup, source)
    }
}

/// Why a retry that the classifier asked for was not made: a closed set, usable as a
/// metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SuppressReason {
    /// `max_attempts` attempts were made.
    MaxAttempts,
    /// The next attempt would start after the deadline.
    Deadline,
    /// The request is not idempotent and the failure does not prove it was never
    /// processed.
    NotIdempotent,
    /// The request could not be copied for another attempt.
    NotReplayable,
    /// The server asked for a delay above `max_retry_after`.
    RetryAfter,
    /// The policy's [`RetryBudget`](crate::budget::RetryBudget) is spent.
    Budget,
    /// The request body was announced or found to be over the replay cap of
    /// [`BodyReplay`], so it was sent once.
    BodyTooLarge,
}

impl SuppressReason {
    /// Returns the metric label, in `snake_case`.
    pub const fn as_str(&self) -> &'static str {
        match self {
            SuppressReason::MaxAttempts => "max_attempts",
            SuppressReason::Deadline => "deadline",
            SuppressReason::NotIdempotent => "not_idempotent",
            SuppressReason::NotReplayable => "not_replayable",
            SuppressReason::RetryAfter => "retry_after",
            SuppressReason::Budget => "budget",
            SuppressReason::BodyTooLarge => "body_too_large",
        }
    }
}

impl fmt::Display for SuppressReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The origin of a backoff delay: a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackoffSource {
    /// The policy's backoff schedule.
    Policy,
    /// The server's `Retry-After`, which was longer than the schedule's delay.
    RetryAfter,
}

impl BackoffSource {
    /// Returns the metric label, in `snake_case`.
    pub const fn as_str(&self) -> &'static str {
        match self {
            BackoffSource::Policy => "policy",
            BackoffSource::RetryAfter => "retry_after",
        }
    }
}
