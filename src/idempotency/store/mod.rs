//! Storage for the records of the server-side idempotency layer.
//!
//! A record moves through three states. [`begin`](IdempotencyStore::begin) claims an
//! absent key for one owner with a lease (the lock TTL). The owner then either
//! [`complete`](IdempotencyStore::complete)s it with the response, which is kept for the
//! replay TTL, or [`release`](IdempotencyStore::release)s it so the next request with the
//! key runs again. A claim whose lease expired may be taken over by a new owner.
//!
//! Every operation must be atomic per key. The trait is shaped for backends that can do
//! that in one round trip: Redis claims, completes and releases in Lua scripts that check
//! the owner token; PostgreSQL claims with `INSERT ... ON CONFLICT` on a unique
//! `(scope, key)` and checks the owner in the `WHERE` clause of an `UPDATE` or `DELETE`.
//!
//! # Choosing a store
//!
//! | store | shared by replicas | survives a restart | what can still go wrong |
//! |---|---|---|---|
//! | [`MemoryStore`] | no, one process | no | a restarted process loses every key, so a retry after a restart runs again |
//! | `RedisStore` (feature `redis`) | yes | with Redis persistence | a failover to a replica that had not yet received a claim (replication is asynchronous) lets a duplicate run; an eviction policy other than `noeviction` can drop records |
//! | `PostgresStore` (feature `postgres`) | yes | yes | a crash between the handler's effect and the completion lets a retry run again once the lease expires |
//!
//! For money, PostgreSQL in the same database as the effect is the strongest of the
//! three, because a synchronous commit does not lose a claim on failover. Redis is
//! the fastest shared store (one round trip for a replay, two for a first execution).
//! The memory store suits a single process and tests.
//!
//! # Sizing the TTLs
//!
//! - **Lock TTL** (default 60 s): how long a claim holds after its server stops renewing
//!   it. The layer renews it every third of the TTL while the handler runs, so it need not
//!   cover the slowest handler; it is the time a key stays locked after a crash, during
//!   which retries get `409`. Keep it well above a slow round trip to the store.
//! - **Replay TTL** (default 24 h): how long a response is replayed. It must exceed the
//!   longest time a client keeps retrying one logical request, or a late retry runs again.
//!   The store holds about `replay TTL × keyed requests per second × record size`.

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::Fingerprint;
use crate::BoxError;

pub use self::memory::MemoryStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use self::postgres::PostgresStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::RedisStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use deadpool_postgres;

/// Storage for idempotency records, shared by every replica of a server.
///
/// Implementations must make each method atomic for its key. Two concurrent
/// [`begin`](Self::begin) calls for one absent key return [`Begin::Claimed`] to exactly
/// one caller. [`complete`](Self::complete), [`release`](Self::release) and
/// [`renew`](Self::renew) change a record only while it is in flight and claimed by the
/// given owner (compare-and-set on the [`OwnerToken`]).
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` for `owner` with a lease of `lock_ttl`, or reports why it cannot.
    ///
    /// Returns [`Begin::Claimed`] when the key is absent, its replay TTL passed, or its
    /// claim's lease expired (a takeover). Otherwise returns [`Begin::Mismatch`] when the
    /// stored fingerprint differs from `fingerprint`, and [`Begin::InFlight`] or
    /// [`Begin::Completed`] by the record's state.
    ///
    /// # Errors
    ///
    /// A [`StoreError`] when the backend fails or has no room for a new record.
    fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lock_ttl: Duration,
    ) -> impl Future<Output = Result<Begin, StoreError>> + Send;

    /// Stores `response` for `key` and keeps it for `replay_ttl`, if the claim still
    /// belongs to `owner`.
    ///
    /// # Errors
    ///
    /// A stale-owner error ([`StoreError::is_stale_owner`]) when the key is not in flight
    /// for `owner`, for instance because the lease expired and another owner took it
    /// over. A backend error otherwise.
    fn complete(
        &self,
        key: &RecordKey,
        owner: &OwnerToken,
        response: StoredResponse,
        replay_ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes the claim on `key` if it belongs to `owner`, so the next request runs again.
    ///
    /// # Errors
    ///
    /// A stale-owner error when the key is not in flight for `owner`; a backend error
    /// otherwise.
    fn release(
        &self,
        key: &RecordKey,
        owner: &OwnerToken,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Extends the lease on `key` to `lock_ttl` from now if the claim belongs to `owner`.
    ///
    /// # Errors
    ///
    /// A stale-owner error when the key is not in flight for `owner`; a backend error
    /// otherwise.
    fn renew(
        &self,
        key: &RecordKey,
        owner: &OwnerToken,
        lock_ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The identity of a record: the caller's scope and the `Idempotency-Key` value.
///
/// Keys from different scopes never meet, so one caller can never replay another's
/// response.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RecordKey {
    scope: String,
    key: String,
}

impl RecordKey {
    /// Creates a record key.
    pub fn new(scope: impl Into<String>, key: impl Into<String>) -> Self {
        RecordKey {
            scope: scope.into(),
            key: key.into(),
        }
    }

    /// Returns the scope, by default a digest of the `Authorization` header.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// Returns the `Idempotency-Key` value, without sf-string quotes.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// A random token that identifies one claim on a key.
///
/// Each request that reaches [`IdempotencyStore::begin`] gets a new token, so a request
/// whose lease expired and was taken over cannot complete or release the new claim.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OwnerToken(String);

impl OwnerToken {
    /// Generates a token from 122 random bits (a UUID v4 in simple form).
    pub fn generate() -> Self {
        let mut buffer = uuid::Uuid::encode_buffer();
        let text = uuid::Uuid::new_v4().simple().encode_lower(&mut buffer);
        OwnerToken(text.to_owned())
    }

    /// Returns the token as 32 lowercase hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OwnerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The result of [`IdempotencyStore::begin`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Begin {
    /// The claim now belongs to the caller, which must run the request.
    Claimed,
    /// Another request with this key and fingerprint is running.
    InFlight {
        /// The time until that request's lease expires and the key may be taken over.
        expires_in: Duration,
    },
    /// A request with this key and fingerprint completed; its response.
    Completed(StoredResponse),
    /// The key was used for a request with a different fingerprint.
    Mismatch,
}

/// A response as a store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers, without hop-by-hop headers and, unless configured, `Set-Cookie`.
    pub headers: HeaderMap,
    /// The body, or `None` when the request completed but its body was too large to
    /// keep. A replay of such a record has the status and headers and an empty body.
    pub body: Option<Bytes>,
}

impl StoredResponse {
    /// Returns the number of bytes the record takes: header names and values and the body.
    pub fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        headers + self.body.as_ref().map_or(0, Bytes::len)
    }
}

/// An [`IdempotencyStore`] operation failed.
#[derive(Debug)]
pub struct StoreError {
    kind: ErrorKind,
    source: Option<BoxError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
    Backend,
    Capacity,
    StaleOwner,
}

impl StoreError {
    /// Creates an error for a backend that failed or could not be reached, with the
    /// cause as `source`.
    pub fn backend(source: impl Into<BoxError>) -> Self {
        StoreError {
            kind: ErrorKind::Backend,
            source: Some(source.into()),
        }
    }

    /// Creates an error for a full store, which keeps its live records rather than
    /// evicting them.
    pub fn capacity() -> Self {
        StoreError {
            kind: ErrorKind::Capacity,
            source: None,
        }
    }

    /// Creates an error for a key that is not in flight for the given owner.
    pub fn stale_owner() -> Self {
        StoreError {
            kind: ErrorKind::StaleOwner,
            source: None,
        }
    }

    /// Returns `true` if the backend failed or could not be reached.
    pub fn is_backend(&self) -> bool {
        self.kind == ErrorKind::Backend
    }

    /// Returns `true` if the store was full.
    pub fn is_capacity(&self) -> bool {
        self.kind == ErrorKind::Capacity
    }

    /// Returns `true` if the claim no longer belongs to the owner: the key was completed,
    /// released, expired or taken over by another owner.
    pub fn is_stale_owner(&self) -> bool {
        self.kind == ErrorKind::StaleOwner
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ErrorKind::Backend => f.write_str("idempotency store backend failed"),
            ErrorKind::Capacity => {
                f.write_str("idempotency store is full, so raise its bounds or shorten the TTLs")
            }
            ErrorKind::StaleOwner => f.write_str(
                "idempotency key is no longer in flight for this owner \
                 (completed, released or taken over after its lease expired)",
            ),
        }
    }
}

impl Error for StoreError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source
            .as_ref()
            .map(|source| &**source as &(dyn Error + 'static))
    }
}
