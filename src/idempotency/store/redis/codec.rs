//! Decoding of script replies, and the binary encoding of a stored response's status
//! and headers (the `head` field).
//!
//! The `head` layout, integers big-endian: a format version byte (1), the status as `u16`, then for
//! each header in [`HeaderMap`] iteration order its name length as `u32`, the name, its
//! value length as `u32` and the value. Every value of a multi-value header is its own
//! entry, and values are raw bytes, so values that are not UTF-8 round-trip.

use std::error::Error;
use std::fmt;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use redis::Value;

use crate::idempotency::store::{Begin, StoreError, StoredResponse};

const VERSION: u8 = 1;

/// Encodes a status and headers as the `head` field.
pub(super) fn encode_head(status: StatusCode, headers: &HeaderMap) -> Vec<u8> {
    let size: usize = headers
        .iter()
        .map(|(name, value)| 8 + name.as_str().len() + value.len())
        .sum();
    let mut head = Vec::with_capacity(3 + size);
    head.push(VERSION);
    head.extend_from_slice(&status.as_u16().to_be_bytes());
    for (name, value) in headers {
        write_field(&mut head, name.as_str().as_bytes());
        write_field(&mut head, value.as_bytes());
    }
    head
}

/// Decodes a `head` field written by [`encode_head`].
pub(super) fn decode_head(mut head: &[u8]) -> Result<(StatusCode, HeaderMap), DecodeError> {
    let [version, rest @ ..] = head else {
        return Err(DecodeError("the record is empty"));
    };
    if *version != VERSION {
        return Err(DecodeError("the record has an unknown format version"));
    }
    head = rest;

    let status = take(&mut head, 2)?;
    let status = u16::from_be_bytes([status[0], status[1]]);
    let status =
        StatusCode::from_u16(status).map_err(|_| DecodeError("the stored status is invalid"))?;

    let mut headers = HeaderMap::new();
    while !head.is_empty() {
        let name = read_field(&mut head)?;
        let value = read_field(&mut head)?;
        let name = HeaderName::from_bytes(name)
            .map_err(|_| DecodeError("a stored header name is invalid"))?;
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| DecodeError("a stored header value is invalid"))?;
        headers.append(name, value);
    }

    Ok((status, headers))
}

/// Parses the reply of the `begin` script.
pub(super) fn parse_begin(reply: Value) -> Result<Begin, StoreError> {
    let invalid = || StoreError::backend(DecodeError::new("unexpected reply to the claim"));
    let Value::Array(items) = reply else {
        return Err(invalid());
    };
    let mut items = items.into_iter();
    let Some(Value::BulkString(state)) = items.next() else {
        return Err(invalid());
    };

    match (state.as_slice(), items.next(), items.next()) {
        (b"claimed", None, None) => Ok(Begin::Claimed),
        (b"mismatch", None, None) => Ok(Begin::Mismatch),
        (b"in_flight", Some(Value::Int(pttl)), None) => {
            // PTTL is -1 for a key without expiry, which the scripts never write.
            let expires_in = Duration::from_millis(u64::try_from(pttl).unwrap_or(0));
            Ok(Begin::InFlight { expires_in })
        }
        (b"completed", Some(Value::BulkString(head)), body) => {
            let (status, headers) = decode_head(&head).map_err(StoreError::backend)?;
            let body = match body {
                Some(Value::BulkString(body)) => Some(Bytes::from(body)),
                Some(Value::Nil) | None => None,
                Some(_) => return Err(invalid()),
            };
            Ok(Begin::Completed(StoredResponse {
                status,
                headers,
                body,
            }))
        }
        _ => Err(invalid()),
    }
}

fn write_field(head: &mut Vec<u8>, bytes: &[u8]) {
    // `HeaderMap` limits names and values far below 4 GiB, so the length fits in a u32.
    let length = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    head.extend_from_slice(&length.to_be_bytes());
    head.extend_from_slice(bytes);
}

fn read_field<'a>(head: &mut &'a [u8]) -> Result<&'a [u8], DecodeError> {
    let length = take(head, 4)?;
    let length = u32::from_be_bytes([length[0], length[1], length[2], length[3]]);
    let length = usize::try_from(length).map_err(|_| DecodeError("a stored field is too long"))?;
    take(head, length)
}

fn take<'a>(head: &mut &'a [u8], count: usize) -> Result<&'a [u8], DecodeError> {
    if head.len() < count {
        return Err(DecodeError("the record is truncated"));
    }
    let (taken, rest) = head.split_at(count);
    *head = rest;
    Ok(taken)
}

/// A stored record that this version cannot read: it is corrupt or written by a newer
/// format.
#[derive(Debug)]
pub(super) struct DecodeError(&'static str);

impl DecodeError {
    pub(super) fn new(reason: &'static str) -> Self {
        DecodeError(reason)
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid idempotency record in Redis: {}", self.0)
    }
}

impl Error for DecodeError {}

#[cfg(test)]
mod tests {
    use http::header::{CONTENT_TYPE, LINK};

    use super::*;

    #[test]
    fn head_round_trips() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.append(LINK, HeaderValue::from_static("</a>; rel=next"));
        headers.append(LINK, HeaderValue::from_static("</b>; rel=prev"));
        headers.insert("x-raw", HeaderValue::from_bytes(b"caf\xe9\x80").unwrap());

        let head = encode_head(StatusCode::CREATED, &headers);
        let (status, decoded) = decode_head(&head).unwrap();

        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(decoded, headers);
    }

    #[test]
    fn empty_headers_round_trip() {
        let head = encode_head(StatusCode::NO_CONTENT, &HeaderMap::new());
        let (status, decoded) = decode_head(&head).unwrap();

        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(decoded.is_empty());
    }

    #[test]
    fn corrupt_heads_rejected() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let head = encode_head(StatusCode::OK, &headers);

        assert!(decode_head(&[]).is_err());
        assert!(decode_head(&[2, 0, 200]).is_err());
        assert!(decode_head(&[VERSION, 0, 7]).is_err());
        assert!(decode_head(&head[..head.len() - 1]).is_err());
        let mut bad_name = head.clone();
        bad_name[7] = b' ';
        assert!(decode_head(&bad_name).is_err());
    }
}
