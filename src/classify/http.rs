use std::error::Error;
use std::io;
use std::time::SystemTime;

use http::{HeaderMap, StatusCode, header::RETRY_AFTER};

use super::{Classify, Decision, RetryReason};
use crate::BoxError;
use crate::retry::{AttemptTimeout, DeadlineExceeded};
use crate::retry_after::parse_retry_after;

/// The default classifier for HTTP: RFC 9110 statuses and the transport errors of hyper,
/// hyper-util, tower and the standard library.
///
/// | outcome | decision |
/// |---|---|
/// | `1xx`, `2xx`, `3xx` | success |
/// | `408` | retry, [`RequestTimeout`](RetryReason::RequestTimeout) |
/// | `409` with a valid `Retry-After` | retry after it, [`Conflict`](RetryReason::Conflict) |
/// | `429` | retry, after `Retry-After` if valid, [`TooManyRequests`](RetryReason::TooManyRequests) |
/// | other `4xx` | fail, [`ClientError`](RetryReason::ClientError) |
/// | `500`, `502`, `504` | retry, [`ServerError`](RetryReason::ServerError) |
/// | `503` | retry, after `Retry-After` if valid, [`ServerError`](RetryReason::ServerError) |
/// | other `5xx` (`501`, `505`, `511`, ...) | fail, [`ServerError`](RetryReason::ServerError) |
/// | connect error, connection refused | retry, [`Connect`](RetryReason::Connect) |
/// | connection closed or reset before the response, HTTP/2 `GOAWAY` or stream reset | retry, [`Reset`](RetryReason::Reset) |
/// | HTTP/2 stream refused with `REFUSED_STREAM` (feature `http2`) | retry, [`RefusedStream`](RetryReason::RefusedStream) |
/// | per-attempt timeout, deadline, hyper or tower timeout | retry, [`Timeout`](RetryReason::Timeout) |
/// | any other error | retry, [`Unknown`](RetryReason::Unknown) |
///
/// A `409` is retried only with `Retry-After` because that is how an idempotency layer
/// (this crate's [`IdempotencyLayer`](crate::IdempotencyLayer) among them) responds to a
/// duplicate that arrives while the first request is still running; a plain `409` is a
/// conflict another attempt will not fix.
///
/// Errors are placed by walking the [`source`](Error::source) chain and downcasting each
/// link. Whether a retry is then allowed for a `POST` or `PATCH` depends on
/// [`RetryReason::proves_not_processed`] and the request's `Idempotency-Key`.
///
/// A `GOAWAY` classifies as [`Reset`](RetryReason::Reset), not as proof that the request
/// was not processed: h2 0.4 reports it to the streams above the `GOAWAY`'s last stream
/// id, but also keeps it as the connection's error, which an accepted stream that fails
/// later may carry.
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpClassifier {
    _private: (),
}

impl HttpClassifier {
    /// Creates the default HTTP classifier.
    pub const fn new() -> Self {
        HttpClassifier { _private: () }
    }

    /// Classifies a response by its status and headers.
    pub fn classify_status(&self, status: StatusCode, headers: &HeaderMap) -> Decision {
        let retry_after = || {
            headers
                .get(RETRY_AFTER)
                .and_then(|value| parse_retry_after(value, SystemTime::now()))
        };

        match status.as_u16() {
            100..=399 => Decision::Success,
            408 => Decision::retry(RetryReason::RequestTimeout),
            409 => match retry_after() {
                Some(after) => Decision::Retry {
                    reason: RetryReason::Conflict,
                    after: Some(after),
                },
                None => Decision::fail(RetryReason::ClientError),
            },
            429 => Decision::Retry {
                reason: RetryReason::TooManyRequests,
                after: retry_after(),
            },
            500 | 502 | 504 => Decision::retry(RetryReason::ServerError),
            503 => Decision::Retry {
                reason: RetryReason::ServerError,
                after: retry_after(),
            },
            400..=499 => Decision::fail(RetryReason::ClientError),
            _ => Decision::fail(RetryReason::ServerError),
        }
    }

    /// Classifies an error by the first link of its source chain that it recognises.
    pub fn classify_error(&self, error: &(dyn Error + 'static)) -> Decision {
        let mut link = Some(error);
        while let Some(error) = link {
            if let Some(reason) = reason_of(error) {
                return Decision::retry(reason);
            }
            link = error.source();
        }

        Decision::retry(RetryReason::Unknown)
    }
}

impl<B> Classify<http::Response<B>> for HttpClassifier {
    fn classify(&self, outcome: Result<&http::Response<B>, &BoxError>) -> Decision {
        match outcome {
            Ok(response) => self.classify_status(response.status(), response.headers()),
            Err(error) => self.classify_error(&**error),
        }
    }
}

#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
impl Classify<reqwest::Response> for HttpClassifier {
    fn classify(&self, outcome: Result<&reqwest::Response, &BoxError>) -> Decision {
        match outcome {
            Ok(response) => self.classify_status(response.status(), response.headers()),
            Err(error) => self.classify_error(&**error),
        }
    }
}

/// Places one link of an error chain, or returns `None` to look at its source.
fn reason_of(error: &(dyn Error + 'static)) -> Option<RetryReason> {
    if error.is::<AttemptTimeout>()
        || error.is::<DeadlineExceeded>()
        || error.is::<tower::timeout::error::Elapsed>()
    {
        return Some(RetryReason::Timeout);
    }

    #[cfg(feature = "reqwest")]
    if let Some(error) = error.downcast_ref::<reqwest::Error>() {
        if error.is_connect() {
            return Some(RetryReason::Connect);
        }
        if error.is_timeout() {
            return Some(RetryReason::Timeout);
        }
        // Otherwise the source chain (hyper's error, an `io::Error`) shows more.
        return None;
    }

    #[cfg(feature = "http2")]
    if let Some(error) = error.downcast_ref::<h2::Error>() {
        // Only a stream reset by the server with REFUSED_STREAM proves it was not
        // processed. A GOAWAY error may also reach a stream the server had accepted.
        if error.is_reset() && error.is_remote() {
            let refused = error.reason() == Some(h2::Reason::REFUSED_STREAM);
            return Some(if refused {
                RetryReason::RefusedStream
            } else {
                RetryReason::Reset
            });
        }
        if error.is_go_away() || error.is_reset() {
            return Some(RetryReason::Reset);
        }
        return None;
    }

    if let Some(error) = error.downcast_ref::<hyper_util::client::legacy::Error>() {
        return error.is_connect().then_some(RetryReason::Connect);
    }

    if let Some(error) = error.downcast_ref::<hyper::Error>() {
        if error.is_timeout() {
            return Some(RetryReason::Timeout);
        }
        if error.is_incomplete_message() || error.is_canceled() || error.is_closed() {
            return Some(RetryReason::Reset);
        }
        if error.is_body_write_aborted() || error.is_user() {
            return Some(RetryReason::Body);
        }
        return None;
    }

    if let Some(error) = error.downcast_ref::<io::Error>() {
        return match error.kind() {
            io::ErrorKind::ConnectionRefused => Some(RetryReason::Connect),
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof => Some(RetryReason::Reset),
            io::ErrorKind::TimedOut => Some(RetryReason::Timeout),
            _ => None,
        };
    }

    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::time::Duration;

    fn classify(status: u16, retry_after: Option<&'static str>) -> Decision {
        let mut headers = HeaderMap::new();
        if let Some(value) = retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from_static(value));
        }
        let status = StatusCode::from_u16(status).unwrap();
        HttpClassifier::new().classify_status(status, &headers)
    }

    #[test]
    fn status_table() {
        for status in [100, 200, 201, 204, 301, 304, 399] {
            assert_eq!(classify(status, None), Decision::Success, "{status}");
        }
        for status in [500, 502, 504] {
            let expected = Decision::retry(RetryReason::ServerError);
            assert_eq!(classify(status, None), expected, "{status}");
        }
        for status in [501, 505, 511, 599] {
            let expected = Decision::fail(RetryReason::ServerError);
            assert_eq!(classify(status, None), expected, "{status}");
        }
        for status in [400, 401, 403, 404, 409, 410, 422, 451] {
            let expected = Decision::fail(RetryReason::ClientError);
            assert_eq!(classify(status, None), expected, "{status}");
        }
        let expected = Decision::retry(RetryReason::RequestTimeout);
        assert_eq!(classify(408, None), expected);
    }

    #[test]
    fn retry_after_on_429_503_409() {
        let after = |reason| Decision::Retry {
            reason,
            after: Some(Duration::from_secs(2)),
        };
        assert_eq!(
            classify(429, Some("2")),
            after(RetryReason::TooManyRequests)
        );
        assert_eq!(classify(503, Some("2")), after(RetryReason::ServerError));
        assert_eq!(classify(409, Some("2")), after(RetryReason::Conflict));
        assert_eq!(
            classify(429, Some("soon")),
            Decision::retry(RetryReason::TooManyRequests)
        );
        assert_eq!(
            classify(500, Some("2")),
            Decision::retry(RetryReason::ServerError)
        );
    }

    #[test]
    fn io_errors_by_kind() {
        let cases = [
            (io::ErrorKind::ConnectionRefused, RetryReason::Connect),
            (io::ErrorKind::ConnectionReset, RetryReason::Reset),
            (io::ErrorKind::BrokenPipe, RetryReason::Reset),
            (io::ErrorKind::UnexpectedEof, RetryReason::Reset),
            (io::ErrorKind::TimedOut, RetryReason::Timeout),
            (io::ErrorKind::PermissionDenied, RetryReason::Unknown),
        ];
        for (kind, reason) in cases {
            let error: BoxError = Box::new(io::Error::from(kind));
            let decision = HttpClassifier::new().classify_error(&*error);
            assert_eq!(decision, Decision::retry(reason), "{kind:?}");
        }
    }

    #[test]
    fn walks_source_chain() {
        #[derive(Debug)]
        struct Wrapper(io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl Error for Wrapper {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                Some(&self.0)
            }
        }

        let error = Wrapper(io::Error::from(io::ErrorKind::ConnectionRefused));
        let decision = HttpClassifier::new().classify_error(&error);
        assert_eq!(decision, Decision::retry(RetryReason::Connect));
    }
}
