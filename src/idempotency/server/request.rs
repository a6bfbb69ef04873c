//! Reading a request: its key, its scope and its body.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, AUTHORIZATION};
use http::request::Parts;
use http::{HeaderMap, HeaderName};
use http_body::Body;
use http_body_util::BodyExt;

use super::layer::{Config, Scope};
use crate::BoxError;
use crate::idempotency::IDEMPOTENCY_KEY;

/// The maximum key length in bytes, after removing sf-string quotes.
pub(super) const MAX_KEY_LENGTH: usize = 255;

/// The scope of requests without an `Authorization` header, or with an empty one.
const ANONYMOUS_SCOPE: &str = "anonymous";

/// The reason an `Idempotency-Key` header was rejected. Its message is the problem detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum InvalidKey {
    Missing,
    Repeated,
    Empty,
    TooLong,
    InvalidCharacter,
    InvalidQuoting,
}

impl InvalidKey {
    pub(super) fn message(self) -> &'static str {
        match self {
            InvalidKey::Missing => "The Idempotency-Key header is required for this request.",
            InvalidKey::Repeated => "The Idempotency-Key header must appear once.",
            InvalidKey::Empty => "The Idempotency-Key header is empty.",
            InvalidKey::TooLong => "The Idempotency-Key header is longer than 255 bytes.",
            InvalidKey::InvalidCharacter => {
                "The Idempotency-Key header may contain only visible ASCII characters."
            }
            InvalidKey::InvalidQuoting => {
                "The Idempotency-Key header starts with a quote but is not a valid sf-string."
            }
        }
    }
}

/// Parses the `Idempotency-Key` header: `Ok(None)` when it is absent.
///
/// The key is a Structured Field string (RFC 8941, section 3.3.3) in the IETF draft, but
/// clients often send it bare, so `"abc"` and `abc` are the same key. After unquoting it
/// must be 1 to 255 bytes of visible ASCII (`!` to `~`).
pub(super) fn parse_key(headers: &HeaderMap) -> Result<Option<String>, InvalidKey> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(InvalidKey::Repeated);
    }

    let bytes = value.as_bytes();
    let key = match bytes.first() {
        Some(b'"') => unquote(bytes)?,
        _ => bytes.to_vec(),
    };
    if key.is_empty() {
        return Err(InvalidKey::Empty);
    }
    if key.len() > MAX_KEY_LENGTH {
        return Err(InvalidKey::TooLong);
    }
    if !key.iter().all(|byte| (b'!'..=b'~').contains(byte)) {
        return Err(InvalidKey::InvalidCharacter);
    }

    let key = String::from_utf8(key).expect("visible ASCII is valid UTF-8");
    Ok(Some(key))
}

/// Removes sf-string quotes and resolves its `\"` and `\\` escapes.
fn unquote(bytes: &[u8]) -> Result<Vec<u8>, InvalidKey> {
    let inner = match bytes {
        [b'"', inner @ .., b'"'] if bytes.len() >= 2 => inner,
        _ => return Err(InvalidKey::InvalidQuoting),
    };

    let mut key = Vec::with_capacity(inner.len());
    let mut escaped = false;
    for &byte in inner {
        if escaped {
            if byte != b'"' && byte != b'\\' {
                return Err(InvalidKey::InvalidQuoting);
            }
            key.push(byte);
            escaped = false;
        } else if byte == b'\\' {
            escaped = true;
        } else if byte == b'"' {
            return Err(InvalidKey::InvalidQuoting);
        } else {
            key.push(byte);
        }
    }
    if escaped {
        return Err(InvalidKey::InvalidQuoting);
    }
    Ok(key)
}

/// Computes the scope of a request by the layer's configuration.
pub(super) fn scope(config: &Config, parts: &Parts) -> String {
    match &config.scope {
        Scope::Custom(scope) => scope(parts),
        Scope::Authorization { secret } => authorization_scope(secret, &parts.headers),
    }
}

/// Computes the keyed BLAKE3 digest of every `Authorization` value, in hex. Each value is
/// prefixed with its length, so two headers never hash like one longer header.
fn authorization_scope(secret: &[u8; 32], headers: &HeaderMap) -> String {
    let mut values = headers
        .get_all(AUTHORIZATION)
        .iter()
        .filter(|value| !value.is_empty())
        .peekable();
    if values.peek().is_none() {
        return ANONYMOUS_SCOPE.to_owned();
    }

    let mut hasher = blake3::Hasher::new_keyed(secret);
    for value in values {
        let length = u64::try_from(value.len()).unwrap_or(u64::MAX);
        hasher.update(&length.to_le_bytes());
        hasher.update(value.as_bytes());
    }
    hasher.finalize().to_hex().to_string()
}

/// The reason a request body could not be buffered.
pub(super) enum ReadError {
    TooLarge,
    Body(BoxError),
}

/// Buffers a request body of at most `max` bytes. Trailers are dropped.
pub(super) async fn read_body<B>(body: B, max: usize) -> Result<Bytes, ReadError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let declared = body.size_hint().lower();
    if usize::try_from(declared).map_or(true, |declared| declared > max) {
        return Err(ReadError::TooLarge);
    }

    let mut body = std::pin::pin!(body);
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| ReadError::Body(error.into()))?;
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        if buffer.len() + data.remaining() > max {
            return Err(ReadError::TooLarge);
        }
        buffer.put(&mut data);
    }
    Ok(buffer.freeze())
}

/// Hop-by-hop headers (RFC 9110, section 7.6.1), which describe one connection and must
/// not be replayed on another.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Copies the response headers that are stored for replay: all but hop-by-hop headers
/// (the list above, `Keep-Alive`, `Proxy-*` and every header that `Connection` names)
/// and, unless `store_set_cookie`, `Set-Cookie`.
pub(super) fn storable_headers(headers: &HeaderMap, store_set_cookie: bool) -> HeaderMap {
    let connection_options = connection_options(headers);
    let mut stored = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let hop_by_hop = HOP_BY_HOP.contains(name)
            || name.as_str() == "keep-alive"
            || name.as_str().starts_with("proxy-")
            || connection_options.contains(name);
        let cookie = name == header::SET_COOKIE && !store_set_cookie;
        if !hop_by_hop && !cookie {
            stored.append(name.clone(), value.clone());
        }
    }
    stored
}

/// Returns the header names listed in `Connection`, which RFC 9110, section 7.6.1, makes
/// hop-by-hop. Tokens that are not valid header names are skipped.
fn connection_options(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn parse(values: &[&[u8]]) -> Result<Option<String>, InvalidKey> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(IDEMPOTENCY_KEY, HeaderValue::from_bytes(value).unwrap());
        }
        parse_key(&headers)
    }

    #[test]
    fn keys_bare_and_quoted() {
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(parse(&[b"abc"]), Ok(Some("abc".to_owned())));
        assert_eq!(parse(&[b"\"abc\""]), Ok(Some("abc".to_owned())));
        assert_eq!(parse(&[b"\"a\\\"b\\\\c\""]), Ok(Some("a\"b\\c".to_owned())));
        let longest = "k".repeat(255);
        assert_eq!(parse(&[longest.as_bytes()]), Ok(Some(longest.clone())));
    }

    #[test]
    fn invalid_keys_rejected() {
        let too_long = "k".repeat(256);
        let cases: [(&[&[u8]], InvalidKey); 9] = [
            (&[b"a", b"b"], InvalidKey::Repeated),
            (&[b""], InvalidKey::Empty),
            (&[b"\"\""], InvalidKey::Empty),
            (&[too_long.as_bytes()], InvalidKey::TooLong),
            (&[b"a b"], InvalidKey::InvalidCharacter),
            (&[b"caf\xe9"], InvalidKey::InvalidCharacter),
            (&[b"\"abc"], InvalidKey::InvalidQuoting),
            (&[b"\"a\\nb\""], InvalidKey::InvalidQuoting),
            (&[b"\"a\"b\""], InvalidKey::InvalidQuoting),
        ];
        for (values, expected) in cases {
            assert_eq!(parse(values), Err(expected), "{values:?}");
        }
    }

    #[test]
    fn stored_headers_skip_hop_by_hop() {
        let mut headers = HeaderMap::new();
        for name in [
            "connection",
            "keep-alive",
            "proxy-authenticate",
            "te",
            "trailer",
        ] {
            headers.insert(name, HeaderValue::from_static("x"));
        }
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("upgrade", HeaderValue::from_static("h2c"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("x-request-id", HeaderValue::from_static("7"));

        let stored = storable_headers(&headers, false);
        assert_eq!(stored.len(), 1, "{stored:?}");
        assert_eq!(stored["x-request-id"], "7");

        let stored = storable_headers(&headers, true);
        assert_eq!(stored.len(), 2, "{stored:?}");
        assert_eq!(stored["set-cookie"], "a=1");
    }

    #[test]
    fn stored_headers_skip_connection_options() {
        let mut headers = HeaderMap::new();
        headers.append("connection", HeaderValue::from_static("X-Hop, keep-alive"));
        headers.append("connection", HeaderValue::from_static(" x-other "));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("x-other", HeaderValue::from_static("2"));
        headers.insert("x-end-to-end", HeaderValue::from_static("3"));

        let stored = storable_headers(&headers, false);
        assert!(!stored.contains_key("x-hop"), "{stored:?}");
        assert!(!stored.contains_key("x-other"), "{stored:?}");
        assert_eq!(stored["x-end-to-end"], "3");
        assert_eq!(stored.len(), 1, "{stored:?}");
    }

    #[test]
    fn scope_by_authorization() {
        let secret = [7; 32];
        let mut alice = HeaderMap::new();
        alice.insert(AUTHORIZATION, HeaderValue::from_static("Bearer alice"));
        let mut bob = HeaderMap::new();
        bob.insert(AUTHORIZATION, HeaderValue::from_static("Bearer bob"));
        let mut empty = HeaderMap::new();
        empty.insert(AUTHORIZATION, HeaderValue::from_static(""));

        let alice_scope = authorization_scope(&secret, &alice);
        assert_eq!(alice_scope.len(), 64);
        assert_ne!(alice_scope, authorization_scope(&secret, &bob));
        assert_ne!(alice_scope, authorization_scope(&[8; 32], &alice));
        assert_eq!(authorization_scope(&secret, &HeaderMap::new()), "anonymous");
        assert_eq!(authorization_scope(&secret, &empty), "anonymous");
    }
}
