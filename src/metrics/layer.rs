use metrics::SharedString;
use tower_layer::Layer;

use super::RetryMetrics;

/// Applies [`RetryMetrics`] to a service.
///
/// `operation` labels every metric the layer and the retry layer below it record. It
/// must be a static name from a small set, such as `"payments"` or `"get_user"`, and
/// never a raw path or URL, because each distinct value becomes a new time series.
#[derive(Clone, Debug)]
#[must_use]
pub struct RetryMetricsLayer {
    operation: SharedString,
}

impl RetryMetricsLayer {
    /// Creates a layer that records metrics under the `operation` label.
    pub fn new(operation: impl Into<SharedString>) -> Self {
        RetryMetricsLayer {
            operation: operation.into(),
        }
    }
}

impl<S> Layer<S> for RetryMetricsLayer {
    type Service = RetryMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryMetrics::new(inner, self.operation.clone())
    }
}
