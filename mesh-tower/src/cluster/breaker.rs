//! The circuit breaker: `max_requests` and `max_retries` counted by guards that give their
//! slot back when dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{ClusterRuntime, EndpointStats};
use crate::error::MeshError;

/// Holds one unit of the cluster's retry allowance; released on drop.
#[derive(Debug)]
pub struct RetryGuard {
    pub(super) cluster: Arc<ClusterRuntime>,
}

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.cluster.active_retries.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Holds one unit of the cluster's `max_requests` budget; released on drop.
#[derive(Debug)]
pub struct RequestGuard {
    pub(super) cluster: Arc<ClusterRuntime>,
    pub(super) endpoint: Option<Arc<EndpointStats>>,
}

impl RequestGuard {
    pub(crate) fn set_endpoint(&mut self, stats: Arc<EndpointStats>) {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        stats.requests.fetch_add(1, Ordering::Relaxed);
        self.endpoint = Some(stats);
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.cluster.active_requests.fetch_sub(1, Ordering::AcqRel);
        if let Some(e) = &self.endpoint {
            e.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl ClusterRuntime {
    /// Requests in flight through this cluster.
    pub fn active_requests(&self) -> u32 {
        self.active_requests.load(Ordering::Acquire)
    }

    pub(crate) fn count_overflow(&self) {
        self.overflows.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests refused by the circuit breaker so far.
    pub fn overflows(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }

    /// Takes one unit of `max_requests`, or fails fast.
    ///
    /// # Errors
    /// [`MeshError::Overloaded`] when the cluster is at its limit; the request is counted as
    /// an overflow and never queued.
    pub fn try_acquire(self: &Arc<Self>) -> Result<RequestGuard, MeshError> {
        let max = self.config.load().circuit_breakers.default.max_requests;
        // Correctness: increment first, then check, so concurrent callers can never all pass.
        let before = self.active_requests.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            self.active_requests.fetch_sub(1, Ordering::AcqRel);
            self.overflows.fetch_add(1, Ordering::Relaxed);
            return Err(MeshError::Overloaded {
                cluster: self.name.to_string(),
                limit: "max_requests",
                max,
            });
        }
        Ok(RequestGuard {
            cluster: self.clone(),
            endpoint: None,
        })
    }

    /// Retries refused by `max_retries` or the retry budget so far.
    pub fn retry_overflows(&self) -> u64 {
        self.retry_overflows.load(Ordering::Relaxed)
    }

    /// Takes one unit of the retry allowance: the retry budget when configured (a
    /// percentage of active requests, at least `min_retry_concurrency`), else `max_retries`.
    /// `None` when exhausted; the refusal is counted.
    pub fn try_acquire_retry(self: &Arc<Self>) -> Option<RetryGuard> {
        let config = self.config.load();
        let t = &config.circuit_breakers.default;
        let allowed = match &t.retry_budget {
            Some(b) => {
                let active = f64::from(self.active_requests.load(Ordering::Acquire));
                ((active * b.budget_percent / 100.0) as u32).max(b.min_retry_concurrency)
            }
            None => t.max_retries,
        };
        let before = self.active_retries.fetch_add(1, Ordering::AcqRel);
        if before >= allowed {
            self.active_retries.fetch_sub(1, Ordering::AcqRel);
            self.retry_overflows.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(RetryGuard {
            cluster: self.clone(),
        })
    }
}
