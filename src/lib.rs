//! Tower middleware that makes retries safe.
//!
//! - [`RetryLayer`] classifies each attempt's outcome, backs off and retries, and never
//!   resends a request that is not idempotent after it may have been processed.
//! - [`IdempotencyKeyLayer`] gives each logical `POST` and `PATCH` one `Idempotency-Key`,
//!   stable across retries.
//! - [`IdempotencyLayer`] runs a request with a given key once on the server and replays
//!   its response to every retry.
//! - [`RetryMetricsLayer`] records what retries cost, per logical request and per attempt.
//!
//! A server that charges once per key, and a client that retries with one key per order:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use bytes::Bytes;
//! use http::{Request, StatusCode};
//! use http_body_util::Full;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_safe_retry::{
//!     IdempotencyKeyLayer, IdempotencyLayer, MemoryStore, RetryLayer, RetryMetricsLayer,
//!     RetryPolicy,
//! };
//!
//! // The server: a retried POST with the same key runs `create_charge` once.
//! async fn create_charge() -> (StatusCode, &'static str) {
//!     (StatusCode::CREATED, "charged")
//! }
//! let app = axum::Router::new()
//!     .route("/charges", axum::routing::post(create_charge))
//!     .layer(IdempotencyLayer::new(MemoryStore::new()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let addr = listener.local_addr().unwrap();
//! tokio::spawn(async move { axum::serve(listener, app).await });
//!
//! // The client: metrics, one key per logical request, then retries.
//! let hyper_client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let client = ServiceBuilder::new()
//!     .layer(RetryMetricsLayer::new("payments"))
//!     .layer(IdempotencyKeyLayer::new())
//!     .layer(RetryLayer::new(RetryPolicy::http()))
//!     .service(hyper_client);
//!
//! let order = Request::post(format!("http://{addr}/charges"))
//!     .body(Full::new(Bytes::from_static(b"order=42")))
//!     .unwrap();
//! let response = client.oneshot(order).await.unwrap();
//! assert_eq!(response.status(), StatusCode::CREATED);
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub,
    clippy::all,
    clippy::dbg_macro,
    clippy::todo,
    clippy::unimplemented,
    clippy::mem_forget,
    clippy::needless_borrow,
    clippy::needless_continue,
    clippy::match_wildcard_for_single_variants,
    clippy::if_let_mutex,
    clippy::await_holding_lock,
    clippy::imprecise_flops,
    clippy::suboptimal_flops,
    clippy::lossy_float_literal,
    clippy::rest_pat_in_fully_bound_structs,
    clippy::fn_params_excessive_bools,
    clippy::exit,
    clippy::inefficient_to_string,
    clippy::linkedlist,
    clippy::macro_use_imports,
    clippy::option_option,
    clippy::verbose_file_reads,
    clippy::unnested_or_patterns,
    clippy::str_to_string
)]

pub mod backoff;
pub mod body;
pub mod budget;
pub mod classify;
pub mod idempotency;
pub mod metrics;
pub mod retry;
mod retry_after;

/// The boxed error type the retry layer returns, as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub use crate::backoff::Backoff;
pub use crate::budget::RetryBudget;
pub use crate::classify::{GrpcClassifier, HttpClassifier};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use crate::idempotency::store::PostgresStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use crate::idempotency::store::RedisStore;
pub use crate::idempotency::{
    IdempotencyKeyLayer, IdempotencyLayer, IdempotencyStore, MemoryStore,
};
pub use crate::metrics::RetryMetricsLayer;
#[cfg(feature = "report")]
#[cfg_attr(docsrs, doc(cfg(feature = "report")))]
pub use crate::metrics::RetryReport;
pub use crate::retry::{BodyReplay, RetryLayer, RetryPolicy};
