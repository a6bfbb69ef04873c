//! Retry metrics through the `metrics` facade.
//!
//! [`RetryMetricsLayer`] records each logical request: its outcome, its duration with
//! backoff sleeps included, and how many attempts it took. It puts an observer into the
//! request's extensions, through which a [`RetryLayer`](crate::RetryLayer) below it
//! records each attempt, backoff sleep and declined retry. Put the metrics layer above
//! the retry layer, so that one logical request is counted once however often it is
//! retried:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! # use metrics_util::debugging::{DebugValue, DebuggingRecorder};
//! # let recorder = DebuggingRecorder::new();
//! # let snapshotter = recorder.snapshotter();
//! # let _guard = metrics::set_default_local_recorder(&recorder);
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_safe_retry::{IdempotencyKeyLayer, RetryLayer, RetryMetricsLayer, RetryPolicy};
//!
//! let svc = service_fn(|_request: Request<Full<Bytes>>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default()))
//! });
//! let client = ServiceBuilder::new()
//!     .layer(RetryMetricsLayer::new("payments"))
//!     .layer(IdempotencyKeyLayer::new())
//!     .layer(RetryLayer::new(RetryPolicy::http()))
//!     .service(svc);
//!
//! let request = Request::post("http://example.test/charges")
//!     .body(Full::from("amount=100"))
//!     .unwrap();
//! client.oneshot(request).await.unwrap();
//! // retry_requests_total{operation="payments",method="POST",outcome="success"} is now 1.
//! # let requests = snapshotter.snapshot().into_vec().into_iter().find(|(key, ..)| {
//! #     key.key().name() == "retry_requests_total"
//! # });
//! # assert!(matches!(requests, Some((.., DebugValue::Counter(1)))));
//! # }
//! ```
//!
//! # Metrics
//!
//! | name | kind | labels | recorded by |
//! |---|---|---|---|
//! | `retry_requests_total` | counter | `operation`, `method`, `outcome` | metrics layer |
//! | `retry_request_duration_seconds` | histogram, backoff sleeps included | `operation`, `outcome` | metrics layer |
//! | `retry_request_attempts` | histogram, 1 for a first-try outcome | `operation` | metrics layer |
//! | `retry_attempts_total` | counter | `operation`, `outcome`, `reason` | retry layer, or the metrics layer alone |
//! | `retry_attempt_duration_seconds` | histogram | `operation` | retry layer, or the metrics layer alone |
//! | `retry_backoff_seconds` | histogram | `operation`, `source` | retry layer |
//! | `retry_suppressed_total` | counter | `operation`, `reason` | retry layer |
//! | `idempotency_requests_total` | counter | `outcome` | server-side `IdempotencyLayer` |
//! | `idempotency_store_errors_total` | counter | `operation` (`complete`, `release`, `renew`) | server-side `IdempotencyLayer` |
//!
//! [`names`] has the names as constants. Every label has a bounded set of values:
//!
//! - `operation` is the name given to [`RetryMetricsLayer::new`]. It must be a static
//!   name, never a raw path or URL, because each distinct value is a new time series.
//! - `method` is the request method for the nine methods of RFC 9110 and RFC 5789
//!   (`GET`, `HEAD`, `POST`, `PUT`, `DELETE`, `CONNECT`, `OPTIONS`, `TRACE`, `PATCH`),
//!   and `other` for any extension method.
//! - `outcome` of a request is `success` for a response that
//!   [`HttpClassifier`](crate::classify::HttpClassifier) classifies as a success,
//!   `failure` for any other response and `error` when the service returned an error.
//! - `outcome` of an attempt is `success`, `retry` or `fail`, and its `reason` is a
//!   [`RetryReason`](crate::classify::RetryReason) label, or `none` for a success.
//! - `source` of a backoff is `policy` or `retry_after`.
//! - `reason` of a suppressed retry is a [`SuppressReason`](crate::retry::SuppressReason)
//!   label.
//!
//! Without a retry layer below, the metrics layer records the single attempt itself,
//! classified by [`HttpClassifier`](crate::classify::HttpClassifier). An error is then
//! classified when it is a [`BoxError`](crate::BoxError), a
//! `hyper_util::client::legacy::Error`, a `hyper::Error` or an `std::io::Error`, and
//! counted with reason `unknown` otherwise.
//!
//! With the `report` feature (on by default), `RetryReport` turns a `metrics-util`
//! debugging snapshot into a per-operation table of these metrics.

mod future;
mod handles;
mod layer;
pub mod names;
mod observer;
#[cfg(feature = "report")]
mod report;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use metrics::SharedString;
use tokio::time::Instant;
use tower_service::Service;

pub use self::future::ResponseFuture;
use self::handles::{OperationMetrics, method_index};
pub use self::layer::RetryMetricsLayer;
pub(crate) use self::observer::AttemptObserver;
#[cfg(feature = "report")]
#[cfg_attr(docsrs, doc(cfg(feature = "report")))]
pub use self::report::{OperationReport, RetryReport};

/// Records retry metrics for each logical request; see [`RetryMetricsLayer`].
#[derive(Clone)]
pub struct RetryMetrics<S> {
    inner: S,
    /// Shared with the layer that built this service and with every clone.
    metrics: Arc<OperationMetrics>,
}

impl<S> RetryMetrics<S> {
    /// Wraps `inner`, recording metrics under the `operation` label.
    ///
    /// The service and its clones register their metric handles on first use, as
    /// [`RetryMetricsLayer`] describes, separately from any other service or layer.
    pub fn new(inner: S, operation: impl Into<SharedString>) -> Self {
        RetryMetrics::with_metrics(inner, Arc::new(OperationMetrics::new(operation.into())))
    }

    pub(super) fn with_metrics(inner: S, metrics: Arc<OperationMetrics>) -> Self {
        RetryMetrics { inner, metrics }
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

impl<S: fmt::Debug> fmt::Debug for RetryMetrics<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryMetrics")
            .field("inner", &self.inner)
            .field("operation", self.metrics.operation())
            .finish()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for RetryMetrics<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqB>) -> Self::Future {
        // A new observer for each call, so that attempts of different logical requests
        // are never counted together, even when the caller reuses extensions.
        let observer = AttemptObserver::new(Arc::clone(&self.metrics));
        request.extensions_mut().insert(observer.clone());

        let metrics = future::RequestMetrics {
            observer: observer.clone(),
            method: method_index(request.method()),
            started: Instant::now(),
        };
        let future = observer.observe(|| self.inner.call(request));
        ResponseFuture::new(future, metrics)
    }
}

/// For `reqwest::Client`. A `reqwest::Request` has no public extensions, so a retry layer
/// below finds the observer only when its `call` runs inside this layer's `call`, as in a
/// plain `ServiceBuilder` stack. Behind a `Buffer` the attempts are not reported, and each
/// logical request counts as one attempt.
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
impl<S> Service<reqwest::Request> for RetryMetrics<S>
where
    S: Service<reqwest::Request, Response = reqwest::Response>,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: reqwest::Request) -> Self::Future {
        let observer = AttemptObserver::new(Arc::clone(&self.metrics));
        let metrics = future::RequestMetrics {
            observer: observer.clone(),
            method: method_index(request.method()),
            started: Instant::now(),
        };
        let future = observer.observe(|| self.inner.call(request));
        ResponseFuture::new(future, metrics)
    }
}
