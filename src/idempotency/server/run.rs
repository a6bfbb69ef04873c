//! One request through the server-side idempotency layer, after its key was parsed.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::CONTENT_LENGTH;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use tower_service::Service;

use super::ResponseBody;
use super::body::{Buffered, buffer_body};
use super::layer::Config;
use super::lease::{Lease, OnDrop};
use super::request::{ReadError, read_body, scope, storable_headers};
use crate::BoxError;
use crate::idempotency::problem::{problem, problem_retry_after};
use crate::idempotency::store::{Begin, IdempotencyStore, OwnerToken, RecordKey, StoredResponse};
use crate::idempotency::{Fingerprint, IDEMPOTENT_REPLAYED};
use crate::metrics::names::IDEMPOTENCY_REQUESTS_TOTAL;

/// The outcome of a request in the layer, counted as the `outcome` label of
/// `idempotency_requests_total`.
#[derive(Clone, Copy, Debug)]
pub(super) enum Outcome {
    Executed,
    Replayed,
    InFlight,
    Mismatch,
    Invalid,
    StoreError,
    PassedThrough,
    TooLarge,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Executed => "executed",
            Outcome::Replayed => "replayed",
            Outcome::InFlight => "in_flight",
            Outcome::Mismatch => "mismatch",
            Outcome::Invalid => "invalid",
            Outcome::StoreError => "store_error",
            Outcome::PassedThrough => "passed_through",
            Outcome::TooLarge => "too_large",
        }
    }

    pub(super) fn count(self) {
        metrics::counter!(IDEMPOTENCY_REQUESTS_TOTAL, "outcome" => self.as_str()).increment(1);
    }
}

/// How often a duplicate waiting for the first request queries the store again.
const WAIT_POLL: Duration = Duration::from_millis(50);

/// Converts a problem response to the layer's response type.
pub(super) fn reject<B>(response: Response<Bytes>) -> Response<ResponseBody<B>> {
    response.map(ResponseBody::full)
}

/// Buffers the body, claims the key and runs, replays or rejects the request.
pub(super) async fn run<S, St, ReqBody, ResBody>(
    mut inner: S,
    store: Arc<St>,
    config: Arc<Config>,
    request: Request<ReqBody>,
    key: String,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    St: IdempotencyStore,
    ReqBody: Body + From<Bytes>,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    let (parts, body) = request.into_parts();
    let bytes = match read_body(body, config.max_request_body).await {
        Ok(bytes) => bytes,
        Err(ReadError::TooLarge) => {
            Outcome::TooLarge.count();
            let detail = format!(
                "The request body is larger than {} bytes, the limit for requests with an \
                 Idempotency-Key.",
                config.max_request_body
            );
            return Ok(reject(problem(StatusCode::PAYLOAD_TOO_LARGE, &detail)));
        }
        Err(ReadError::Body(error)) => {
            Outcome::Invalid.count();
            tracing::debug!(error = &*error, "failed to read the request body");
            let detail = "The request body could not be read.";
            return Ok(reject(problem(StatusCode::BAD_REQUEST, detail)));
        }
    };

    let record_key = RecordKey::new(scope(&config, &parts), key);
    let fingerprint = Fingerprint::compute(&parts.method, &parts.uri, &bytes);
    let request = Request::from_parts(parts, ReqBody::from(bytes));
    let mut lease = Lease::new(
        store,
        record_key,
        OwnerToken::generate(),
        config.lock_ttl,
        config.replay_ttl,
    );

    // The lease exists before `begin` returns, so a future dropped while a remote store
    // replies still releases a claim that the store made.
    let wait_until = config.wait_in_flight.map(|wait| Instant::now() + wait);
    let begin = loop {
        let begin = lease.begin(&fingerprint).await;
        if !matches!(begin, Ok(Begin::Claimed)) {
            lease.disarm();
        }
        let now = Instant::now();
        match (&begin, wait_until) {
            (Ok(Begin::InFlight { .. }), Some(until)) if now < until => {
                tokio::time::sleep(WAIT_POLL.min(until - now)).await;
                lease.rearm();
            }
            _ => break begin,
        }
    };
    let record_key = lease.key().clone();
    match begin {
        Ok(Begin::Claimed) => execute(inner, lease, &config, request).await,
        Ok(Begin::InFlight { expires_in }) => {
            Outcome::InFlight.count();
            tracing::debug!(
                key = record_key.key(),
                ?expires_in,
                "idempotency key in flight"
            );
            let detail = "A request with this Idempotency-Key is still being processed. \
                          Retry after the delay in Retry-After.";
            let response = problem_retry_after(StatusCode::CONFLICT, detail, config.retry_after);
            Ok(reject(response))
        }
        Ok(Begin::Completed(stored)) => {
            Outcome::Replayed.count();
            tracing::debug!(key = record_key.key(), status = %stored.status, "replaying response");
            Ok(replay(stored))
        }
        Ok(Begin::Mismatch) => {
            Outcome::Mismatch.count();
            let detail = "This Idempotency-Key was used for a request with a different method, \
                          path, query or body. Use a new key for a new request.";
            Ok(reject(problem(StatusCode::UNPROCESSABLE_ENTITY, detail)))
        }
        Err(error) => {
            Outcome::StoreError.count();
            if config.fail_open {
                tracing::warn!(
                    key = record_key.key(),
                    error = &error as &dyn std::error::Error,
                    "idempotency store failed to claim the key, running the request unprotected \
                     because the layer fails open"
                );
                let response = inner.call(request).await?;
                return Ok(response.map(ResponseBody::inner));
            }

            tracing::warn!(
                key = record_key.key(),
                error = &error as &dyn std::error::Error,
                "idempotency store failed to claim the key, rejecting the request with 503"
            );
            let detail = "The idempotency store is unavailable, so the request was not processed. \
                          Retry after the delay in Retry-After.";
            let response =
                problem_retry_after(StatusCode::SERVICE_UNAVAILABLE, detail, config.retry_after);
            Ok(reject(response))
        }
    }
}

/// Runs the request under a claim, then stores its response or releases the key.
async fn execute<S, St, ReqBody, ResBody>(
    mut inner: S,
    mut lease: Lease<St>,
    config: &Config,
    request: Request<ReqBody>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    St: IdempotencyStore,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    Outcome::Executed.count();
    let call = AssertUnwindSafe(async { inner.call(request).await }).catch_unwind();
    let result = lease.renew_while(call).await;
    let response = match result {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            lease.release().await;
            return Err(error);
        }
        Err(panic) => {
            lease.release().await;
            std::panic::resume_unwind(panic);
        }
    };
    if releases_key(response.status()) {
        lease.release().await;
        return Ok(response.map(ResponseBody::inner));
    }

    // From here on the request has been processed, so a dropped future must not free the
    // key. It records the completion without a body instead.
    let (parts, body) = response.into_parts();
    let headers = storable_headers(&parts.headers, config.store_set_cookie);
    lease.on_drop = Some(OnDrop::Complete(StoredResponse {
        status: parts.status,
        headers: headers.clone(),
        body: None,
    }));

    let buffered = lease
        .renew_while(buffer_body(body, config.max_response_body))
        .await;
    let (stored_body, body) = match buffered {
        Buffered::Complete(bytes) => (Some(bytes.clone()), ResponseBody::full(bytes)),
        Buffered::Partial(body) => (None, body),
    };
    let stored = StoredResponse {
        status: parts.status,
        headers,
        body: stored_body,
    };
    lease.complete(stored).await;
    Ok(Response::from_parts(parts, body))
}

/// Returns whether a response leaves the request unprocessed, so the key is released for a retry
/// instead of storing the response: a `5xx`, and `408` and `429`, which ask the client to
/// send the request again later. Storing a `429` would replay it to every retry.
fn releases_key(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// Builds a replay: the stored status, headers and body, marked `Idempotent-Replayed`.
fn replay<B>(stored: StoredResponse) -> Response<ResponseBody<B>> {
    let has_body = stored.body.is_some();
    let mut response = Response::new(ResponseBody::full(stored.body.unwrap_or_default()));
    *response.status_mut() = stored.status;
    *response.headers_mut() = stored.headers;

    let headers = response.headers_mut();
    if !has_body {
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    }
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}
