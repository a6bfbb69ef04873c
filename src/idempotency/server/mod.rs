//! The server side: each request with a given `Idempotency-Key` runs once, and every
//! retry gets the stored response.
//!
//! A missing key gets `400` and a key reused with another request gets `422`, as in the
//! IETF draft `draft-ietf-httpapi-idempotency-key-header-06`. A duplicate that arrives
//! while the first request runs gets `409` with `Retry-After`, which the
//! [`HttpClassifier`](crate::classify::HttpClassifier) of this crate retries.
//! [`Idempotency`] lists every case.

mod body;
mod future;
mod layer;
mod lease;
mod request;
mod run;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use self::layer::Config;
use self::request::{InvalidKey, parse_key};
use self::run::{Outcome, reject, run};
use super::problem::problem;
use super::store::IdempotencyStore;
use crate::BoxError;

pub use self::body::ResponseBody;
pub use self::future::ResponseFuture;
pub use self::layer::{DEFAULT_SCOPE_SECRET, IdempotencyLayer};

/// Runs each request with a given `Idempotency-Key` once and replays its response to
/// every retry.
///
/// Requests whose method is not in [`methods`](IdempotencyLayer::methods) (`POST` and
/// `PATCH` by default) pass through. For the others:
///
/// | request | response |
/// |---|---|
/// | no `Idempotency-Key` | passes through, or `400` when [`required`](IdempotencyLayer::required) |
/// | key repeated, empty, over 255 bytes or not visible ASCII | `400` |
/// | body over [`max_request_body`](IdempotencyLayer::max_request_body) | `413` |
/// | body that fails to read | `400` |
/// | first with its key | runs; a response below `500`, other than `408` and `429`, is stored |
/// | same key while the first runs | `409` with `Retry-After` |
/// | same key after the first completed | the stored response, with `Idempotent-Replayed: true` |
/// | same key, different method, path, query or body | `422` |
/// | the store fails to claim the key | `503` with `Retry-After`, or runs when [`fail_open`](IdempotencyLayer::fail_open) |
///
/// Every rejection has an `application/problem+json` body (RFC 9457). A key is accepted
/// bare or as an sf-string (`"abc"` is the key `abc`).
///
/// # Scope
///
/// Keys are stored per scope, so one caller never replays another's response. The
/// default scope is a keyed BLAKE3 digest of the `Authorization` header, or `anonymous`
/// without one; [`scope_with`](IdempotencyLayer::scope_with) replaces it.
///
/// Every caller without an `Authorization` header shares the `anonymous` scope. A service
/// that identifies callers another way (a session cookie, mutual TLS) must scope by that
/// identity with `scope_with`, or one caller who guesses another's key receives the other
/// caller's response.
///
/// # What is stored
///
/// The status, the headers without hop-by-hop headers and `Set-Cookie` (unless
/// [`store_set_cookie`](IdempotencyLayer::store_set_cookie)), and the body. Replays carry
/// the same status, headers and body bytes; a first execution has no
/// `Idempotent-Replayed` header.
///
/// The response body is buffered up to
/// [`max_response_body`](IdempotencyLayer::max_response_body) before it is sent, so a slow
/// stream reaches the first caller only when it ends or passes the cap. A larger body,
/// a body with trailers or a body that fails midway is sent to the first caller in full.
/// The request is then recorded as completed without a body, so a retry never runs a
/// processed request again. Its replay has the stored status and headers, an empty body
/// and `Content-Length: 0`.
///
/// # When the key is released
///
/// While the handler runs and its response body is buffered, the layer renews the claim
/// every third of the [`lock_ttl`](IdempotencyLayer::lock_ttl), so a slow request keeps
/// its key and a duplicate gets `409`.
///
/// A `5xx`, `408` or `429` response, an error from the inner service and a panic release
/// the key, so a retry runs the request again. After a panic, the unwinding continues.
/// `408` and `429` ask the client to try again later, so storing them would replay the
/// refusal to every retry. Dropping the response future (a client that disconnects)
/// while the store claims the key or while the inner service runs releases the key on a
/// task spawned on the current Tokio runtime. Dropping it after the inner service
/// returned stores the response on such a task, without the body when the body was not
/// yet buffered. Outside a runtime the claim stays until the lock TTL
/// expires.
///
/// When the store fails to store the response of a processed request, the caller still
/// gets the response, and a task on the current runtime stores it again every third of
/// the lock TTL, renewing the claim between tries, until the store accepts it or the
/// replay TTL passes. Until then duplicates get `409`, so a store outage delays replays
/// but does not run the request twice; only a store that loses the claim itself (a Redis
/// failover, a restart without persistence) can.
///
/// # Store failures
///
/// When [`begin`](IdempotencyStore::begin) fails, the request is rejected with `503`, so
/// a failing store never makes a request run twice. When storing the response fails
/// after the request ran, the error is logged at ERROR with the key and the caller still
/// gets the response; a retry then gets `409` until the lock TTL expires, and runs the
/// request again after that.
///
/// # Body types
///
/// The request body is buffered (up to the limit) for the fingerprint and rebuilt with
/// `ReqBody::from(Bytes)`, which drops request trailers.
///
/// # Metrics and logs
///
/// Every request counts once in `idempotency_requests_total` with an `outcome` label:
/// `executed`, `replayed`, `in_flight`, `mismatch`, `invalid`, `store_error`,
/// `passed_through` or `too_large`. Replays and in-flight duplicates are logged at DEBUG,
/// store failures at WARN or ERROR.
pub struct Idempotency<S, St> {
    inner: S,
    store: Arc<St>,
    config: Arc<Config>,
}

impl<S, St> Idempotency<S, St> {
    /// Wraps `inner` with the defaults of [`IdempotencyLayer::new`].
    pub fn new(inner: S, store: St) -> Self {
        IdempotencyLayer::new(store).layer(inner)
    }

    fn from_parts(inner: S, store: Arc<St>, config: Arc<Config>) -> Self {
        Idempotency {
            inner,
            store,
            config,
        }
    }

    /// Returns a reference to the store.
    pub fn store(&self) -> &St {
        &self.store
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

    /// Calls the inner service without deduplication.
    fn pass_through<ReqBody, ResBody>(
        &mut self,
        request: Request<ReqBody>,
    ) -> ResponseFuture<ResBody, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        S::Future: Send + 'static,
    {
        Outcome::PassedThrough.count();
        let future = self.inner.call(request);
        ResponseFuture::new(async move {
            let response = future.await?;
            Ok(response.map(ResponseBody::inner))
        })
    }
}

impl<S: Clone, St> Clone for Idempotency<S, St> {
    fn clone(&self) -> Self {
        Idempotency {
            inner: self.inner.clone(),
            store: Arc::clone(&self.store),
            config: Arc::clone(&self.config),
        }
    }
}

impl<S: fmt::Debug, St: fmt::Debug> fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("store", &self.store)
            .field("config", &self.config)
            .finish()
    }
}

impl<S, St, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S, St>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if !self.config.methods.contains(request.method()) {
            return self.pass_through(request);
        }
        let key = match parse_key(request.headers()) {
            Ok(Some(key)) => key,
            Ok(None) if !self.config.required => return self.pass_through(request),
            Ok(None) => return invalid_key(InvalidKey::Missing),
            Err(invalid) => return invalid_key(invalid),
        };

        // The service that was polled ready runs the request; this one keeps a clone.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let store = Arc::clone(&self.store);
        let config = Arc::clone(&self.config);
        ResponseFuture::new(run(inner, store, config, request, key))
    }
}

fn invalid_key<B: Send + 'static, E: Send + 'static>(invalid: InvalidKey) -> ResponseFuture<B, E> {
    Outcome::Invalid.count();
    let response = reject(problem(StatusCode::BAD_REQUEST, invalid.message()));
    ResponseFuture::new(std::future::ready(Ok(response)))
}
