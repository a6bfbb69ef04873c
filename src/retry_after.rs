//! `Retry-After` parsing (RFC 9110, section 10.2.3).

use std::time::{Duration, SystemTime};

use http::HeaderValue;

/// Parses a `Retry-After` value into the delay it requests, measured from `now`.
///
/// Accepts delta-seconds and the three HTTP-date forms (IMF-fixdate, RFC 850 and
/// asctime). A negative number or a date in the past means no delay. Anything else
/// returns `None`, so a malformed header is ignored rather than trusted.
pub(crate) fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Some(seconds) = parse_delta_seconds(text) {
        return Some(seconds);
    }

    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses `1*DIGIT`, with a leading `-` read as "now". Values too large for a `u64`
/// saturate, because any such delay is beyond every configurable maximum.
fn parse_delta_seconds(text: &str) -> Option<Duration> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    if negative {
        return Some(Duration::ZERO);
    }

    let seconds = digits.parse::<u64>().unwrap_or(u64::MAX);
    Some(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &'static str, now: SystemTime) -> Option<Duration> {
        parse_retry_after(&HeaderValue::from_static(text), now)
    }

    #[test]
    fn delta_seconds() {
        let now = SystemTime::UNIX_EPOCH;
        assert_eq!(parse("0", now), Some(Duration::ZERO));
        assert_eq!(parse("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(parse("-3", now), Some(Duration::ZERO));
        assert_eq!(
            parse("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn http_date_forms() {
        // 1994-11-06 08:49:37 UTC, the example date of RFC 9110.
        let date = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        let now = date - Duration::from_secs(30);
        let expected = Some(Duration::from_secs(30));
        assert_eq!(parse("Sun, 06 Nov 1994 08:49:37 GMT", now), expected);
        assert_eq!(parse("Sunday, 06-Nov-94 08:49:37 GMT", now), expected);
        assert_eq!(parse("Sun Nov  6 08:49:37 1994", now), expected);
    }

    #[test]
    fn past_date_means_now() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777 + 60);
        assert_eq!(
            parse("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn garbage_is_ignored() {
        let now = SystemTime::UNIX_EPOCH;
        for text in [
            "",
            "soon",
            "1.5",
            "+3",
            "--1",
            "-",
            "12 s",
            "Sun, 32 Nov 1994",
        ] {
            assert_eq!(parse(text, now), None, "{text:?}");
        }
        let binary = HeaderValue::from_bytes(b"\xff\xfe").unwrap();
        assert_eq!(parse_retry_after(&binary, now), None);
    }
}
