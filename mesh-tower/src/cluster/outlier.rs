//! Outlier detection: consecutive errors and success rate per endpoint, ejection and
//! return.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{ClusterRuntime, EndpointRuntime, Outcome};

impl ClusterRuntime {
    /// Whether `endpoint` is ejected at `now`. An ejection that has run its time ends here
    /// (lazily, at the next look), which also resets the endpoint's failure counts.
    pub fn is_ejected(&self, endpoint: &EndpointRuntime, now: tokio::time::Instant) -> bool {
        let until = endpoint.stats.ejected_until.load(Ordering::Acquire);
        if until == 0 {
            return false;
        }
        if until > self.nanos(now) {
            return true;
        }
        if endpoint
            .stats
            .ejected_until
            .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            endpoint.stats.consecutive_5xx.store(0, Ordering::Relaxed);
            endpoint
                .stats
                .consecutive_gateway
                .store(0, Ordering::Relaxed);
            tracing::info!(cluster = %self.name, endpoint = %endpoint.address, "outlier detection: endpoint restored");
        }
        false
    }

    /// Records an attempt's outcome for outlier detection; ejects the endpoint when a
    /// consecutive-failure detector trips and `max_ejection_percent` allows. Returns whether
    /// it was ejected now.
    pub fn record(
        &self,
        endpoint: &EndpointRuntime,
        outcome: Outcome,
        now: tokio::time::Instant,
    ) -> bool {
        let config = self.config.load();
        let Some(od) = &config.outlier_detection else {
            return false;
        };
        let stats = &endpoint.stats;
        let (is_5xx, is_gateway) = match outcome {
            Outcome::Status(s) => (s >= 500, matches!(s, 502..=504)),
            Outcome::LocalFailure => (true, true),
        };
        stats.interval_total.fetch_add(1, Ordering::Relaxed);
        if !is_5xx {
            stats.interval_success.fetch_add(1, Ordering::Relaxed);
        }
        // The interval detectors (success rate, failure percentage) sweep once per interval,
        // on the first outcome recorded after it ends.
        let now_nanos = self.nanos(now);
        let due = self.next_sweep.load(Ordering::Acquire);
        if due == 0 {
            let _ = self.next_sweep.compare_exchange(
                0,
                self.nanos(now + od.interval),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        } else if now_nanos >= due
            && self
                .next_sweep
                .compare_exchange(
                    due,
                    self.nanos(now + od.interval),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            self.sweep(od, now);
        }
        let c5 = if is_5xx {
            stats.consecutive_5xx.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            stats.consecutive_5xx.store(0, Ordering::Relaxed);
            0
        };
        let cg = if is_gateway {
            stats.consecutive_gateway.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            stats.consecutive_gateway.store(0, Ordering::Relaxed);
            0
        };
        let enforce = |limit: Option<(u32, u32)>, count: u32| {
            limit.is_some_and(|(n, pct)| count >= n && fastrand::u32(0..100) < pct)
        };
        if !(enforce(od.consecutive_5xx, c5) || enforce(od.consecutive_gateway_failure, cg)) {
            return false;
        }
        self.eject(endpoint, od, now, "consecutive failures")
    }

    /// Ejects `endpoint` unless it is ejected already or `max_ejection_percent` forbids.
    pub(super) fn eject(
        &self,
        endpoint: &EndpointRuntime,
        od: &mesh_core::config::OutlierDetection,
        now: tokio::time::Instant,
        why: &str,
    ) -> bool {
        if self.is_ejected(endpoint, now) {
            return false;
        }
        // max_ejection_percent: eject only while the share already ejected is below it.
        let all = self.endpoints.load();
        let ejected = all.iter().filter(|e| self.is_ejected(e, now)).count();
        if ejected * 100 >= all.len() * od.max_ejection_percent as usize {
            return false;
        }
        let stats = &endpoint.stats;
        let n = stats.ejections.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(m) = &self.metrics {
            m.counters().ejections.fetch_add(1, Ordering::Relaxed);
        }
        let time = od
            .base_ejection_time
            .saturating_mul(n)
            .min(od.max_ejection_time.max(od.base_ejection_time));
        stats
            .ejected_until
            .store(self.nanos(now + time), Ordering::Release);
        stats.consecutive_5xx.store(0, Ordering::Relaxed);
        stats.consecutive_gateway.store(0, Ordering::Relaxed);
        tracing::warn!(cluster = %self.name, endpoint = %endpoint.address, ?time, ejections = n, why, "outlier detection: endpoint ejected");
        true
    }

    /// The interval detectors over the counts of the interval that ended: success rate
    /// (below mean − stdev × factor / 1000) and failure percentage (at or above the
    /// threshold), each among hosts with enough requests, when enough hosts qualify.
    pub(super) fn sweep(
        &self,
        od: &mesh_core::config::OutlierDetection,
        now: tokio::time::Instant,
    ) {
        let all = self.endpoints.load();
        let counts: Vec<(&Arc<EndpointRuntime>, u64, u64)> = all
            .iter()
            .map(|e| {
                let total = e.stats.interval_total.swap(0, Ordering::AcqRel);
                let ok = e
                    .stats
                    .interval_success
                    .swap(0, Ordering::AcqRel)
                    .min(total);
                (e, total, ok)
            })
            .collect();
        if let Some(sr) = &od.success_rate {
            let qualified: Vec<_> = counts
                .iter()
                .filter(|(_, t, _)| *t >= u64::from(sr.request_volume))
                .collect();
            if qualified.len() >= sr.minimum_hosts as usize && !qualified.is_empty() {
                let rates: Vec<f64> = qualified
                    .iter()
                    .map(|(_, t, ok)| *ok as f64 / *t as f64)
                    .collect();
                let mean = rates.iter().sum::<f64>() / rates.len() as f64;
                let var =
                    rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rates.len() as f64;
                let threshold = mean - var.sqrt() * f64::from(sr.stdev_factor) / 1000.0;
                for ((e, _, _), rate) in qualified.iter().zip(rates) {
                    if rate < threshold && fastrand::u32(0..100) < sr.enforcing {
                        self.eject(e, od, now, "success rate");
                    }
                }
            }
        }
        if let Some(fp) = &od.failure_percentage {
            let qualified: Vec<_> = counts
                .iter()
                .filter(|(_, t, _)| *t >= u64::from(fp.request_volume))
                .collect();
            if qualified.len() >= fp.minimum_hosts as usize {
                for (e, t, ok) in qualified {
                    let failed_pct = (t - ok) * 100 / (*t).max(1);
                    if failed_pct >= u64::from(fp.threshold) && fastrand::u32(0..100) < fp.enforcing
                    {
                        self.eject(e, od, now, "failure percentage");
                    }
                }
            }
        }
    }

    /// Endpoints ejected at `now`.
    pub fn ejected(&self, now: tokio::time::Instant) -> usize {
        self.endpoints
            .load()
            .iter()
            .filter(|e| self.is_ejected(e, now))
            .count()
    }
}
