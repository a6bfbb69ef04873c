//! Request fingerprints: what makes two requests with one key the same request.

use std::fmt;

use http::{Method, Uri};

/// A BLAKE3 digest of a request's method, path, query and body.
///
/// Two requests that share an idempotency key must have equal fingerprints, or the second
/// is rejected with `422`. Headers are not part of the fingerprint, because clients and
/// proxies change them between retries (`Date`, tracing headers, a refreshed token).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

/// The BLAKE3 key-derivation context, so these digests differ from any other use of
/// BLAKE3 over the same bytes.
const CONTEXT: &str = "tower-safe-retry 2026-01 idempotency request fingerprint v1";

impl Fingerprint {
    /// Computes the fingerprint of a request.
    ///
    /// Each field is prefixed with its length as a little-endian `u64`, so no two
    /// different requests hash the same bytes (`/a` + `b` and `/ab` + empty differ). An
    /// absent query and an empty query (`/path?`) also differ.
    pub fn compute(method: &Method, uri: &Uri, body: &[u8]) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key(CONTEXT);
        write_field(&mut hasher, method.as_str().as_bytes());
        write_field(&mut hasher, uri.path().as_bytes());
        match uri.query() {
            Some(query) => {
                hasher.update(&[1]);
                write_field(&mut hasher, query.as_bytes());
            }
            None => {
                hasher.update(&[0]);
            }
        }
        write_field(&mut hasher, body);

        Fingerprint(*hasher.finalize().as_bytes())
    }

    /// Creates a fingerprint from the digest bytes, as a store reads it back.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Fingerprint(bytes)
    }

    /// The digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

fn write_field(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    let length = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    hasher.update(&length.to_le_bytes());
    hasher.update(bytes);
}

impl fmt::Display for Fingerprint {
    /// Writes the digest in lowercase hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(method: Method, uri: &'static str, body: &[u8]) -> Fingerprint {
        Fingerprint::compute(&method, &Uri::from_static(uri), body)
    }

    #[test]
    fn equal_requests_match() {
        let first = fingerprint(Method::POST, "/charges?currency=eur", b"{\"amount\":5}");
        let second = fingerprint(Method::POST, "/charges?currency=eur", b"{\"amount\":5}");
        assert_eq!(first, second);
    }

    #[test]
    fn each_field_counts() {
        let base = fingerprint(Method::POST, "/charges?a=1", b"body");
        assert_ne!(base, fingerprint(Method::PATCH, "/charges?a=1", b"body"));
        assert_ne!(base, fingerprint(Method::POST, "/refunds?a=1", b"body"));
        assert_ne!(base, fingerprint(Method::POST, "/charges?a=2", b"body"));
        assert_ne!(base, fingerprint(Method::POST, "/charges?a=1", b"other"));
    }

    #[test]
    fn field_boundaries_count() {
        assert_ne!(
            fingerprint(Method::POST, "/a?b", b""),
            fingerprint(Method::POST, "/a?", b"b")
        );
        assert_ne!(
            fingerprint(Method::POST, "/a", b""),
            fingerprint(Method::POST, "/a?", b"")
        );
    }

    #[test]
    fn scheme_and_authority_ignored() {
        assert_eq!(
            fingerprint(Method::POST, "http://a.test/charges", b"x"),
            fingerprint(Method::POST, "/charges", b"x")
        );
    }

    #[test]
    fn display_is_hex() {
        let text = Fingerprint::from_bytes([0xab; 32]).to_string();
        assert_eq!(text, "ab".repeat(32));
    }
}
