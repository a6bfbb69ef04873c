//! Error responses of the server-side idempotency layer, as `application/problem+json`
//! (RFC 9457).

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};

const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

/// Builds a problem response whose body names no problem type beyond its status
/// (`"type": "about:blank"`), so the title is the status's reason phrase and `detail`
/// describes the failure.
///
/// `detail` is JSON-escaped. Callers pass fixed text and never the request's key or body.
pub(crate) fn problem(status: StatusCode, detail: &str) -> Response<Bytes> {
    let title = status.canonical_reason().unwrap_or("Error");
    let mut json = String::with_capacity(96 + detail.len());
    json.push_str("{\"type\":\"about:blank\",\"title\":");
    push_json_string(&mut json, title);
    let _ = write!(json, ",\"status\":{},\"detail\":", status.as_u16());
    push_json_string(&mut json, detail);
    json.push('}');

    let mut response = Response::new(Bytes::from(json));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, PROBLEM_JSON);
    response
}

/// Builds a problem response with `Retry-After` in whole seconds, rounded up.
pub(crate) fn problem_retry_after(
    status: StatusCode,
    detail: &str,
    retry_after: Duration,
) -> Response<Bytes> {
    let mut response = problem(status, detail);
    response
        .headers_mut()
        .insert(RETRY_AFTER, retry_after_value(retry_after));
    response
}

fn retry_after_value(delay: Duration) -> HeaderValue {
    let mut seconds = delay.as_secs();
    if delay.subsec_nanos() > 0 {
        seconds = seconds.saturating_add(1);
    }
    HeaderValue::from(seconds)
}

/// Appends `text` as a JSON string literal (RFC 8259, section 7).
fn push_json_string(json: &mut String, text: &str) {
    json.push('"');
    for character in text.chars() {
        match character {
            '"' => json.push_str("\\\""),
            '\\' => json.push_str("\\\\"),
            '\n' => json.push_str("\\n"),
            '\r' => json.push_str("\\r"),
            '\t' => json.push_str("\\t"),
            control if u32::from(control) < 0x20 => {
                let _ = write!(json, "\\u{:04x}", u32::from(control));
            }
            other => json.push(other),
        }
    }
    json.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_problem_json() {
        let response = problem(StatusCode::CONFLICT, "A request with this key is running.");
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
        assert_eq!(
            response.body(),
            "{\"type\":\"about:blank\",\"title\":\"Conflict\",\"status\":409,\
             \"detail\":\"A request with this key is running.\"}"
        );
    }

    #[test]
    fn detail_is_escaped() {
        let response = problem(StatusCode::BAD_REQUEST, "a\"b\\c\n\u{1}");
        let body = std::str::from_utf8(response.body()).unwrap();
        assert!(
            body.ends_with("\"detail\":\"a\\\"b\\\\c\\n\\u0001\"}"),
            "{body}"
        );
    }

    #[test]
    fn retry_after_rounds_up() {
        let cases = [
            (Duration::ZERO, "0"),
            (Duration::from_millis(1), "1"),
            (Duration::from_secs(1), "1"),
            (Duration::from_millis(1500), "2"),
        ];
        for (delay, expected) in cases {
            let response = problem_retry_after(StatusCode::CONFLICT, "x", delay);
            assert_eq!(response.headers()[RETRY_AFTER], expected, "{delay:?}");
        }
    }
}
