use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::PoisonError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mesh_core::config::{
    Cluster, Discovery, EndpointAssignment, HealthStatus, Snapshot, UpstreamProtocol,
};
use mesh_core::identity::IdentityStore;
use mesh_core::ConfigStore;

use crate::tls::MeshConnector;

use super::service::MeshBody;
use crate::error::MeshError;

/// Per-endpoint load and outlier state, shared across configuration updates.
#[derive(Debug, Default)]
pub(crate) struct EndpointStats {
    pub(crate) in_flight: AtomicU32,
    pub(crate) requests: AtomicU64,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Nanoseconds after the registry's epoch until which the endpoint is ejected (0: not).
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    /// Outcomes in the current outlier-detection interval.
    interval_total: AtomicU64,
    interval_success: AtomicU64,
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

/// A cluster's live state: its config, endpoints, pool and breaker counters.
#[derive(Debug)]
pub struct ClusterRuntime {
    name: Arc<str>,
    config: ArcSwap<Cluster>,
    endpoints: ArcSwap<Vec<Arc<EndpointRuntime>>>,
    /// Routable endpoints by priority, highest first (precomputed: nothing is allocated or
    /// filtered per request).
    levels: ArcSwap<Vec<Vec<Arc<EndpointRuntime>>>>,
    /// One hash ring per level, for RING_HASH and MAGLEV clusters.
    rings: ArcSwap<Vec<super::ring::Ring>>,
    client: Client<MeshConnector, MeshBody>,
    /// Why requests cannot be sent (a TLS cluster without identity), if so.
    tls_error: Option<String>,
    /// Open connections and `max_connections`.
    connections: crate::tls::ConnectionLimit,
    metrics: Option<crate::metrics::Metrics>,
    protocol: UpstreamProtocol,
    tls: Option<mesh_core::config::UpstreamTls>,
    /// Round robin's position (see [`ClusterRuntime::next_round_robin`]).
    rr: AtomicUsize,
    active_requests: AtomicU32,
    active_retries: AtomicU32,
    overflows: AtomicU64,
    retry_overflows: AtomicU64,
    epoch: tokio::time::Instant,
    /// An assignment has been applied: endpoints added from now on get slow start.
    assigned: std::sync::atomic::AtomicBool,
    /// Nanos after `epoch` until which some endpoint may be in slow start (0: none).
    warming_until: AtomicU64,
    /// When the next interval sweep of outlier detection is due (nanos after `epoch`; 0: not
    /// started).
    next_sweep: AtomicU64,
    /// The config and assignment last applied: a snapshot that changes another cluster
    /// leaves this one untouched (same `Arc`s, nothing rebuilt).
    applied: Mutex<Applied>,
    /// DNS clusters: the task resolving the names, and its latest answer as endpoints.
    dns: Mutex<Option<super::dns::DnsTask>>,
    resolved: arc_swap::ArcSwapOption<EndpointAssignment>,
}

type Applied = Option<(Arc<Cluster>, Option<Arc<EndpointAssignment>>)>;

/// Holds one unit of the cluster's retry allowance; released on drop.
#[derive(Debug)]
pub struct RetryGuard {
    cluster: Arc<ClusterRuntime>,
}

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.cluster.active_retries.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Holds one unit of the cluster's `max_requests` budget; released on drop.
#[derive(Debug)]
pub struct RequestGuard {
    cluster: Arc<ClusterRuntime>,
    endpoint: Option<Arc<EndpointStats>>,
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

/// The connector for a cluster: TLS when the cluster has an `UpstreamTlsContext`, with the
/// workload identity, or with the trust and certificate the context names itself; `Err`
/// (kept and reported per request) when that TLS cannot be set up (no workload identity, an
/// unreadable CA file): the mesh never falls back to plaintext.
fn connector_for(
    cluster: &Cluster,
    identity: Option<&IdentityStore>,
) -> Result<MeshConnector, String> {
    let Some(tls) = &cluster.tls else {
        return Ok(MeshConnector::new(None, cluster.connect_timeout, None));
    };
    let alpn: Vec<Vec<u8>> = if !tls.alpn.is_empty() {
        tls.alpn.iter().map(|a| a.as_bytes().to_vec()).collect()
    } else {
        match cluster.protocol {
            UpstreamProtocol::Http2 => vec![b"h2".to_vec()],
            UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
            UpstreamProtocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        }
    };
    let config = if mesh_core::identity::is_external(tls) {
        // The cluster names its own trust (Istio's SIMPLE and MUTUAL modes).
        mesh_core::identity::external_client_config(tls, identity, alpn)
            .map_err(|e| format!("cluster {:?}: TLS: {e}", cluster.name))?
    } else {
        let identity = identity.ok_or_else(|| {
            format!("cluster {:?} requires mTLS but the client has no workload identity (set one on the MeshClient)", cluster.name)
        })?;
        mesh_core::identity::client_config(identity, tls.san_matchers.clone(), alpn)
            .map_err(|e| format!("cluster {:?}: TLS config: {e}", cluster.name))?
    };
    let sni = (!tls.sni.is_empty()).then(|| tls.sni.clone());
    Ok(MeshConnector::new(
        Some(Arc::new(config)),
        cluster.connect_timeout,
        sni,
    ))
}

fn client_for(cluster: &Cluster, connector: MeshConnector) -> Client<MeshConnector, MeshBody> {
    let mut builder = Client::builder(TokioExecutor::new());
    builder.pool_idle_timeout(Duration::from_secs(30));
    if cluster.protocol == UpstreamProtocol::Http2 {
        builder.http2_only(true);
        if let Some(h2) = &cluster.http2 {
            if let Some(w) = h2.initial_stream_window_size {
                builder.http2_initial_stream_window_size(w);
            }
            if let Some(w) = h2.initial_connection_window_size {
                builder.http2_initial_connection_window_size(w);
            }
        }
    }
    builder.build(connector)
}

impl ClusterRuntime {
    fn new(
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
    fn follow_dns(self: &Arc<Self>, cluster: &Cluster) {
        let mut dns = self
            .dns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &cluster.discovery {
            Discovery::Dns(d) => {
                if dns.as_ref().is_none_or(|t| t.discovery != *d) {
                    *dns = Some(super::dns::DnsTask::spawn(Arc::downgrade(self), d.clone()));
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

    /// Requests in flight through this cluster.
    pub fn active_requests(&self) -> u32 {
        self.active_requests.load(Ordering::Acquire)
    }

    /// Connections open to the cluster's endpoints now.
    pub fn open_connections(&self) -> u32 {
        self.connections.open.load(Ordering::Acquire)
    }

    /// The next round-robin position among `n` candidates (`n` > 0).
    pub(crate) fn next_round_robin(&self, n: usize) -> usize {
        self.rr.fetch_add(1, Ordering::Relaxed) % n
    }

    pub(crate) fn count_overflow(&self) {
        self.overflows.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests refused by the circuit breaker so far.
    pub fn overflows(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }

    pub(crate) fn client(&self) -> &Client<MeshConnector, MeshBody> {
        &self.client
    }

    /// Why this cluster cannot send requests (TLS required without identity), if so.
    pub fn tls_error(&self) -> Option<&str> {
        self.tls_error.as_deref()
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

    fn nanos(&self, at: tokio::time::Instant) -> u64 {
        at.saturating_duration_since(self.epoch)
            .as_nanos()
            .min(u128::from(u64::MAX - 1)) as u64
            + 1
    }

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
    fn eject(
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
    fn sweep(&self, od: &mesh_core::config::OutlierDetection, now: tokio::time::Instant) {
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

    /// Applies a new config and endpoint assignment, keeping state of unchanged endpoints.
    fn update(&self, cluster: Arc<Cluster>, cla: Option<&EndpointAssignment>) {
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

/// Every cluster's runtime, following the config store.
#[derive(Debug)]
pub struct ClusterRegistry {
    clusters: ArcSwap<HashMap<String, Arc<ClusterRuntime>>>,
    store: ConfigStore,
    identity: Option<IdentityStore>,
    metrics: Option<crate::metrics::Metrics>,
    /// Serializes writers (the sync task and on-demand creation).
    write: Mutex<()>,
    /// The snapshot generation last applied.
    generation: AtomicU64,
    /// Clusters the configuration dropped lately, with when: a request routed by the
    /// snapshot before (its route still names them) is still served (break after make).
    retired: Mutex<HashMap<String, (Arc<ClusterRuntime>, tokio::time::Instant)>>,
}

/// How long a dropped cluster still serves requests routed to it before it was dropped.
const RETIRED_GRACE: Duration = Duration::from_secs(5);

impl ClusterRegistry {
    /// A registry following `store`. Spawns the task that applies each new snapshot (it ends
    /// when the registry is dropped).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new(store: ConfigStore) -> Arc<Self> {
        Self::with_identity(store, None)
    }

    /// A registry whose TLS clusters present `identity` (mTLS with SPIFFE verification).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn with_identity(store: ConfigStore, identity: Option<IdentityStore>) -> Arc<Self> {
        Self::build(store, identity, None)
    }

    /// A registry with a workload identity for TLS clusters and metrics for outlier ejections.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn build(
        store: ConfigStore,
        identity: Option<IdentityStore>,
        metrics: Option<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        let registry = Arc::new(Self {
            clusters: ArcSwap::from_pointee(HashMap::new()),
            store: store.clone(),
            identity,
            metrics,
            write: Mutex::new(()),
            generation: AtomicU64::new(0),
            retired: Mutex::new(HashMap::new()),
        });
        registry.sync(&store.load());
        let weak = Arc::downgrade(&registry);
        let mut changes = store.subscribe();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(registry) = weak.upgrade() else {
                    return;
                };
                registry.sync(&registry.store.load());
            }
        });
        registry
    }

    /// The runtime of a cluster in the store's current snapshot (applied here first if the
    /// sync task has not reached it yet).
    pub fn get(&self, name: &str) -> Option<Arc<ClusterRuntime>> {
        // Correctness: a request routed by a new snapshot must not meet clusters of an old
        // one, so apply a snapshot the sync task has not reached yet here, once.
        let snapshot = self.store.load();
        if snapshot.generation() > self.generation.load(Ordering::Acquire) {
            self.sync(&snapshot);
        }
        self.clusters.load().get(name).cloned()
    }

    /// [`get`](Self::get), or a cluster dropped in the last seconds: for a request routed
    /// by a snapshot that still named it.
    pub fn get_routed(&self, name: &str) -> Option<Arc<ClusterRuntime>> {
        self.get(name).or_else(|| {
            let retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
            retired
                .get(name)
                .filter(|(_, at)| at.elapsed() < RETIRED_GRACE)
                .map(|(rt, _)| rt.clone())
        })
    }

    /// For an aggregate cluster, the first of its clusters (in order, nested aggregates
    /// followed) that has an endpoint able to take a request now; other clusters are
    /// returned as they are. With none able, the first existing one, so the request fails as
    /// that cluster would.
    ///
    /// # Errors
    /// An aggregate none of whose clusters is in the configuration.
    pub fn pick_aggregate(
        &self,
        cluster: Arc<ClusterRuntime>,
    ) -> Result<Arc<ClusterRuntime>, crate::error::MeshError> {
        // Correctness: this runs on every request; a guard (no reference count) decides the
        // common case, a cluster that is not an aggregate.
        if !matches!(cluster.config.load().discovery, Discovery::Aggregate(_)) {
            return Ok(cluster);
        }
        let config = cluster.config();
        let now = tokio::time::Instant::now();
        let mut first = None;
        // Depth-first over the priority list; the bound ends cycles.
        let mut stack: Vec<(Arc<Cluster>, usize)> = vec![(config, 0)];
        let mut visited = 0;
        while let Some((agg, i)) = stack.pop() {
            let Discovery::Aggregate(children) = &agg.discovery else {
                continue;
            };
            let Some(name) = children.get(i) else {
                continue;
            };
            stack.push((agg.clone(), i + 1));
            visited += 1;
            if visited > 64 {
                break;
            }
            let Some(child) = self.get(name) else {
                continue;
            };
            let child_config = child.config();
            if let Discovery::Aggregate(_) = child_config.discovery {
                stack.push((child_config, 0));
                continue;
            }
            if child
                .levels()
                .iter()
                .any(|l| l.iter().any(|e| !child.is_ejected(e, now)))
            {
                return Ok(child);
            }
            first.get_or_insert(child);
        }
        first.ok_or_else(|| crate::error::MeshError::NoHealthyEndpoint {
            cluster: cluster.name().to_owned(),
        })
    }

    /// Applies `snapshot`: creates, updates and drops cluster runtimes.
    pub fn sync(&self, snapshot: &Snapshot) {
        let _w = self.write.lock().expect("registry write lock");
        if snapshot.generation() != 0
            && snapshot.generation() <= self.generation.load(Ordering::Acquire)
        {
            return;
        }
        let current = self.clusters.load_full();
        let mut next = HashMap::with_capacity(snapshot.clusters().len());
        for (name, cluster) in snapshot.clusters() {
            let runtime = match current.get(name) {
                // A change of protocol or TLS settings needs a new pool; everything else updates
                // in place.
                Some(rt) if rt.protocol == cluster.protocol && rt.tls == cluster.tls => rt.clone(),
                _ => Arc::new(ClusterRuntime::new(
                    cluster.clone(),
                    self.identity.as_ref(),
                    self.metrics.clone(),
                )),
            };
            runtime.follow_dns(cluster);
            let cla = match &cluster.discovery {
                Discovery::Dns(_) => runtime.resolved.load_full(),
                _ => snapshot.endpoints_for_cluster(name),
            };
            {
                // `applied` is written here (under `write`) and by a DNS cluster's resolving
                // task, each under the `applied` lock, whole values at a time: a poisoned lock
                // still holds a consistent value.
                let mut applied = runtime
                    .applied
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let same = applied.as_ref().is_some_and(|(c, a)| {
                    Arc::ptr_eq(c, cluster)
                        && a.as_ref().map(Arc::as_ptr) == cla.as_ref().map(Arc::as_ptr)
                });
                if !same {
                    runtime.update(cluster.clone(), cla.as_deref());
                    *applied = Some((cluster.clone(), cla));
                }
            }
            next.insert(name.clone(), runtime);
        }
        {
            let now = tokio::time::Instant::now();
            let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
            retired.retain(|n, (_, at)| !next.contains_key(n) && at.elapsed() < RETIRED_GRACE);
            for (name, rt) in current.iter() {
                if !next.contains_key(name) {
                    retired.insert(name.clone(), (rt.clone(), now));
                }
            }
        }
        self.clusters.store(Arc::new(next));
        self.generation
            .store(snapshot.generation(), Ordering::Release);
    }
}
