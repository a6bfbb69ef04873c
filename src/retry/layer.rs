use std::sync::Arc;

use tower_layer::Layer;

use super::{HttpReplay, Retry, RetryPolicy};
use crate::classify::HttpClassifier;

/// Applies [`Retry`] to a service: retries by a [`RetryPolicy`].
///
/// The [`retry` module](super) documents what is retried, when a retry is declined, and
/// how the layer orders with [`IdempotencyKeyLayer`](crate::IdempotencyKeyLayer) and
/// [`RetryMetricsLayer`](crate::RetryMetricsLayer). To count the attempts of a request,
/// use [`RetryPolicyBuilder::on_retry`](super::RetryPolicyBuilder::on_retry) or the
/// `retry_request_attempts` metric of `RetryMetricsLayer`.
#[must_use]
pub struct RetryLayer<C = HttpClassifier, R = HttpReplay> {
    policy: Arc<RetryPolicy<C, R>>,
}

impl<C, R> RetryLayer<C, R> {
    /// Creates a layer that retries by `policy`.
    pub fn new(policy: RetryPolicy<C, R>) -> Self {
        RetryLayer {
            policy: Arc::new(policy),
        }
    }
}

impl<C, R> Clone for RetryLayer<C, R> {
    fn clone(&self) -> Self {
        RetryLayer {
            policy: Arc::clone(&self.policy),
        }
    }
}

impl<C, R> std::fmt::Debug for RetryLayer<C, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryLayer")
            .field("policy", &self.policy)
            .finish()
    }
}

impl<S, C, R> Layer<S> for RetryLayer<C, R> {
    type Service = Retry<S, C, R>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::from_shared(inner, Arc::clone(&self.policy))
    }
}
