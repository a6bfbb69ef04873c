use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use http::request::Parts;
use tower_layer::Layer;

use super::Idempotency;

/// The key of the default scope digest when no [`scope_secret`](IdempotencyLayer::scope_secret)
/// is set.
///
/// It is public, so with it anyone who can read the store can test guessed
/// `Authorization` values against the stored scopes. Set a private secret in production.
pub const DEFAULT_SCOPE_SECRET: [u8; 32] = *b"tower-safe-retry default scope!!";

/// Runs each request with a given `Idempotency-Key` once and replays its response to
/// every retry; see [`Idempotency`] for the full behaviour.
///
/// ```
/// use axum::{Router, routing::post};
/// use tower_safe_retry::{IdempotencyLayer, MemoryStore};
///
/// let app: Router = Router::new()
///     .route("/charges", post(|| async { "charged" }))
///     .layer(IdempotencyLayer::new(MemoryStore::new()).required(true));
/// ```
#[must_use]
pub struct IdempotencyLayer<St> {
    store: Arc<St>,
    config: Config,
}

#[derive(Clone)]
pub(super) struct Config {
    pub(super) methods: Arc<[Method]>,
    pub(super) required: bool,
    pub(super) max_request_body: usize,
    pub(super) max_response_body: usize,
    pub(super) lock_ttl: Duration,
    pub(super) replay_ttl: Duration,
    pub(super) retry_after: Duration,
    pub(super) scope: Scope,
    pub(super) store_set_cookie: bool,
    pub(super) fail_open: bool,
    pub(super) wait_in_flight: Option<Duration>,
}

#[derive(Clone)]
pub(super) enum Scope {
    Authorization { secret: [u8; 32] },
    Custom(Arc<dyn Fn(&Parts) -> String + Send + Sync>),
}

impl<St> IdempotencyLayer<St> {
    /// Creates a layer that keeps its records in `store`.
    ///
    /// The defaults: `POST` and `PATCH`, key optional, 1 MiB request and response bodies,
    /// a 60 s lock TTL, a 24 h replay TTL, `Retry-After: 1`, scope by `Authorization`, no
    /// `Set-Cookie` stored, fail closed.
    pub fn new(store: St) -> Self {
        IdempotencyLayer {
            store: Arc::new(store),
            config: Config {
                methods: Arc::new([Method::POST, Method::PATCH]),
                required: false,
                max_request_body: 1024 * 1024,
                max_response_body: 1024 * 1024,
                lock_ttl: Duration::from_secs(60),
                replay_ttl: Duration::from_secs(24 * 60 * 60),
                retry_after: Duration::from_secs(1),
                scope: Scope::Authorization {
                    secret: DEFAULT_SCOPE_SECRET,
                },
                store_set_cookie: false,
                fail_open: false,
                wait_in_flight: None,
            },
        }
    }

    /// Sets the methods whose requests are deduplicated. Requests with other methods pass
    /// through untouched.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.methods = methods.into_iter().collect();
        self
    }

    /// Sets whether a request without `Idempotency-Key` is rejected with `400` (`true`)
    /// or passes through unprotected (`false`, the default).
    pub fn required(mut self, required: bool) -> Self {
        self.config.required = required;
        self
    }

    /// Sets the maximum request body in bytes. The body is buffered to compute the
    /// fingerprint, and a larger one is rejected with `413`.
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.config.max_request_body = bytes;
        self
    }

    /// Sets the maximum response body in bytes that is stored for replay. A larger
    /// response is still sent in full to the first caller, and it is recorded as
    /// completed without a body, so its replays have an empty body.
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.config.max_response_body = bytes;
        self
    }

    /// Sets the lease of a claim: how long a key stays claimed after its request stops
    /// renewing it, before a duplicate may take the key over and run again.
    ///
    /// The layer renews the lease every third of this TTL while the handler runs and its
    /// response body is buffered, so a slow handler keeps its key. A takeover happens only
    /// when the process that claimed the key dies or cannot reach the store for a whole
    /// TTL. Renewal uses the Tokio timer, so the runtime needs its time driver.
    ///
    /// # Panics
    ///
    /// When `ttl` is zero, because every claim would expire at once and duplicates would
    /// run side by side.
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        assert!(
            !ttl.is_zero(),
            "lock_ttl is 0s, so every claim would expire at once and duplicates would run \
             side by side; use a TTL such as the default 60s"
        );
        self.config.lock_ttl = ttl;
        self
    }

    /// Sets how long a completed response is kept for replay.
    ///
    /// # Panics
    ///
    /// When `ttl` is zero, because no response would be replayed and every retry would
    /// run again.
    pub fn replay_ttl(mut self, ttl: Duration) -> Self {
        assert!(
            !ttl.is_zero(),
            "replay_ttl is 0s, so no response would be replayed and every retry would run \
             again; use a TTL longer than clients retry, such as the default 24h"
        );
        self.config.replay_ttl = ttl;
        self
    }

    /// Makes a duplicate that arrives while the first request runs wait up to `max_wait`
    /// for it to finish, and then receive its replay, instead of a `409` at once.
    ///
    /// The waiting request asks the store again every 50 ms, so each waiting duplicate
    /// costs the store about 20 calls a second. When the first request releases the key
    /// (a `5xx`, an error, a panic), the waiting one claims it and runs. After `max_wait`
    /// it gets the `409` with `Retry-After`.
    pub fn wait_for_in_flight(mut self, max_wait: Duration) -> Self {
        self.config.wait_in_flight = Some(max_wait);
        self
    }

    /// Sets the `Retry-After` delay of the `409` sent while a duplicate is in flight and
    /// of the `503` sent when the store fails. It is sent in whole seconds, rounded up.
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.config.retry_after = delay;
        self
    }

    /// Sets the key of the keyed BLAKE3 digest of `Authorization` that is the default
    /// scope.
    ///
    /// Replicas that share a store must share the secret, or a retry that reaches another
    /// replica runs again. Changing it starts new scopes, so responses stored under the
    /// old secret are no longer replayed.
    pub fn scope_secret(mut self, secret: [u8; 32]) -> Self {
        self.config.scope = Scope::Authorization { secret };
        self
    }

    /// Sets a function that computes the scope from the request head, such as a tenant or
    /// user id, in place of the `Authorization` digest.
    ///
    /// Requests that map to one scope can replay each other's responses, so the scope must
    /// identify the caller.
    pub fn scope_with(mut self, scope: impl Fn(&Parts) -> String + Send + Sync + 'static) -> Self {
        self.config.scope = Scope::Custom(Arc::new(scope));
        self
    }

    /// Sets whether `Set-Cookie` headers are stored and replayed (default `false`, because
    /// a replayed session cookie can outlive the session).
    pub fn store_set_cookie(mut self, store: bool) -> Self {
        self.config.store_set_cookie = store;
        self
    }

    /// Sets whether a request whose claim fails because the store failed runs anyway
    /// (`true`) or is rejected with `503` and `Retry-After` (`false`, the default).
    ///
    /// Failing open keeps the service up while the store is down, at a cost: the handler
    /// then runs unprotected, so a retry of a request that was processed runs it again.
    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.config.fail_open = fail_open;
        self
    }
}

impl<St> Clone for IdempotencyLayer<St> {
    fn clone(&self) -> Self {
        IdempotencyLayer {
            store: Arc::clone(&self.store),
            config: self.config.clone(),
        }
    }
}

impl<St: fmt::Debug> fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("store", &self.store)
            .field("config", &self.config)
            .finish()
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scope = match self.scope {
            Scope::Authorization { .. } => "authorization",
            Scope::Custom(_) => "custom",
        };
        f.debug_struct("Config")
            .field("methods", &self.methods)
            .field("required", &self.required)
            .field("max_request_body", &self.max_request_body)
            .field("max_response_body", &self.max_response_body)
            .field("lock_ttl", &self.lock_ttl)
            .field("replay_ttl", &self.replay_ttl)
            .field("retry_after", &self.retry_after)
            .field("scope", &scope)
            .field("store_set_cookie", &self.store_set_cookie)
            .field("fail_open", &self.fail_open)
            .finish()
    }
}

impl<S, St> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::from_parts(
            inner,
            Arc::clone(&self.store),
            Arc::new(self.config.clone()),
        )
    }
}
