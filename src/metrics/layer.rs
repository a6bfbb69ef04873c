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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::{Request, Response};
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
    use tower::{ServiceExt, service_fn};
    use tower_layer::Layer;

    use super::RetryMetricsLayer;
    use crate::metrics::names;

    /// Sends one `GET` through a new service of `layer` that responds with `200`.
    async fn send_one(layer: &RetryMetricsLayer) {
        let ok =
            service_fn(|_request: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
        layer.layer(ok).oneshot(Request::new(())).await.unwrap();
    }

    /// Returns `retry_requests_total` summed over its label sets, `None` when unregistered.
    fn requests_total(snapshotter: &Snapshotter) -> Option<u64> {
        let values: Vec<u64> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.key().name() == names::REQUESTS_TOTAL)
            .map(|(.., value)| match value {
                DebugValue::Counter(count) => count,
                other => panic!("{} is not a counter: {other:?}", names::REQUESTS_TOTAL),
            })
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn recorder_installed_after_construction() {
        let layer = RetryMetricsLayer::new("late");
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _guard = metrics::set_default_local_recorder(&recorder);

        send_one(&layer).await;
        send_one(&layer.clone()).await;

        assert_eq!(requests_total(&snapshotter), Some(2));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn handles_keep_first_recorder() {
        let layer = RetryMetricsLayer::new("first");
        let first = DebuggingRecorder::new();
        let first_snapshotter = first.snapshotter();
        let second = DebuggingRecorder::new();
        let second_snapshotter = second.snapshotter();

        {
            let _guard = metrics::set_default_local_recorder(&first);
            send_one(&layer).await;
        }
        {
            let _guard = metrics::set_default_local_recorder(&second);
            send_one(&layer).await;
        }

        assert_eq!(requests_total(&first_snapshotter), Some(2));
        assert_eq!(requests_total(&second_snapshotter), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn layers_register_separately() {
        let first = RetryMetricsLayer::new("shared");
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        {
            let _guard = metrics::set_default_local_recorder(&recorder);
            send_one(&first).await;
        }

        // A second layer with the same operation registers its own handles, with the
        // recorder that is current at its first request.
        let second = RetryMetricsLayer::new("shared");
        let other = DebuggingRecorder::new();
        let other_snapshotter = other.snapshotter();
        let _guard = metrics::set_default_local_recorder(&other);
        send_one(&second).await;

        assert_eq!(requests_total(&snapshotter), Some(1));
        assert_eq!(requests_total(&other_snapshotter), Some(1));
    }
}
