//! Consistent hashing: a Ketama ring over a priority level's endpoints.
//!
//! Each endpoint gets points on the ring in proportion to its weight (the ring has between
//! `min_ring_size` and `max_ring_size` points); a request's hash picks the first point at or
//! after it. Adding or removing one of N endpoints moves only about 1/N of the keys. The
//! request hash comes from the route's `hash_policy` (header, cookie, query parameter),
//! computed by the route layer ([`RequestHash`]).

use std::sync::Arc;

use super::EndpointRuntime;

pub use crate::ext::{hash_bytes, RequestHash};

/// A hash ring over endpoints (indices into the level it was built from).
#[derive(Debug, Default)]
pub struct Ring {
    points: Vec<(u64, usize)>,
}

impl Ring {
    /// Builds a ring over `endpoints` with about `min_size`..=`max_size` points.
    pub fn new(endpoints: &[Arc<EndpointRuntime>], min_size: u64, max_size: u64) -> Self {
        if endpoints.is_empty() {
            return Self::default();
        }
        let total: u64 = endpoints.iter().map(|e| u64::from(e.weight.max(1))).sum();
        // Points per unit of weight, rounded up to a power of two so that it rarely changes
        // when endpoints come and go: an endpoint's points (and so the keys of the others)
        // stay put, and adding one of N endpoints moves about 1/N of the keys.
        let per_weight = min_size.div_ceil(total).max(1).next_power_of_two();
        let per_weight = per_weight.min((max_size.max(1) / total).max(1));
        let mut points = Vec::with_capacity((per_weight * total) as usize);
        for (i, e) in endpoints.iter().enumerate() {
            let n = per_weight * u64::from(e.weight.max(1));
            for k in 0..n {
                points.push((hash_bytes(format!("{}_{k}", e.address).as_bytes()), i));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    /// The endpoint index for `hash`, and the ones after it around the ring (for skipping
    /// ejected endpoints).
    pub fn lookup(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|(h, _)| *h < hash);
        let n = self.points.len();
        (0..n).map(move |k| self.points[(start + k) % n].1)
    }

    /// Points on the ring.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether the ring has no points.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::HealthStatus;

    fn eps(n: u16) -> Vec<Arc<EndpointRuntime>> {
        (1..=n)
            .map(|p| {
                Arc::new(EndpointRuntime {
                    address: ([10, 0, 0, p as u8], 80).into(),
                    weight: 1,
                    priority: 0,
                    locality_weight: 1,
                    locality: 0,
                    health: HealthStatus::Healthy,
                    stats: Default::default(),
                    uniform: Default::default(),
                })
            })
            .collect()
    }

    #[test]
    fn same_key_same_endpoint_and_few_keys_move() {
        let four = eps(4);
        let ring = Ring::new(&four, 1024, 8 * 1024 * 1024);
        assert!(ring.len() >= 1024);
        let key = hash_bytes(b"user-42");
        let first = ring.lookup(key).next().unwrap();
        for _ in 0..1000 {
            assert_eq!(ring.lookup(key).next().unwrap(), first);
        }
        // Adding a fifth endpoint moves about 1/5 of the keys, and only to the new one.
        let five = eps(5);
        let ring5 = Ring::new(&five, 1024, 8 * 1024 * 1024);
        let keys = 10_000;
        let mut moved = 0;
        for k in 0..keys {
            let h = hash_bytes(format!("key-{k}").as_bytes());
            let a = four[ring.lookup(h).next().unwrap()].address;
            let b = five[ring5.lookup(h).next().unwrap()].address;
            if a != b {
                moved += 1;
                assert_eq!(b, five[4].address, "a moved key goes to the new endpoint");
            }
        }
        let share = f64::from(moved) / f64::from(keys);
        assert!((0.12..=0.28).contains(&share), "moved {share}");
        // Load spreads over all endpoints.
        let mut counts = [0u32; 4];
        for k in 0..keys {
            counts[ring
                .lookup(hash_bytes(format!("key-{k}").as_bytes()))
                .next()
                .unwrap()] += 1;
        }
        assert!(
            counts.iter().all(|c| (1500..=3500).contains(c)),
            "{counts:?}"
        );
    }
}
