use std::fmt;
use std::sync::Arc;

use metrics::SharedString;
use tower_layer::Layer;

use super::RetryMetrics;
use super::handles::OperationMetrics;

/// Applies [`RetryMetrics`] to a service.
///
/// `operation` labels every metric the layer and the retry layer below it record. It
/// must be a static name from a small set, such as `"payments"` or `"get_user"`, and
/// never a raw path or URL, because each distinct value becomes a new time series.
///
/// The layer registers each metric handle with the recorder the first time it records
/// that metric with that label set, and reuses the handle for later requests. Clones of
/// the layer and the services it builds share these handles. The recorder is the one
/// that is current at that first record: the thread-local one set by
/// `metrics::set_default_local_recorder`, else the global one.
///
/// NOTE: install the recorder before the layer's first request. A recorder installed
/// later receives only the metrics whose label sets the layer had not recorded yet, and
/// a handle registered with the no-op recorder records nothing for the layer's lifetime.
#[derive(Clone)]
#[must_use]
pub struct RetryMetricsLayer {
    metrics: Arc<OperationMetrics>,
}

impl RetryMetricsLayer {
    /// Creates a layer that records metrics under the `operation` label.
    pub fn new(operation: impl Into<SharedString>) -> Self {
        RetryMetricsLayer {
            metrics: Arc::new(OperationMetrics::new(operation.into())),
        }
    }
}

impl fmt::Debug for RetryMetricsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryMetricsLayer")
            .field("operation", self.metrics.operation())
            .finish()
    }
}

impl<S> Layer<S> for RetryMetricsLayer {
    type Service = RetryMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryMetrics::with_metrics(inner, Arc::clone(&self.metrics))
    }
}
