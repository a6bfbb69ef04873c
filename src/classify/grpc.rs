use std::time::Duration;

use http::{HeaderMap, StatusCode};

use super::{Classify, Decision, HttpClassifier, RetryReason};
use crate::BoxError;

/// The gRPC status `OK`.
const OK: u8 = 0;
/// The gRPC status `UNAVAILABLE`, the one code gRPC calls safe to retry by default.
const UNAVAILABLE: u8 = 14;

/// A classifier for gRPC over HTTP/2, read from the response headers.
///
/// | outcome | decision |
/// |---|---|
/// | HTTP status other than `200` | as [`HttpClassifier`] |
/// | `grpc-status: 0` (`OK`), or no `grpc-status` header | success |
/// | a `grpc-status` in the retryable set (default: 14, `UNAVAILABLE`) | retry, [`Grpc`](RetryReason::Grpc) |
/// | any other `grpc-status` | fail, [`Grpc`](RetryReason::Grpc) |
/// | transport errors | as [`HttpClassifier`] |
///
/// A retry honours `grpc-retry-pushback-ms` like `Retry-After`: the next attempt waits at
/// least that long. A negative or malformed pushback means the server requests no retry,
/// so the outcome fails, as gRPC's retry design specifies.
///
/// NOTE: a status sent in trailers (after a response body) is not visible when the
/// response arrives, so such a response classifies as a success. Servers send
/// trailers-only responses for errors, which carry the status in the headers.
///
/// gRPC calls are `POST` requests, which [`HttpReplay`](crate::retry::HttpReplay) does not
/// resend after they may have been processed; use
/// [`HttpReplay::all_idempotent`](crate::retry::HttpReplay::all_idempotent) for methods
/// that are safe to repeat.
#[derive(Clone, Copy, Debug)]
pub struct GrpcClassifier {
    /// One bit per retryable gRPC status code (0 to 16).
    retryable: u32,
}

impl GrpcClassifier {
    /// Retries `UNAVAILABLE` (14) only.
    pub const fn new() -> Self {
        GrpcClassifier {
            retryable: 1 << UNAVAILABLE,
        }
    }

    /// Sets the gRPC status codes that are retried. Codes above 16 are ignored.
    pub fn retryable_codes(mut self, codes: impl IntoIterator<Item = u8>) -> Self {
        self.retryable = codes
            .into_iter()
            .filter(|code| *code <= 16)
            .fold(0, |bits, code| bits | 1 << code);
        self
    }

    /// Classifies a response by its HTTP status and gRPC headers.
    pub fn classify_headers(&self, status: StatusCode, headers: &HeaderMap) -> Decision {
        if status != StatusCode::OK {
            return HttpClassifier::new().classify_status(status, headers);
        }
        let Some(code) = headers
            .get("grpc-status")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u8>().ok())
        else {
            return Decision::Success;
        };
        if code == OK {
            return Decision::Success;
        }
        if code > 16 || self.retryable & (1 << code) == 0 {
            return Decision::fail(RetryReason::Grpc);
        }

        match headers.get("grpc-retry-pushback-ms") {
            None => Decision::retry(RetryReason::Grpc),
            Some(value) => match parse_pushback(value.as_bytes()) {
                Some(after) => Decision::Retry {
                    reason: RetryReason::Grpc,
                    after: Some(after),
                },
                None => Decision::fail(RetryReason::Grpc),
            },
        }
    }
}

impl Default for GrpcClassifier {
    fn default() -> Self {
        GrpcClassifier::new()
    }
}

impl<B> Classify<http::Response<B>> for GrpcClassifier {
    fn classify(&self, outcome: Result<&http::Response<B>, &BoxError>) -> Decision {
        match outcome {
            Ok(response) => self.classify_headers(response.status(), response.headers()),
            Err(error) => HttpClassifier::new().classify_error(&**error),
        }
    }
}

/// Parses a non-negative pushback in milliseconds; `None` for a negative or malformed one.
fn parse_pushback(value: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    Some(Duration::from_millis(text.parse().unwrap_or(u64::MAX)))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn classify(status: u16, grpc: &[(&'static str, &'static str)]) -> Decision {
        let mut headers = HeaderMap::new();
        for (name, value) in grpc {
            headers.insert(*name, HeaderValue::from_static(value));
        }
        GrpcClassifier::new().classify_headers(StatusCode::from_u16(status).unwrap(), &headers)
    }

    #[test]
    fn status_codes() {
        assert_eq!(classify(200, &[]), Decision::Success);
        assert_eq!(classify(200, &[("grpc-status", "0")]), Decision::Success);
        let retry = Decision::retry(RetryReason::Grpc);
        assert_eq!(classify(200, &[("grpc-status", "14")]), retry);
        let fail = Decision::fail(RetryReason::Grpc);
        for code in ["1", "3", "4", "8", "13", "16", "17", "99"] {
            assert_eq!(classify(200, &[("grpc-status", code)]), fail, "{code}");
        }
        let unavailable = Decision::retry(RetryReason::ServerError);
        assert_eq!(classify(503, &[("grpc-status", "0")]), unavailable);
    }

    #[test]
    fn pushback() {
        let status = ("grpc-status", "14");
        let after = |ms| Decision::Retry {
            reason: RetryReason::Grpc,
            after: Some(Duration::from_millis(ms)),
        };
        assert_eq!(
            classify(200, &[status, ("grpc-retry-pushback-ms", "250")]),
            after(250)
        );
        assert_eq!(
            classify(200, &[status, ("grpc-retry-pushback-ms", "0")]),
            after(0)
        );
        let stop = Decision::fail(RetryReason::Grpc);
        for value in ["-1", "soon", "", "1.5"] {
            let decision = classify(200, &[status, ("grpc-retry-pushback-ms", value)]);
            assert_eq!(decision, stop, "{value:?}");
        }
    }

    #[test]
    fn retryable_codes_are_configurable() {
        let classifier = GrpcClassifier::new().retryable_codes([8, 10, 200]);
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from_static("8"));
        let decision = classifier.classify_headers(StatusCode::OK, &headers);
        assert_eq!(decision, Decision::retry(RetryReason::Grpc));
        headers.insert("grpc-status", HeaderValue::from_static("14"));
        let decision = classifier.classify_headers(StatusCode::OK, &headers);
        assert_eq!(decision, Decision::fail(RetryReason::Grpc));
    }
}
