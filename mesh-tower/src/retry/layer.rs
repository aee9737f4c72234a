use std::sync::Arc;

use tower::Layer;

use super::Retry;
use crate::cluster::ClusterRegistry;

/// Retries by each request's route policy (see the [module](super)).
#[derive(Clone, Debug)]
pub struct RetryLayer {
    registry: Arc<ClusterRegistry>,
    max_buffer: usize,
    metrics: Option<crate::metrics::Metrics>,
}

impl RetryLayer {
    /// Retries with the limits of the clusters in `registry`.
    pub fn new(registry: Arc<ClusterRegistry>) -> Self {
        Self {
            registry,
            max_buffer: 64 * 1024,
            metrics: None,
        }
    }

    /// Counts retries into `metrics`.
    pub fn metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The largest request body kept for replay (default 64 KiB); larger bodies are sent
    /// once and not retried.
    pub fn max_buffer(mut self, bytes: usize) -> Self {
        self.max_buffer = bytes;
        self
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            registry: self.registry.clone(),
            max_buffer: self.max_buffer,
            metrics: self.metrics.clone(),
        }
    }
}
