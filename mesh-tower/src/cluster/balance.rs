//! Endpoint choice inside a cluster.
//!
//! Only routable endpoints (health UNKNOWN or HEALTHY) of the highest priority that has any
//! are considered: when priority P has none left, traffic moves to P+1, and comes back when
//! P recovers. Among them, the cluster's policy picks: power of two choices on outstanding
//! requests (LEAST_REQUEST, the default), round robin, or random. Weights are honoured by
//! weighted random draws.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use mesh_core::config::LbPolicy;

use super::{ClusterRuntime, EndpointRuntime};
use crate::ext::{Attempt, RequestHash};

/// How an endpoint is picked; the default follows the cluster's `lb_policy`.
pub trait PickEndpoint {
    /// Picks among `candidates` (non-empty, same priority).
    fn pick<'a>(
        &self,
        cluster: &ClusterRuntime,
        candidates: &'a [Arc<EndpointRuntime>],
    ) -> &'a Arc<EndpointRuntime>;
}

/// Chooses the endpoint for a request, or `None` when every endpoint is ejected.
///
/// The highest priority level with an endpoint that is not ejected serves (when a level is
/// all ejected, traffic fails over to the next). Within it: the hash ring when the cluster
/// hashes and the route hashed the request (the first endpoint at or after the hash that is
/// not ejected); otherwise `picker`, drawn again while it lands on an ejected endpoint (at
/// most 8 times, then the first that is not). A retry whose route avoids previous hosts
/// draws again while it lands on a host already tried (`host_selection_max_attempts`).
pub fn balance<P: PickEndpoint>(
    cluster: &ClusterRuntime,
    picker: &P,
    hash: Option<&RequestHash>,
    attempt: Option<&Attempt>,
    now: tokio::time::Instant,
) -> Option<Arc<EndpointRuntime>> {
    let levels = cluster.levels();
    let level = levels
        .iter()
        .position(|l| l.iter().any(|e| !cluster.is_ejected(e, now)))?;
    let candidates = &levels[level];
    let rings = cluster.rings();
    let hashed = match (hash, rings.get(level)) {
        (Some(h), Some(ring)) => ring
            .lookup(h.0)
            .map(|i| &candidates[i])
            .find(|e| !cluster.is_ejected(e, now)),
        _ => None,
    };
    let mut endpoint = hashed.unwrap_or_else(|| picker.pick(cluster, candidates));
    for _ in 0..8 {
        if hashed.is_some() || !cluster.is_ejected(endpoint, now) {
            break;
        }
        endpoint = picker.pick(cluster, candidates);
    }
    if cluster.is_ejected(endpoint, now) {
        endpoint = candidates.iter().find(|e| !cluster.is_ejected(e, now))?;
    }
    if let Some(attempt) = attempt.filter(|a| a.avoid_tried) {
        for _ in 1..attempt.host_selection_max_attempts.max(1) {
            if !attempt.tried.contains(&endpoint.address) {
                break;
            }
            endpoint = picker.pick(cluster, candidates);
        }
    }
    Some(endpoint.clone())
}

/// The policy of the cluster's configuration. With `peak_ewma`, LEAST_REQUEST compares
/// endpoints by latency EWMA × (outstanding + 1) instead of outstanding requests alone, so a
/// slow endpoint loses traffic even when requests do not overlap.
#[derive(Clone, Copy, Debug, Default)]
pub struct ByConfig {
    /// Weigh outstanding requests by observed latency.
    pub peak_ewma: bool,
}

fn weighted_random(candidates: &[Arc<EndpointRuntime>]) -> &Arc<EndpointRuntime> {
    // Equal weights (the common case): an index, O(1). Any subset of a uniform level
    // (a locality's run) is uniform too.
    if candidates[0].uniform.load(Ordering::Relaxed) {
        return &candidates[fastrand::usize(..candidates.len())];
    }
    let total: u64 = candidates.iter().map(|e| u64::from(e.weight.max(1))).sum();
    let mut point = fastrand::u64(..total.max(1));
    for e in candidates {
        let w = u64::from(e.weight.max(1));
        if point < w {
            return e;
        }
        point -= w;
    }
    &candidates[candidates.len() - 1]
}

/// With locality-weighted balancing, a locality is drawn by its weight first. Endpoints of a
/// locality are contiguous in a level, so this scans runs without allocating.
fn pick_locality(candidates: &[Arc<EndpointRuntime>]) -> Option<&[Arc<EndpointRuntime>]> {
    let runs = || {
        let mut start = 0;
        std::iter::from_fn(move || {
            if start >= candidates.len() {
                return None;
            }
            let loc = candidates[start].locality;
            let end = candidates[start..]
                .iter()
                .position(|e| e.locality != loc)
                .map_or(candidates.len(), |n| start + n);
            let run = &candidates[start..end];
            start = end;
            Some(run)
        })
    };
    let total: u64 = runs().map(|r| u64::from(r[0].locality_weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = fastrand::u64(..total);
    for run in runs() {
        let w = u64::from(run[0].locality_weight);
        if point < w {
            return Some(run);
        }
        point -= w;
    }
    None
}

impl PickEndpoint for ByConfig {
    fn pick<'a>(
        &self,
        cluster: &ClusterRuntime,
        candidates: &'a [Arc<EndpointRuntime>],
    ) -> &'a Arc<EndpointRuntime> {
        let Some(now) = cluster.warming_now() else {
            return self.pick_by_policy(cluster, candidates);
        };
        // Slow start: an endpoint warming up with factor f is accepted with probability f,
        // else the policy picks again, so its share is its weight × f (a few draws at most).
        let mut chosen = self.pick_by_policy(cluster, candidates);
        for _ in 0..8 {
            let f = cluster.warm_factor(chosen, now);
            if f >= 1.0 || fastrand::f64() < f {
                break;
            }
            chosen = self.pick_by_policy(cluster, candidates);
        }
        chosen
    }
}

impl ByConfig {
    fn pick_by_policy<'a>(
        &self,
        cluster: &ClusterRuntime,
        candidates: &'a [Arc<EndpointRuntime>],
    ) -> &'a Arc<EndpointRuntime> {
        let config = cluster.config();
        let candidates = if config.locality_weighted {
            pick_locality(candidates).unwrap_or(candidates)
        } else {
            candidates
        };
        if candidates.len() == 1 {
            return &candidates[0];
        }
        match config.lb_policy {
            LbPolicy::RoundRobin => &candidates[cluster.next_round_robin(candidates.len())],
            LbPolicy::Random | LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. } => {
                weighted_random(candidates)
            }
            LbPolicy::LeastRequest { choice_count } => {
                // Power of `choice_count` choices: the least loaded of a few weighted draws.
                let load = |e: &EndpointRuntime| {
                    let outstanding = u64::from(e.in_flight()) + 1;
                    if self.peak_ewma {
                        // Unmeasured endpoints count as fast, so they get tried.
                        e.stats
                            .ewma_nanos
                            .load(Ordering::Relaxed)
                            .max(1)
                            .saturating_mul(outstanding)
                    } else {
                        outstanding
                    }
                };
                let mut best = weighted_random(candidates);
                for _ in 1..choice_count.max(2) {
                    // Prefer a different endpoint for each choice (a few draws at most).
                    let mut other = weighted_random(candidates);
                    for _ in 0..3 {
                        if !Arc::ptr_eq(other, best) {
                            break;
                        }
                        other = weighted_random(candidates);
                    }
                    if load(other) < load(best) {
                        best = other;
                    }
                }
                best
            }
        }
    }
}

/// Groups the routable endpoints by priority (highest first), dropping empty levels.
pub fn levels(endpoints: &[Arc<EndpointRuntime>]) -> Vec<Vec<Arc<EndpointRuntime>>> {
    let mut levels: Vec<(u32, Vec<Arc<EndpointRuntime>>)> = Vec::new();
    for e in endpoints.iter().filter(|e| e.health.is_routable()) {
        match levels.last_mut() {
            Some((p, level)) if *p == e.priority => level.push(e.clone()),
            _ => levels.push((e.priority, vec![e.clone()])),
        }
    }
    levels.sort_by_key(|(p, _)| *p);
    for (_, level) in &levels {
        let uniform = level.iter().all(|e| e.weight == level[0].weight);
        for e in level {
            e.uniform.store(uniform, Ordering::Relaxed);
        }
    }
    levels.into_iter().map(|(_, l)| l).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::HealthStatus;

    fn ep(port: u16, priority: u32, health: HealthStatus) -> Arc<EndpointRuntime> {
        Arc::new(EndpointRuntime {
            address: ([127, 0, 0, 1], port).into(),
            weight: 1,
            priority,
            locality_weight: 1,
            locality: 0,
            health,
            stats: Default::default(),
            uniform: Default::default(),
        })
    }

    #[test]
    fn priority_failover_and_recovery() {
        let all = vec![
            ep(1, 0, HealthStatus::Unhealthy),
            ep(2, 0, HealthStatus::Draining),
            ep(3, 1, HealthStatus::Healthy),
        ];
        let l = levels(&all);
        assert_eq!(
            l.len(),
            1,
            "priority 0 has nothing routable: traffic fails over to 1"
        );
        assert_eq!(l[0][0].address.port(), 3);
        let recovered = vec![
            ep(1, 0, HealthStatus::Healthy),
            ep(2, 0, HealthStatus::Unhealthy),
            ep(3, 1, HealthStatus::Healthy),
        ];
        let l = levels(&recovered);
        assert_eq!(l[0].len(), 1, "unhealthy endpoints are never candidates");
        assert_eq!(
            l[0][0].address.port(),
            1,
            "and it comes back when priority 0 recovers"
        );
        assert!(levels(&[ep(1, 0, HealthStatus::Unhealthy)]).is_empty());
    }
}
