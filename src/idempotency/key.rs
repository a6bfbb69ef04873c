//! The client side: one `Idempotency-Key` per logical request.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use http::{HeaderValue, Method, Request};
use tower_layer::Layer;
use tower_service::Service;

use super::IDEMPOTENCY_KEY;

/// Adds an `Idempotency-Key` header to requests that need one.
///
/// `POST` and `PATCH` requests without the header get a fresh key (UUID v4 by default).
/// A key the caller set is never replaced. Every attempt of one logical request carries
/// the same key, with this layer above or below [`RetryLayer`](crate::RetryLayer). Above
/// it, the key is added once, before the request is copied. Below it, the retry layer
/// marks the logical request and this layer keeps the key in that mark.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use http::{Request, Response};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// use tower_safe_retry::IdempotencyKeyLayer;
///
/// let echo = service_fn(|request: Request<()>| async move {
///     let key = request.headers().get("idempotency-key").cloned();
///     Ok::<_, std::convert::Infallible>(Response::new(key))
/// });
/// let client = ServiceBuilder::new().layer(IdempotencyKeyLayer::new()).service(echo);
///
/// let post = Request::post("http://example.test/charges").body(()).unwrap();
/// let key = client.clone().oneshot(post).await.unwrap().into_body().unwrap();
/// assert_eq!(key.len(), 36);
///
/// let get = Request::get("http://example.test/charges").body(()).unwrap();
/// assert!(client.oneshot(get).await.unwrap().into_body().is_none());
/// # }
/// ```
///
/// NOTE: below a retry layer, only requests that the retry layer treats as not
/// idempotent are marked, so a method added with [`methods`](Self::methods) that RFC 9110
/// calls idempotent (`PUT`, `DELETE`) gets a new key on each attempt there. Put this layer
/// above the retry layer for such methods.
#[derive(Clone)]
#[must_use]
pub struct IdempotencyKeyLayer {
    generator: KeyGenerator,
    methods: Arc<[Method]>,
}

impl IdempotencyKeyLayer {
    /// Keys `POST` and `PATCH` requests with UUID v4 keys.
    pub fn new() -> Self {
        IdempotencyKeyLayer {
            generator: KeyGenerator::uuid_v4(),
            methods: Arc::new([Method::POST, Method::PATCH]),
        }
    }

    /// Sets how keys are made.
    pub fn generator(mut self, generator: KeyGenerator) -> Self {
        self.generator = generator;
        self
    }

    /// Sets the methods whose requests get a key.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }
}

impl Default for IdempotencyKeyLayer {
    fn default() -> Self {
        IdempotencyKeyLayer::new()
    }
}

impl fmt::Debug for IdempotencyKeyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyKeyLayer")
            .field("generator", &self.generator)
            .field("methods", &self.methods)
            .finish()
    }
}

impl<S> Layer<S> for IdempotencyKeyLayer {
    type Service = IdempotencyKey<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyKey {
            inner,
            generator: self.generator.clone(),
            methods: Arc::clone(&self.methods),
        }
    }
}

/// Adds an `Idempotency-Key` header to requests that need one; see
/// [`IdempotencyKeyLayer`].
#[derive(Clone)]
pub struct IdempotencyKey<S> {
    inner: S,
    generator: KeyGenerator,
    methods: Arc<[Method]>,
}

impl<S> IdempotencyKey<S> {
    /// Returns a reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Returns a mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for IdempotencyKey<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyKey")
            .field("inner", &self.inner)
            .field("generator", &self.generator)
            .field("methods", &self.methods)
            .finish()
    }
}

impl<S, B> Service<Request<B>> for IdempotencyKey<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let needs_key = self.methods.contains(request.method())
            && !request.headers().contains_key(IDEMPOTENCY_KEY);
        if needs_key {
            let key = match request.extensions().get::<LogicalRequest>() {
                Some(logical) => logical
                    .key
                    .get_or_init(|| self.generator.generate())
                    .clone(),
                None => self.generator.generate(),
            };
            request.headers_mut().insert(IDEMPOTENCY_KEY, key);
        }
        self.inner.call(request)
    }
}

#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
impl<S> Service<reqwest::Request> for IdempotencyKey<S>
where
    S: Service<reqwest::Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: reqwest::Request) -> Self::Future {
        let needs_key = self.methods.contains(request.method())
            && !request.headers().contains_key(IDEMPOTENCY_KEY);
        if needs_key {
            let key = self.generator.generate();
            request.headers_mut().insert(IDEMPOTENCY_KEY, key);
        }
        self.inner.call(request)
    }
}

/// Makes idempotency keys.
#[derive(Clone)]
pub struct KeyGenerator {
    kind: GeneratorKind,
}

#[derive(Clone)]
enum GeneratorKind {
    UuidV4,
    UuidV7,
    Custom(Arc<dyn Fn() -> HeaderValue + Send + Sync>),
}

impl KeyGenerator {
    /// Random UUID v4 keys, in hyphenated lowercase form (the default).
    pub fn uuid_v4() -> Self {
        KeyGenerator {
            kind: GeneratorKind::UuidV4,
        }
    }

    /// Time-ordered UUID v7 keys, which index well in a database.
    pub fn uuid_v7() -> Self {
        KeyGenerator {
            kind: GeneratorKind::UuidV7,
        }
    }

    /// Keys from a function. Each call must return a new key that is unique among the
    /// caller's requests.
    pub fn custom(generate: impl Fn() -> HeaderValue + Send + Sync + 'static) -> Self {
        KeyGenerator {
            kind: GeneratorKind::Custom(Arc::new(generate)),
        }
    }

    /// Makes a new key.
    pub fn generate(&self) -> HeaderValue {
        let uuid = match &self.kind {
            GeneratorKind::UuidV4 => uuid::Uuid::new_v4(),
            GeneratorKind::UuidV7 => uuid::Uuid::now_v7(),
            GeneratorKind::Custom(generate) => return generate(),
        };
        let mut buffer = uuid::Uuid::encode_buffer();
        let text = uuid.hyphenated().encode_lower(&mut buffer);
        HeaderValue::from_str(text).expect("a UUID is a valid header value")
    }
}

impl fmt::Debug for KeyGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.kind {
            GeneratorKind::UuidV4 => "uuid_v4",
            GeneratorKind::UuidV7 => "uuid_v7",
            GeneratorKind::Custom(_) => "custom",
        };
        f.debug_tuple("KeyGenerator").field(&name).finish()
    }
}

/// The mark a retry layer puts on a logical request that is not idempotent: every copy of
/// the request shares it, so the first key made for the request is used by every attempt.
#[derive(Clone, Debug, Default)]
pub(crate) struct LogicalRequest {
    key: Arc<OnceLock<HeaderValue>>,
}

impl LogicalRequest {
    pub(crate) fn new() -> Self {
        LogicalRequest::default()
    }

    /// Returns whether an `IdempotencyKeyLayer` has keyed the request.
    pub(crate) fn has_key(&self) -> bool {
        self.key.get().is_some()
    }
}
