use http::{HeaderMap, Method, Request};
use http_body::Body;

use super::SuppressReason;
use crate::BoxError;
use crate::body::ReplayBody;
use crate::idempotency::IDEMPOTENCY_KEY;

/// A strategy for turning a request into attempts, and for deciding whether it may be
/// sent again after it may have reached the server.
///
/// [`HttpReplay`] handles `http::Request<B>` with a `Clone` body, [`BodyReplay`] any
/// `http::Request<B>` with a streaming body, and [`CloneReplay`] any `Req: Clone`.
#[diagnostic::on_unimplemented(
    message = "the retry layer cannot replay `{Req}` with `{Self}`",
    note = "`HttpReplay` needs `http::Request<B>` with a `Clone` body such as `Full<Bytes>`; \
            for a streaming body use `RetryPolicy::builder().replay(BodyReplay::new())`, and \
            for other request types `CloneReplay`"
)]
pub trait Replay<Req> {
    /// The request type the inner service receives.
    type Attempt;
    /// The state the layer keeps to make later attempts.
    type Source;

    /// Turns `request` into the first attempt. With `keep`, also returns what later
    /// attempts are made from, or `None` when the request cannot be copied.
    fn first(&self, request: Req, keep: bool) -> (Self::Attempt, Option<Self::Source>);

    /// Makes another attempt from `source`.
    ///
    /// # Errors
    ///
    /// The reason the request cannot be sent again, such as
    /// [`SuppressReason::BodyTooLarge`].
    fn next(&self, source: &Self::Source) -> Result<Self::Attempt, SuppressReason>;

    /// Returns whether `request` may be sent again after it may have been processed.
    ///
    /// A request that is not idempotent is retried only after a failure that proves it
    /// was never processed ([`RetryReason::proves_not_processed`]).
    ///
    /// [`RetryReason::proves_not_processed`]: crate::classify::RetryReason::proves_not_processed
    fn is_idempotent(&self, request: &Req) -> bool;

    /// Returns the request's extensions, through which the retry layer and its neighbours in the
    /// stack (the idempotency key and metrics layers) pass state. `None` when the request
    /// type has none.
    fn extensions_mut<'a>(&self, request: &'a mut Req) -> Option<&'a mut http::Extensions> {
        let _ = request;
        None
    }

    /// Returns the attempt's extensions, where the layer records the [`Attempt`](super::Attempt)
    /// number. `None` when the attempt type has none.
    fn attempt_extensions_mut<'a>(
        &self,
        attempt: &'a mut Self::Attempt,
    ) -> Option<&'a mut http::Extensions> {
        let _ = attempt;
        None
    }

    /// Returns the attempt's headers, where the layer writes the attempt number when the policy
    /// names an [`attempt_header`](super::RetryPolicyBuilder::attempt_header). `None` when
    /// the attempt type has none.
    fn attempt_headers_mut<'a>(&self, attempt: &'a mut Self::Attempt) -> Option<&'a mut HeaderMap> {
        let _ = attempt;
        None
    }
}

/// Replays `http::Request<B>` whose body is `Clone` (`Full<Bytes>`, `String`, `Vec<u8>`,
/// `Bytes` and similar), with RFC 9110 method safety. The inner service receives the
/// request type unchanged.
///
/// `GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT` and `DELETE` are idempotent. Any other method,
/// `POST` and `PATCH` among them, is idempotent only when the request carries an
/// `Idempotency-Key` header. For bodies that are not `Clone`, use [`BodyReplay`].
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpReplay {
    all_idempotent: bool,
}

impl HttpReplay {
    /// Creates the HTTP replay.
    pub const fn new() -> Self {
        HttpReplay {
            all_idempotent: false,
        }
    }

    /// Treats every request as idempotent, whatever its method: for services whose `POST`
    /// endpoints are safe to repeat, such as gRPC methods that only read.
    pub const fn all_idempotent(mut self) -> Self {
        self.all_idempotent = true;
        self
    }
}

impl<B: Clone> Replay<Request<B>> for HttpReplay {
    type Attempt = Request<B>;
    type Source = Request<B>;

    fn first(&self, request: Request<B>, keep: bool) -> (Request<B>, Option<Request<B>>) {
        let copy = keep.then(|| copy_request(&request, request.body().clone()));
        (request, copy)
    }

    fn next(&self, source: &Request<B>) -> Result<Request<B>, SuppressReason> {
        Ok(copy_request(source, source.body().clone()))
    }

    fn is_idempotent(&self, request: &Request<B>) -> bool {
        self.all_idempotent || is_idempotent_request(request)
    }

    fn extensions_mut<'a>(&self, request: &'a mut Request<B>) -> Option<&'a mut http::Extensions> {
        Some(request.extensions_mut())
    }

    fn attempt_extensions_mut<'a>(
        &self,
        attempt: &'a mut Self::Attempt,
    ) -> Option<&'a mut http::Extensions> {
        Some(attempt.extensions_mut())
    }

    fn attempt_headers_mut<'a>(&self, attempt: &'a mut Self::Attempt) -> Option<&'a mut HeaderMap> {
        Some(attempt.headers_mut())
    }
}

/// Replays `http::Request<B>` for any body, streaming ones included, by wrapping it in a
/// [`ReplayBody`] that keeps up to `cap` bytes (default 64 KiB) for later attempts. The
/// inner service receives `http::Request<ReplayBody<B>>`. Method safety is as for
/// [`HttpReplay`].
///
/// A body whose `Content-Length` or size hint is over the cap is sent once and nothing of
/// it is kept. A body that grows past the cap while it streams is sent in
/// full by its first attempt and then cannot be sent again. In both cases a retry the
/// classifier requests is declined with [`SuppressReason::BodyTooLarge`].
///
/// The body must be `Unpin` (box a body that is not: `Box::pin(body)`), because the
/// caller's body moves between attempts when an attempt ends before reading all of it.
#[derive(Clone, Copy, Debug)]
pub struct BodyReplay {
    cap: usize,
    all_idempotent: bool,
}

impl BodyReplay {
    /// Keeps up to 64 KiB of each request body.
    pub const fn new() -> Self {
        BodyReplay {
            cap: 64 * 1024,
            all_idempotent: false,
        }
    }

    /// Treats every request as idempotent, whatever its method; see
    /// [`HttpReplay::all_idempotent`].
    pub const fn all_idempotent(mut self) -> Self {
        self.all_idempotent = true;
        self
    }

    /// Sets the most bytes of a body kept for later attempts.
    pub const fn cap(mut self, bytes: usize) -> Self {
        self.cap = bytes;
        self
    }
}

impl Default for BodyReplay {
    fn default() -> Self {
        BodyReplay::new()
    }
}

/// The request head and a handle on the kept body, from which [`BodyReplay`] makes
/// later attempts.
#[derive(Debug)]
pub struct BodySource<B> {
    head: Request<()>,
    /// `None` when the body was announced to be over the cap and is not kept.
    body: Option<ReplayBody<B>>,
}

impl<B> Replay<Request<B>> for BodyReplay
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Attempt = Request<ReplayBody<B>>;
    type Source = BodySource<B>;

    fn first(
        &self,
        request: Request<B>,
        keep: bool,
    ) -> (Request<ReplayBody<B>>, Option<BodySource<B>>) {
        let (parts, body) = request.into_parts();
        let head = Request::from_parts(parts, ());
        if !keep {
            return (rebuild(&head, ReplayBody::once(body)), None);
        }

        let announced = declared_length(&head)
            .unwrap_or(0)
            .max(body.size_hint().lower());
        let (body, kept) = if announced > self.cap as u64 {
            (ReplayBody::once(body), None)
        } else {
            let body = ReplayBody::kept(body, self.cap);
            let handle = body.handle();
            (body, Some(handle))
        };
        let attempt = rebuild(&head, body);
        (attempt, Some(BodySource { head, body: kept }))
    }

    fn next(&self, source: &BodySource<B>) -> Result<Request<ReplayBody<B>>, SuppressReason> {
        let Some(kept) = &source.body else {
            return Err(SuppressReason::BodyTooLarge);
        };
        match kept.replay() {
            Some(body) => Ok(rebuild(&source.head, body)),
            None if kept.is_unreplayable() => Err(SuppressReason::BodyTooLarge),
            None => Err(SuppressReason::NotReplayable),
        }
    }

    fn is_idempotent(&self, request: &Request<B>) -> bool {
        self.all_idempotent || is_idempotent_request(request)
    }

    fn extensions_mut<'a>(&self, request: &'a mut Request<B>) -> Option<&'a mut http::Extensions> {
        Some(request.extensions_mut())
    }

    fn attempt_extensions_mut<'a>(
        &self,
        attempt: &'a mut Self::Attempt,
    ) -> Option<&'a mut http::Extensions> {
        Some(attempt.extensions_mut())
    }

    fn attempt_headers_mut<'a>(&self, attempt: &'a mut Self::Attempt) -> Option<&'a mut HeaderMap> {
        Some(attempt.headers_mut())
    }
}

/// Returns the `Content-Length` the request declares, if valid.
fn declared_length(head: &Request<()>) -> Option<u64> {
    head.headers()
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A request with `head`'s method, URI, version, headers and extensions, and `body`.
fn rebuild<T>(head: &Request<()>, body: T) -> Request<T> {
    copy_request(head, body)
}

fn copy_request<T, U>(request: &Request<T>, body: U) -> Request<U> {
    let mut copy = Request::new(body);
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    copy
}

fn is_idempotent_request<B>(request: &Request<B>) -> bool {
    is_idempotent_method(request.method()) || request.headers().contains_key(IDEMPOTENCY_KEY)
}

/// Whether RFC 9110 defines the method as idempotent.
pub(crate) fn is_idempotent_method(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Replays `reqwest::Request` with [`try_clone`](reqwest::Request::try_clone), with the
/// method safety of `http::Request`. A request whose body cannot be cloned (a stream) is
/// sent once, and a retry is declined with [`SuppressReason::NotReplayable`].
///
/// A `reqwest::Request` has no public extensions, so the attempt number, per-request
/// overrides, metrics and the key mark of an [`IdempotencyKeyLayer`] below the retry
/// layer are not available: put the key layer above the retry layer.
///
/// [`IdempotencyKeyLayer`]: crate::IdempotencyKeyLayer
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
impl Replay<reqwest::Request> for HttpReplay {
    type Attempt = reqwest::Request;
    type Source = reqwest::Request;

    fn first(
        &self,
        request: reqwest::Request,
        keep: bool,
    ) -> (reqwest::Request, Option<reqwest::Request>) {
        let copy = if keep { request.try_clone() } else { None };
        (request, copy)
    }

    fn next(&self, source: &reqwest::Request) -> Result<reqwest::Request, SuppressReason> {
        source.try_clone().ok_or(SuppressReason::NotReplayable)
    }

    fn is_idempotent(&self, request: &reqwest::Request) -> bool {
        self.all_idempotent
            || is_idempotent_method(request.method())
            || request.headers().contains_key(IDEMPOTENCY_KEY)
    }

    fn attempt_headers_mut<'a>(
        &self,
        attempt: &'a mut reqwest::Request,
    ) -> Option<&'a mut HeaderMap> {
        Some(attempt.headers_mut())
    }
}

/// Replays any `Req: Clone` by cloning it, and treats every request as idempotent: the
/// classifier alone decides what is retried.
///
/// Such requests have no extensions, so a [`RetryMetricsLayer`](crate::RetryMetricsLayer)
/// above records one attempt per logical request: the per-attempt, backoff and suppressed
/// metrics need `http::Request` and [`HttpReplay`] or [`BodyReplay`].
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
    type Attempt = Req;
    type Source = Req;

    fn first(&self, request: Req, keep: bool) -> (Req, Option<Req>) {
        let copy = keep.then(|| request.clone());
        (request, copy)
    }

    fn next(&self, source: &Req) -> Result<Req, SuppressReason> {
        Ok(source.clone())
    }

    fn is_idempotent(&self, _request: &Req) -> bool {
        true
    }
}
