use http::{Method, Request};

use crate::idempotency::IDEMPOTENCY_KEY;

/// How the retry layer copies a request for another attempt and decides whether it may be
/// sent again after it may have reached the server.
///
/// [`HttpReplay`] handles `http::Request<B>`; [`CloneReplay`] handles any `Req: Clone`.
pub trait Replay<Req> {
    /// Returns a copy of `request` for another attempt, or `None` when it cannot be copied,
    /// in which case the request is sent once.
    fn clone_request(&self, request: &Req) -> Option<Req>;

    /// Whether `request` may be sent again after it may have been processed.
    ///
    /// A request that is not idempotent is retried only after a failure that proves it
    /// was never processed ([`RetryReason::proves_not_processed`]).
    ///
    /// [`RetryReason::proves_not_processed`]: crate::classify::RetryReason::proves_not_processed
    fn is_idempotent(&self, request: &Req) -> bool;

    /// The request's extensions, through which the retry layer and its neighbours in the
    /// stack (the idempotency key and metrics layers) talk. `None` when the request type
    /// has none.
    fn extensions_mut<'a>(&self, request: &'a mut Req) -> Option<&'a mut http::Extensions> {
        let _ = request;
        None
    }
}

/// Replays `http::Request<B>` whose body is `Clone` (`Full<Bytes>`, `String`, `Vec<u8>`,
/// `Bytes` and similar), with RFC 9110 method safety.
///
/// `GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT` and `DELETE` are idempotent. Any other method,
/// `POST` and `PATCH` among them, is idempotent only when the request carries an
/// `Idempotency-Key` header.
///
/// NOTE: a streaming body that is not `Clone` does not compile with this replay yet;
/// such requests need a `RetryLayer` with `max_attempts(1)` or no retry layer.
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpReplay {
    _private: (),
}

impl HttpReplay {
    /// Creates the HTTP replay.
    pub const fn new() -> Self {
        HttpReplay { _private: () }
    }
}

impl<B: Clone> Replay<Request<B>> for HttpReplay {
    fn clone_request(&self, request: &Request<B>) -> Option<Request<B>> {
        let mut copy = Request::new(request.body().clone());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        Some(copy)
    }

    fn is_idempotent(&self, request: &Request<B>) -> bool {
        is_idempotent_method(request.method()) || request.headers().contains_key(IDEMPOTENCY_KEY)
    }

    fn extensions_mut<'a>(&self, request: &'a mut Request<B>) -> Option<&'a mut http::Extensions> {
        Some(request.extensions_mut())
    }
}

/// Whether RFC 9110 defines the method as idempotent.
pub(crate) fn is_idempotent_method(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Replays any `Req: Clone` by cloning it, and treats every request as idempotent: the
/// classifier alone decides what is retried.
///
/// Such requests have no extensions, so a [`RetryMetricsLayer`](crate::RetryMetricsLayer)
/// above sees one attempt per logical request: the per-attempt, backoff and suppressed
/// metrics need `http::Request` and [`HttpReplay`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CloneReplay {
    _private: (),
}

impl CloneReplay {
    /// Creates the clone replay.
    pub const fn new() -> Self {
        CloneReplay { _private: () }
    }
}

impl<Req: Clone> Replay<Req> for CloneReplay {
    fn clone_request(&self, request: &Req) -> Option<Req> {
        Some(request.clone())
    }

    fn is_idempotent(&self, _request: &Req) -> bool {
        true
    }
}
