use std::any::Any;
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::handles::RequestOutcome;
use super::observer::AttemptObserver;
use crate::BoxError;
use crate::classify::{Decision, HttpClassifier, RetryReason};

pin_project! {
    /// The response future of [`RetryMetrics`](super::RetryMetrics).
    ///
    /// NOTE: a future dropped before it completes records nothing, so a cancelled
    /// request does not appear in any metric of this layer.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Taken when the outcome is recorded, so that the outcome is recorded once.
        request: Option<RequestMetrics>,
    }
}

/// The state the metrics layer keeps for a logical request until it completes.
pub(super) struct RequestMetrics {
    pub(super) observer: AttemptObserver,
    /// The index of the `method` label, from `handles::method_index`.
    pub(super) method: usize,
    pub(super) started: Instant,
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, request: RequestMetrics) -> Self {
        ResponseFuture {
            inner,
            request: Some(request),
        }
    }
}

/// The parts of a response the metrics layer classifies.
pub(super) trait ResponseHead {
    fn status(&self) -> StatusCode;
    fn headers(&self) -> &HeaderMap;
}

impl<B> ResponseHead for Response<B> {
    fn status(&self) -> StatusCode {
        Response::status(self)
    }

    fn headers(&self) -> &HeaderMap {
        Response::headers(self)
    }
}

#[cfg(feature = "reqwest")]
impl ResponseHead for reqwest::Response {
    fn status(&self) -> StatusCode {
        reqwest::Response::status(self)
    }

    fn headers(&self) -> &HeaderMap {
        reqwest::Response::headers(self)
    }
}

impl<F, Res, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Res, E>>,
    Res: ResponseHead,
    E: 'static,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let outcome = ready!(this.inner.poll(cx));
        if let Some(request) = this.request.take() {
            request.record(&outcome);
        }
        Poll::Ready(outcome)
    }
}

impl RequestMetrics {
    /// Records the metrics of the finished logical request, and its single attempt when
    /// no retry layer below reported any.
    fn record<Res: ResponseHead, E: 'static>(self, outcome: &Result<Res, E>) {
        let duration = self.started.elapsed();
        let classifier = HttpClassifier::new();
        let decision = match outcome {
            Ok(response) => classifier.classify_status(response.status(), response.headers()),
            Err(error) => classify_error(&classifier, error),
        };
        let request_outcome = match (outcome, decision) {
            (Err(_), _) => RequestOutcome::Error,
            (Ok(_), Decision::Success) => RequestOutcome::Success,
            (Ok(_), _) => RequestOutcome::Failure,
        };

        let metrics = self.observer.metrics();
        let attempts = self.observer.attempts();
        metrics.record_request(self.method, request_outcome, duration, attempts.max(1));
        if attempts == 0 {
            metrics.record_attempt(decision, duration);
        }
    }
}

/// Classifies an error of the inner service with [`HttpClassifier::classify_error`].
///
/// The layer passes the inner error type through unchanged and does not require it to
/// implement [`Error`], because the retry layer's [`BoxError`] does not. So the error is
/// placed by downcasting: a [`BoxError`], a `hyper_util::client::legacy::Error`, a
/// `hyper::Error` or an `std::io::Error` is classified, and any other type is a retry
/// with reason `unknown`.
fn classify_error<E: 'static>(classifier: &HttpClassifier, error: &E) -> Decision {
    let error: &dyn Any = error;
    let error: Option<&(dyn Error + 'static)> =
        if let Some(boxed) = error.downcast_ref::<BoxError>() {
            Some(&**boxed)
        } else if let Some(error) = error.downcast_ref::<hyper_util::client::legacy::Error>() {
            Some(error)
        } else if let Some(error) = error.downcast_ref::<hyper::Error>() {
            Some(error)
        } else if let Some(error) = error.downcast_ref::<std::io::Error>() {
            Some(error)
        } else {
            None
        };

    match error {
        Some(error) => classifier.classify_error(error),
        None => Decision::retry(RetryReason::Unknown),
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let operation = self
            .request
            .as_ref()
            .map(|request| request.observer.metrics().operation());
        f.debug_struct("ResponseFuture")
            .field("operation", &operation)
            .finish_non_exhaustive()
    }
}
