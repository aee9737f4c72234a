//! Endpoints: the per-endpoint load and outlier state that outlives configuration updates.

use mesh_core::config::HealthStatus;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Per-endpoint load and outlier state, shared across configuration updates.
#[derive(Debug, Default)]
pub(crate) struct EndpointStats {
    pub(crate) in_flight: AtomicU32,
    pub(crate) requests: AtomicU64,
    pub(super) consecutive_5xx: AtomicU32,
    pub(super) consecutive_gateway: AtomicU32,
    /// Nanoseconds after the registry's epoch until which the endpoint is ejected (0: not).
    pub(super) ejected_until: AtomicU64,
    pub(super) ejections: AtomicU32,
    /// Outcomes in the current outlier-detection interval.
    pub(super) interval_total: AtomicU64,
    pub(super) interval_success: AtomicU64,
    /// Exponentially weighted moving average of response latency, in nanoseconds.
    pub(crate) ewma_nanos: AtomicU64,
    /// Nanoseconds after the registry's epoch when its slow start began (0: not in slow start).
    pub(crate) warm_since: AtomicU64,
}

impl EndpointStats {
    /// Folds one latency sample into the moving average (weight 0.3 for the new sample).
    pub(crate) fn observe_latency(&self, sample: Duration) {
        let sample = sample.as_nanos().min(u128::from(u64::MAX)) as u64;
        let _ = self
            .ewma_nanos
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 {
                    sample
                } else {
                    (old / 10) * 7 + (sample / 10) * 3
                })
            });
    }
}

/// What an attempt to an endpoint came to, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// No connection could be made, or it broke (counted as a gateway error).
    LocalFailure,
}

/// One endpoint of a cluster.
#[derive(Debug)]
pub struct EndpointRuntime {
    /// Where.
    pub address: SocketAddr,
    /// Weight inside its locality.
    pub weight: u32,
    /// Priority (0 highest).
    pub priority: u32,
    /// Locality weight (for locality-weighted balancing).
    pub locality_weight: u32,
    /// Index of its locality in the assignment.
    pub locality: usize,
    /// Health from EDS.
    pub health: HealthStatus,
    pub(crate) stats: Arc<EndpointStats>,
    /// Every routable endpoint of its priority level has the same weight, so a weighted draw
    /// is a uniform index (set when the levels are built; no per-request weight sum).
    pub(crate) uniform: std::sync::atomic::AtomicBool,
}

impl EndpointRuntime {
    /// Requests in flight to this endpoint now.
    pub fn in_flight(&self) -> u32 {
        self.stats.in_flight.load(Ordering::Relaxed)
    }

    /// Requests sent to this endpoint so far.
    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::Relaxed)
    }

    /// The moving average of its response latency (zero before the first response).
    pub fn latency_ewma(&self) -> Duration {
        Duration::from_nanos(self.stats.ewma_nanos.load(Ordering::Relaxed))
    }

    /// Times this endpoint has been ejected.
    pub fn ejections(&self) -> u32 {
        self.stats.ejections.load(Ordering::Relaxed)
    }
}
