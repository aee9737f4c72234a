//! A cluster's runtime: its configuration, endpoints by priority level, hash rings and
//! slow start, updated in place by each snapshot.

use crate::tls::MeshConnector;
use arc_swap::ArcSwap;
use hyper_util::client::legacy::Client;
use mesh_core::config::{Cluster, Discovery, EndpointAssignment, UpstreamProtocol};
use mesh_core::identity::IdentityStore;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::pool::{client_for, connector_for};
use super::service::MeshBody;
use super::{EndpointRuntime, EndpointStats};

/// A cluster's live state: its config, endpoints, pool and breaker counters.
#[derive(Debug)]
pub struct ClusterRuntime {
    pub(super) name: Arc<str>,
    pub(super) config: ArcSwap<Cluster>,
    pub(super) endpoints: ArcSwap<Vec<Arc<EndpointRuntime>>>,
    /// Routable endpoints by priority, highest first (precomputed: nothing is allocated or
    /// filtered per request).
    pub(super) levels: ArcSwap<Vec<Vec<Arc<EndpointRuntime>>>>,
    /// One hash ring per level, for RING_HASH and MAGLEV clusters.
    pub(super) rings: ArcSwap<Vec<super::ring::Ring>>,
    pub(super) client: Client<MeshConnector, MeshBody>,
    /// Why requests cannot be sent (a TLS cluster without identity), if so.
    pub(super) tls_error: Option<String>,
    /// Open connections and `max_connections`.
    pub(super) connections: crate::tls::ConnectionLimit,
    pub(super) metrics: Option<crate::metrics::Metrics>,
    pub(super) protocol: UpstreamProtocol,
    pub(super) tls: Option<mesh_core::config::UpstreamTls>,
    /// Round robin's position (see [`ClusterRuntime::next_round_robin`]).
    pub(super) rr: AtomicUsize,
    pub(super) active_requests: AtomicU32,
    pub(super) active_retries: AtomicU32,
    pub(super) overflows: AtomicU64,
    pub(super) retry_overflows: AtomicU64,
    pub(super) epoch: tokio::time::Instant,
    /// An assignment has been applied: endpoints added from now on get slow start.
    pub(super) assigned: std::sync::atomic::AtomicBool,
    /// Nanos after `epoch` until which some endpoint may be in slow start (0: none).
    pub(super) warming_until: AtomicU64,
    /// When the next interval sweep of outlier detection is due (nanos after `epoch`; 0: not
    /// started).
    pub(super) next_sweep: AtomicU64,
    /// The config and assignment last applied: a snapshot that changes another cluster
    /// leaves this one untouched (same `Arc`s, nothing rebuilt).
    pub(super) applied: Mutex<Applied>,
    /// DNS clusters: the task resolving the names, and its latest answer as endpoints.
    pub(super) dns: Mutex<Option<super::dns::DnsTask>>,
    pub(super) resolved: arc_swap::ArcSwapOption<EndpointAssignment>,
}

type Applied = Option<(Arc<Cluster>, Option<Arc<EndpointAssignment>>)>;

impl ClusterRuntime {
    /// Connections open to the cluster's endpoints now.
    pub fn open_connections(&self) -> u32 {
        self.connections.open.load(Ordering::Acquire)
    }

    pub(crate) fn client(&self) -> &Client<MeshConnector, MeshBody> {
        &self.client
    }

    /// Why this cluster cannot send requests (TLS required without identity), if so.
    pub fn tls_error(&self) -> Option<&str> {
        self.tls_error.as_deref()
    }

    pub(super) fn new(
        cluster: Arc<Cluster>,
        identity: Option<&IdentityStore>,
        metrics: Option<crate::metrics::Metrics>,
    ) -> Self {
        let (connector, tls_error) = match connector_for(&cluster, identity) {
            Ok(c) => (c, None),
            Err(e) => {
                tracing::warn!("{e}");
                (
                    MeshConnector::new(None, cluster.connect_timeout, None),
                    Some(e),
                )
            }
        };
        let limit = crate::tls::ConnectionLimit::default();
        limit.max.store(
            cluster.circuit_breakers.default.max_connections,
            Ordering::Release,
        );
        limit.max_pending.store(
            cluster.circuit_breakers.default.max_pending_requests,
            Ordering::Release,
        );
        let mut connector = connector.with_limit(limit.clone());
        if let Some(m) = &metrics {
            connector = connector.with_metrics(m.clone());
        }
        Self {
            name: cluster.name.as_str().into(),
            client: client_for(&cluster, connector),
            connections: limit,
            metrics,
            tls_error,
            protocol: cluster.protocol,
            tls: cluster.tls.clone(),
            config: ArcSwap::new(cluster),
            endpoints: ArcSwap::from_pointee(Vec::new()),
            levels: ArcSwap::from_pointee(Vec::new()),
            rings: ArcSwap::from_pointee(Vec::new()),
            rr: AtomicUsize::new(0),
            active_requests: AtomicU32::new(0),
            active_retries: AtomicU32::new(0),
            overflows: AtomicU64::new(0),
            retry_overflows: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
            assigned: Default::default(),
            warming_until: AtomicU64::new(0),
            next_sweep: AtomicU64::new(0),
            applied: Mutex::new(None),
            dns: Mutex::new(None),
            resolved: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// Keeps a DNS cluster's resolving task in line with its config (started, replaced when
    /// the names or settings change, stopped when the cluster is no longer DNS).
    pub(super) fn follow_dns(self: &Arc<Self>, cluster: &Cluster) {
        let mut dns = self
            .dns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &cluster.discovery {
            Discovery::Dns(d) => {
                if dns.as_ref().is_none_or(|t| t.discovery != *d) {
                    let runtime = Arc::downgrade(self);
                    let apply = move |cla| match runtime.upgrade() {
                        Some(rt) => {
                            rt.apply_resolved(cla);
                            true
                        }
                        None => false,
                    };
                    *dns = Some(super::dns::DnsTask::spawn(
                        self.name().to_owned(),
                        d.clone(),
                        apply,
                    ));
                }
            }
            _ => {
                *dns = None;
                self.resolved.store(None);
            }
        }
    }

    /// A DNS answer: the cluster's endpoints from now on (nothing changes when the answer
    /// is the same).
    pub(crate) fn apply_resolved(&self, cla: Arc<EndpointAssignment>) {
        if self.resolved.load().as_deref() == Some(&*cla) {
            return;
        }
        self.resolved.store(Some(cla.clone()));
        let mut applied = self
            .applied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cluster = self.config.load_full();
        self.update(cluster.clone(), Some(&cla));
        *applied = Some((cluster, Some(cla)));
    }

    /// The name, shared (no allocation per request).
    pub(crate) fn shared_name(&self) -> Arc<str> {
        self.name.clone()
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current config.
    pub fn config(&self) -> Arc<Cluster> {
        self.config.load_full()
    }

    /// The current endpoints, sorted by priority.
    pub fn endpoints(&self) -> Arc<Vec<Arc<EndpointRuntime>>> {
        self.endpoints.load_full()
    }

    /// Routable endpoints by priority, highest first.
    pub fn levels(&self) -> Arc<Vec<Vec<Arc<EndpointRuntime>>>> {
        self.levels.load_full()
    }

    /// The hash rings, one per level (empty unless the cluster hashes).
    pub fn rings(&self) -> Arc<Vec<super::ring::Ring>> {
        self.rings.load_full()
    }

    /// The next round-robin position among `n` candidates (`n` > 0).
    pub(crate) fn next_round_robin(&self, n: usize) -> usize {
        self.rr.fetch_add(1, Ordering::Relaxed) % n
    }

    /// The slow-start weight factor of `endpoint` now (1.0 when it is not warming up).
    pub(crate) fn warm_factor(&self, endpoint: &EndpointRuntime, now: u64) -> f64 {
        let since = endpoint.stats.warm_since.load(Ordering::Relaxed);
        let Some(ss) = self.config.load().slow_start.clone().filter(|_| since != 0) else {
            return 1.0;
        };
        let elapsed = Duration::from_nanos(now.saturating_sub(since));
        if elapsed >= ss.window {
            endpoint.stats.warm_since.store(0, Ordering::Relaxed);
            return 1.0;
        }
        ss.factor(elapsed)
    }

    /// Nanos after the epoch now, when some endpoint may be warming up; `None` otherwise (the
    /// common case costs one load).
    pub(crate) fn warming_now(&self) -> Option<u64> {
        let until = self.warming_until.load(Ordering::Relaxed);
        if until == 0 {
            return None;
        }
        let now = self.nanos(tokio::time::Instant::now());
        if now >= until {
            let _ =
                self.warming_until
                    .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed);
            return None;
        }
        Some(now)
    }

    pub(super) fn nanos(&self, at: tokio::time::Instant) -> u64 {
        at.saturating_duration_since(self.epoch)
            .as_nanos()
            .min(u128::from(u64::MAX - 1)) as u64
            + 1
    }

    /// Applies a new config and endpoint assignment, keeping state of unchanged endpoints.
    pub(super) fn update(&self, cluster: Arc<Cluster>, cla: Option<&EndpointAssignment>) {
        let old: HashMap<SocketAddr, Arc<EndpointStats>> = self
            .endpoints
            .load()
            .iter()
            .map(|e| (e.address, e.stats.clone()))
            .collect();
        // Endpoints new in an assignment after the first one start slow (when configured).
        let had_assignment = self.assigned.load(Ordering::Acquire);
        if cla.is_some() {
            self.assigned.store(true, Ordering::Release);
        }
        let now = self.nanos(tokio::time::Instant::now());
        let slow_start = cluster.slow_start.as_ref().filter(|_| had_assignment);
        let stats_for = |address: &SocketAddr| match old.get(address) {
            Some(stats) => stats.clone(),
            None => {
                let stats = EndpointStats::default();
                if let Some(ss) = slow_start {
                    stats.warm_since.store(now.max(1), Ordering::Relaxed);
                    let until =
                        now.saturating_add(ss.window.as_nanos().min(u128::from(u64::MAX)) as u64);
                    self.warming_until.fetch_max(until, Ordering::AcqRel);
                }
                Arc::new(stats)
            }
        };
        let mut endpoints: Vec<Arc<EndpointRuntime>> = cla
            .map(|cla| {
                cla.localities
                    .iter()
                    .enumerate()
                    .flat_map(|(li, loc)| loc.endpoints.iter().map(move |e| (li, loc, e)))
                    .map(|(li, loc, e)| {
                        Arc::new(EndpointRuntime {
                            address: e.address,
                            weight: e.weight,
                            priority: loc.priority,
                            locality_weight: loc.weight,
                            locality: li,
                            health: e.health,
                            stats: stats_for(&e.address),
                            uniform: Default::default(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        endpoints.sort_by_key(|e| e.priority);
        let levels = super::balance::levels(&endpoints);
        let rings = match cluster.lb_policy {
            mesh_core::config::LbPolicy::RingHash {
                min_ring_size,
                max_ring_size,
            } => levels
                .iter()
                .map(|l| super::ring::Ring::new(l, min_ring_size, max_ring_size))
                .collect(),
            mesh_core::config::LbPolicy::Maglev { table_size } => levels
                .iter()
                .map(|l| super::ring::Ring::new(l, table_size, table_size))
                .collect(),
            _ => Vec::new(),
        };
        self.rings.store(Arc::new(rings));
        self.connections.max.store(
            cluster.circuit_breakers.default.max_connections,
            Ordering::Release,
        );
        self.connections.max_pending.store(
            cluster.circuit_breakers.default.max_pending_requests,
            Ordering::Release,
        );
        self.levels.store(Arc::new(levels));
        self.endpoints.store(Arc::new(endpoints));
        self.config.store(cluster);
    }
}
