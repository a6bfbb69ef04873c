//! Idempotency keys on both ends of a connection.
//!
//! On the client, [`IdempotencyKeyLayer`] gives every logical `POST` and `PATCH` request
//! one `Idempotency-Key`, so the retry layer may resend it. On the server,
//! [`IdempotencyLayer`] runs a request with a given key once and replays the stored
//! response to every retry.

mod fingerprint;
mod key;
mod problem;
pub mod server;
pub mod store;

use http::HeaderName;

pub use self::fingerprint::Fingerprint;
pub(crate) use self::key::LogicalRequest;
pub use self::key::{IdempotencyKey, IdempotencyKeyLayer, KeyGenerator};
pub use self::server::{Idempotency, IdempotencyLayer};
pub use self::store::{IdempotencyStore, MemoryStore};

/// The `Idempotency-Key` request header (IETF draft `draft-ietf-httpapi-idempotency-key-header`).
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The response header that marks a replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
