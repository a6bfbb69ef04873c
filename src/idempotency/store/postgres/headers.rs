//! The `headers` column: a header map as bytes, so that repeated headers keep their order
//! and values that are not UTF-8 survive.
//!
//! The format is a version byte (1) followed by one entry per header value, in the map's
//! iteration order: the name's length as a big-endian `u32`, the name, the value's length
//! as a big-endian `u32`, the value.

use std::error::Error;
use std::fmt;

use http::{HeaderMap, HeaderName, HeaderValue};

const VERSION: u8 = 1;

/// Encodes `headers` in the column format.
pub(super) fn encode(headers: &HeaderMap) -> Vec<u8> {
    let size: usize = headers
        .iter()
        .map(|(name, value)| 8 + name.as_str().len() + value.len())
        .sum();
    let mut bytes = Vec::with_capacity(1 + size);
    bytes.push(VERSION);
    for (name, value) in headers {
        write_field(&mut bytes, name.as_str().as_bytes());
        write_field(&mut bytes, value.as_bytes());
    }
    bytes
}

fn write_field(bytes: &mut Vec<u8>, field: &[u8]) {
    // `HeaderMap` rejects names and values near 4 GiB long well before this could wrap.
    let length = u32::try_from(field.len()).expect("a header field is shorter than 4 GiB");
    bytes.extend_from_slice(&length.to_be_bytes());
    bytes.extend_from_slice(field);
}

/// Decodes the column format.
///
/// # Errors
///
/// A [`CorruptHeaders`] error when the bytes have another version, end inside an entry
/// or contain an invalid header name or value.
pub(super) fn decode(bytes: &[u8]) -> Result<HeaderMap, CorruptHeaders> {
    let Some((&version, mut rest)) = bytes.split_first() else {
        return Err(CorruptHeaders("the column is empty"));
    };
    if version != VERSION {
        return Err(CorruptHeaders("the format version is unknown"));
    }

    let mut headers = HeaderMap::new();
    while !rest.is_empty() {
        let name = read_field(&mut rest)?;
        let value = read_field(&mut rest)?;
        let name =
            HeaderName::from_bytes(name).map_err(|_| CorruptHeaders("a header name is invalid"))?;
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| CorruptHeaders("a header value is invalid"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

fn read_field<'a>(rest: &mut &'a [u8]) -> Result<&'a [u8], CorruptHeaders> {
    let truncated = CorruptHeaders("the column ends inside an entry");
    let (length, tail) = rest.split_first_chunk::<4>().ok_or(truncated.clone())?;
    let length = usize::try_from(u32::from_be_bytes(*length)).map_err(|_| truncated.clone())?;
    if tail.len() < length {
        return Err(truncated);
    }
    let (field, tail) = tail.split_at(length);
    *rest = tail;
    Ok(field)
}

/// The `headers` column of a stored record could not be decoded.
#[derive(Clone, Debug)]
pub(super) struct CorruptHeaders(&'static str);

impl fmt::Display for CorruptHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stored response headers are corrupt: {}", self.0)
    }
}

impl Error for CorruptHeaders {}

#[cfg(test)]
mod tests {
    use http::header::{CONTENT_TYPE, LINK};

    use super::*;

    #[test]
    fn round_trip_keeps_order_and_bytes() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.append(LINK, HeaderValue::from_static("</a>; rel=next"));
        headers.append(LINK, HeaderValue::from_static("</b>; rel=prev"));
        headers.insert("x-raw", HeaderValue::from_bytes(b"caf\xe9 \xff").unwrap());
        headers.insert("x-empty", HeaderValue::from_static(""));

        let decoded = decode(&encode(&headers)).unwrap();

        assert_eq!(decoded, headers);
        let links: Vec<_> = decoded.get_all(LINK).iter().collect();
        assert_eq!(links, ["</a>; rel=next", "</b>; rel=prev"]);
        assert_eq!(decoded["x-raw"].as_bytes(), b"caf\xe9 \xff");
    }

    #[test]
    fn empty_map_round_trips() {
        let encoded = encode(&HeaderMap::new());
        assert_eq!(encoded, [VERSION]);
        assert!(decode(&encoded).unwrap().is_empty());
    }

    #[test]
    fn corrupt_bytes_rejected() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let encoded = encode(&headers);

        assert!(decode(&[]).is_err());
        assert!(decode(&[2]).is_err());
        for end in 2..encoded.len() {
            assert!(decode(&encoded[..end]).is_err(), "truncated at {end}");
        }
        let mut bad_name = encoded.clone();
        bad_name[5] = b' ';
        assert!(decode(&bad_name).is_err());
        let mut bad_value = encoded;
        let last = bad_value.len() - 1;
        bad_value[last] = b'\n';
        assert!(decode(&bad_value).is_err());
    }
}
