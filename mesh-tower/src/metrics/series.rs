//! The metrics registry: series by direction and label set, their atomics, and their
//! exposition (Prometheus text, Istio's metrics when turned on).

use super::istio::{self, Workload};

use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Which side of the service a request is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Requests the service makes.
    Outbound,
    /// Requests the service serves.
    Inbound,
}

impl Direction {
    /// `outbound` or `inbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// Which labels to keep (all on by default).
#[derive(Clone, Copy, Debug)]
pub struct LabelConfig {
    /// The route name.
    pub route: bool,
    /// The cluster (service and subset).
    pub cluster: bool,
    /// The peer's SPIFFE identity (inbound: the authenticated client). Identities are as
    /// many as the workloads calling, not as many as their addresses.
    pub peer: bool,
}

impl Default for LabelConfig {
    fn default() -> Self {
        Self {
            route: true,
            cluster: true,
            peer: true,
        }
    }
}

/// How a request ended, for the outcome label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP status (its class is the label: `2xx`...).
    Http(u16),
    /// A gRPC status code (the label is its name).
    Grpc(u32),
    /// No response: connection failure, timeout, refusal by a breaker.
    Error,
}

use mesh_core::config::GRPC_STATUS_NAMES as GRPC_NAMES;
const HTTP_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// HTTP classes, gRPC codes, error.
const OUTCOMES: usize = 5 + 17 + 1;

impl Outcome {
    pub(super) fn index(self) -> usize {
        match self {
            Self::Http(s) => (usize::from(s / 100).clamp(1, 5)) - 1,
            Self::Grpc(c) => 5 + (c as usize).min(16),
            Self::Error => OUTCOMES - 1,
        }
    }

    pub(super) fn label(i: usize) -> &'static str {
        if i < 5 {
            HTTP_CLASSES[i]
        } else if i < 22 {
            GRPC_NAMES[i - 5]
        } else {
            "error"
        }
    }

    /// Whether it counts as a success for the success rate (not 5xx, not a gRPC server
    /// error, not a local error).
    pub fn is_success(self) -> bool {
        match self {
            Self::Http(s) => s < 500,
            Self::Grpc(c) => !matches!(c, 2 | 4 | 8 | 13 | 14 | 15),
            Self::Error => false,
        }
    }
}

/// Latency buckets in seconds: 100 µs to 10 s, roughly ×2.5 apart.
pub const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// One label set's values.
#[derive(Debug, Default)]
pub struct Series {
    pub(super) outcomes: [AtomicU64; OUTCOMES],
    pub(super) buckets: [AtomicU64; BUCKETS.len() + 1],
    pub(super) sum_nanos: AtomicU64,
    pub(super) in_flight: AtomicI64,
}

impl Series {
    /// Records a finished request.
    pub fn record(&self, outcome: Outcome, latency: Duration) {
        self.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
        let secs = latency.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            latency.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    /// Requests by outcome label.
    pub fn outcomes(&self) -> Vec<(&'static str, u64)> {
        self.outcomes
            .iter()
            .enumerate()
            .map(|(i, v)| (Outcome::label(i), v.load(Ordering::Relaxed)))
            .filter(|(_, v)| *v > 0)
            .collect()
    }

    /// All requests recorded.
    pub fn total(&self) -> u64 {
        self.outcomes
            .iter()
            .map(|v| v.load(Ordering::Relaxed))
            .sum()
    }

    /// The sum of all recorded latencies.
    pub fn latency_sum(&self) -> Duration {
        Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed))
    }

    /// Successes (see [`Outcome::is_success`]).
    pub fn successes(&self) -> u64 {
        let http_ok: u64 = self.outcomes[..4]
            .iter()
            .map(|v| v.load(Ordering::Relaxed))
            .sum();
        let grpc_ok: u64 = (0..17)
            .filter(|c| Outcome::Grpc(*c).is_success())
            .map(|c| self.outcomes[5 + c as usize].load(Ordering::Relaxed))
            .sum();
        http_ok + grpc_ok
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The latency below which `q` (0..=1) of requests fell, from the histogram (the upper
    /// bound of the bucket holding that rank).
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_secs_f64(
                    *BUCKETS.get(i).unwrap_or(&BUCKETS[BUCKETS.len() - 1]),
                ));
            }
        }
        None
    }
}

// Label values are short strings looked up on every request: FxHash, not SipHash (the
// keys come from configuration and authenticated identities, not from request bytes).
type PeerMap = FxHashMap<Arc<str>, Arc<Series>>;
type RouteMap = FxHashMap<Arc<str>, PeerMap>;
type ClusterMap = FxHashMap<Arc<str>, RouteMap>;

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) labels: LabelConfig,
    pub(super) series: [ArcSwap<ClusterMap>; 2],
    pub(super) write: Mutex<()>,
    pub(super) counters: Counters,
    pub(super) xds: std::sync::OnceLock<mesh_core::ConfigStore>,
    pub(super) identity: std::sync::OnceLock<mesh_core::identity::IdentityStore>,
    pub(super) istio: std::sync::OnceLock<Arc<istio::Istio>>,
}

/// A series and its labels.
#[derive(Clone, Debug)]
pub struct Labelled {
    /// The cluster label.
    pub cluster: String,
    /// The route label.
    pub route: String,
    /// The peer label (empty when unknown or turned off).
    pub peer: String,
    /// The values.
    pub series: Arc<Series>,
}

/// Event counters that are not per request.
#[derive(Debug, Default)]
pub struct Counters {
    /// Retries sent.
    pub retries: AtomicU64,
    /// Requests refused by circuit breakers.
    pub overflows: AtomicU64,
    /// Outlier ejections.
    pub ejections: AtomicU64,
    /// Faults injected.
    pub faults: AtomicU64,
    /// TLS handshakes that failed.
    pub tls_failures: AtomicU64,
    /// Requests that waited for their configuration to arrive.
    pub config_waits: AtomicU64,
    /// Requests sent after waiting the whole bound with their configuration still incomplete.
    pub config_waits_expired: AtomicU64,
}

/// The metrics of a service: cheap to clone, shared by its layers and its admin endpoint.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub(super) inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(LabelConfig::default())
    }
}

impl Metrics {
    /// Metrics with the given labels.
    pub fn new(labels: LabelConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                labels,
                series: [
                    ArcSwap::from_pointee(FxHashMap::default()),
                    ArcSwap::from_pointee(FxHashMap::default()),
                ],
                write: Mutex::new(()),
                counters: Counters::default(),
                xds: std::sync::OnceLock::new(),
                identity: std::sync::OnceLock::new(),
                istio: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Also records Istio's standard metrics for `workload` (see [`istio`]): opt-in, next to
    /// the `mesh_*` metrics, on both sides, with Istio's metadata exchange on the wire. The
    /// first workload given is kept.
    ///
    /// ```
    /// use mesh_tower::metrics::{Metrics, Workload};
    /// let node = mesh_core::xds::Bootstrap::new("127.0.0.1:15010", "reviews-v2").node;
    /// let metrics = Metrics::default().istio(
    ///     Workload::from_node(&node).principal("spiffe://cluster.local/ns/prod/sa/reviews"),
    /// );
    /// assert!(metrics.render().contains("istio_requests"));
    /// ```
    pub fn istio(self, workload: Workload) -> Self {
        let _ = self.inner.istio.set(Arc::new(istio::Istio::new(workload)));
        self
    }

    pub(crate) fn istio_state(&self) -> Option<&Arc<istio::Istio>> {
        self.inner.istio.get()
    }

    /// Reports the xDS responses `store`'s client accepts and rejects
    /// (`mesh_xds_updates_total`, `mesh_xds_nacks_total`). The first store given is kept.
    pub fn observe_xds(&self, store: &mesh_core::ConfigStore) {
        let _ = self.inner.xds.set(store.clone());
    }

    /// Exposes the certificate of `identity`: the seconds until it expires
    /// (`mesh_identity_expiry_seconds`, negative once expired) and the handshakes that
    /// presented it expired (`mesh_identity_expired_handshakes`). The first identity given
    /// is the one shown.
    pub fn observe_identity(&self, identity: &mesh_core::identity::IdentityStore) {
        let _ = self.inner.identity.set(identity.clone());
    }

    /// The xDS responses accepted and rejected by the client of the store given to
    /// [`Metrics::observe_xds`] (zero without one).
    pub fn xds_counts(&self) -> mesh_core::XdsCounts {
        self.inner
            .xds
            .get()
            .map(|s| s.xds_counts())
            .unwrap_or_default()
    }

    /// Event counters.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// The series of a label set without a peer (created on first use). Allocation-free and
    /// lock-free when it exists.
    pub fn series(&self, direction: Direction, route: &str, cluster: &str) -> Arc<Series> {
        self.series_with_peer(direction, route, cluster, "")
    }

    /// The series of a full label set (created on first use). Allocation-free and lock-free
    /// when it exists.
    pub fn series_with_peer(
        &self,
        direction: Direction,
        route: &str,
        cluster: &str,
        peer: &str,
    ) -> Arc<Series> {
        let labels = &self.inner.labels;
        let route = if labels.route { route } else { "" };
        let cluster = if labels.cluster { cluster } else { "" };
        let peer = if labels.peer { peer } else { "" };
        let map = &self.inner.series[direction as usize];
        if let Some(s) = map
            .load()
            .get(cluster)
            .and_then(|r| r.get(route))
            .and_then(|p| p.get(peer))
        {
            return s.clone();
        }
        let _w = self
            .inner
            .write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = (**map.load()).clone();
        let series = next
            .entry(Arc::from(cluster))
            .or_default()
            .entry(Arc::from(route))
            .or_default()
            .entry(Arc::from(peer))
            .or_default()
            .clone();
        map.store(Arc::new(next));
        series
    }

    /// Every series of a direction, sorted by cluster, route and peer.
    pub fn all(&self, direction: Direction) -> Vec<Labelled> {
        let map = self.inner.series[direction as usize].load();
        let mut out: Vec<Labelled> = Vec::new();
        for (c, routes) in map.iter() {
            for (r, peers) in routes {
                for (p, s) in peers {
                    out.push(Labelled {
                        cluster: c.to_string(),
                        route: r.to_string(),
                        peer: p.to_string(),
                        series: s.clone(),
                    });
                }
            }
        }
        out.sort_by(|a, b| (&a.cluster, &a.route, &a.peer).cmp(&(&b.cluster, &b.route, &b.peer)));
        out
    }

    /// Prometheus / OpenMetrics text.
    pub fn render(&self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self.clone()));
        let mut out = String::new();
        // Correctness: encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

impl prometheus_client::collector::Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let series: Vec<(Direction, Labelled)> = [Direction::Outbound, Direction::Inbound]
            .into_iter()
            .flat_map(|d| self.all(d).into_iter().map(move |l| (d, l)))
            .collect();
        encode_series(&series, &mut encoder)?;
        self.encode_counters(&mut encoder)?;
        if let Some(istio) = self.istio_state() {
            encode_istio(istio, &mut encoder)?;
        }
        Ok(())
    }
}

/// The per-series metrics: requests by outcome, the latency histogram, requests in flight.
pub(super) fn encode_series(
    series: &[(Direction, Labelled)],
    encoder: &mut DescriptorEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    {
        let mut m = encoder.encode_descriptor(
            "mesh_requests",
            "Requests by outcome (HTTP status class or gRPC status).",
            None,
            MetricType::Counter,
        )?;
        for (d, l) in series {
            for (outcome, v) in l.series.outcomes() {
                let labels = [
                    ("direction", d.as_str()),
                    ("route", l.route.as_str()),
                    ("cluster", l.cluster.as_str()),
                    ("peer", l.peer.as_str()),
                    ("outcome", outcome),
                ];
                ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
            }
        }
    }
    {
        let mut m = encoder.encode_descriptor(
            "mesh_request_duration_seconds",
            "Request latency.",
            None,
            MetricType::Histogram,
        )?;
        for (d, l) in series {
            let s = &l.series;
            let labels = [
                ("direction", d.as_str()),
                ("route", l.route.as_str()),
                ("cluster", l.cluster.as_str()),
                ("peer", l.peer.as_str()),
            ];
            // Per-bucket counts: prometheus-client's encoder accumulates them (passing
            // running totals here made every bucket count the ones below it twice,
            // which a real Prometheus's histogram_quantile showed).
            let mut cumulative = 0;
            let mut buckets = Vec::with_capacity(BUCKETS.len() + 1);
            for (i, b) in s.buckets.iter().enumerate() {
                let n = b.load(Ordering::Relaxed);
                cumulative += n;
                buckets.push((BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), n));
            }
            let sum = s.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            m.encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum, cumulative, &buckets, None,
                )?;
        }
    }
    {
        let mut m = encoder.encode_descriptor(
            "mesh_requests_in_flight",
            "Requests in flight.",
            None,
            MetricType::Gauge,
        )?;
        for (d, l) in series {
            let labels = [
                ("direction", d.as_str()),
                ("route", l.route.as_str()),
                ("cluster", l.cluster.as_str()),
                ("peer", l.peer.as_str()),
            ];
            ConstGauge::new(l.series.in_flight()).encode(m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

impl Metrics {
    /// The event counters: retries, overflows, ejections, faults, waits, handshake
    /// failures and xDS updates.
    pub(super) fn encode_counters(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        let c = &self.inner.counters;
        for (name, help, v) in [
            ("mesh_retries", "Retries sent.", &c.retries),
            (
                "mesh_breaker_overflows",
                "Requests refused by circuit breakers.",
                &c.overflows,
            ),
            (
                "mesh_outlier_ejections",
                "Endpoints ejected by outlier detection.",
                &c.ejections,
            ),
            ("mesh_faults_injected", "Faults injected.", &c.faults),
            (
                "mesh_config_waits",
                "Requests that waited for their configuration to arrive.",
                &c.config_waits,
            ),
            (
                "mesh_config_waits_expired",
                "Requests sent after waiting the whole bound for configuration that did not arrive.",
                &c.config_waits_expired,
            ),
            (
                "mesh_tls_handshake_failures",
                "TLS handshakes that failed.",
                &c.tls_failures,
            ),
        ] {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v.load(Ordering::Relaxed)).encode(m)?;
        }
        if let Some(id) = self.inner.identity.get() {
            let not_after = id.load().not_after;
            let expiry = match not_after.duration_since(std::time::SystemTime::now()) {
                Ok(left) => left.as_secs_f64(),
                Err(past) => -past.duration().as_secs_f64(),
            };
            let m = encoder.encode_descriptor(
                "mesh_identity_expiry_seconds",
                "Seconds until this workload's certificate expires (negative: expired, the renewal has not arrived).",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(expiry).encode(m)?;
            let m = encoder.encode_descriptor(
                "mesh_identity_expired_handshakes",
                "Handshakes that presented this workload's certificate after it expired (peers refuse them).",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(id.expired_uses()).encode(m)?;
        }
        if let Some(saved) = self.inner.xds.get().and_then(|s| s.dump().from_cache) {
            let m = encoder.encode_descriptor(
                "mesh_xds_cache_age_seconds",
                "Age of the cache file the configuration in use came from (present only while no xDS server has answered).",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(saved.elapsed().unwrap_or_default().as_secs_f64()).encode(m)?;
        }
        let xds = self.xds_counts();
        for (name, help, v) in [
            (
                "mesh_xds_updates",
                "xDS responses accepted (ACKed).",
                xds.acked,
            ),
            (
                "mesh_xds_nacks",
                "xDS responses rejected (NACKed); the last good configuration kept serving.",
                xds.nacked,
            ),
            (
                "mesh_xds_route_holds_expired",
                "Route updates applied after waiting the whole bound for clusters that did not arrive.",
                xds.route_holds_expired,
            ),
        ] {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(m)?;
        }
        Ok(())
    }
}

/// Istio's standard metrics, with Istio's names, labels and buckets.
pub(super) fn encode_istio(
    istio: &istio::Istio,
    encoder: &mut DescriptorEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    let series: Vec<_> = {
        let map = istio.series.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, s)| (k.clone(), s.clone())).collect()
    };
    let labels = |k: &istio::Key| -> Vec<(&'static str, String)> {
        istio::LABELS
            .iter()
            .zip(k.iter())
            .map(|(n, v)| (*n, v.to_string()))
            .collect()
    };
    {
        let mut m = encoder.encode_descriptor(
            "istio_requests",
            "Requests, as Istio counts them.",
            None,
            MetricType::Counter,
        )?;
        for (k, s) in &series {
            ConstCounter::new(s.requests.load(Ordering::Relaxed))
                .encode(m.encode_family(&labels(k))?)?;
        }
    }
    for (name, help, bounds, pick) in [
        (
            "istio_request_duration_milliseconds",
            "Request duration, in milliseconds.",
            &istio::DURATION_BUCKETS_MS[..],
            0,
        ),
        (
            "istio_request_bytes",
            "Request body sizes.",
            &istio::SIZE_BUCKETS[..],
            1,
        ),
        (
            "istio_response_bytes",
            "Response body sizes.",
            &istio::SIZE_BUCKETS[..],
            2,
        ),
    ] {
        let mut m = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (k, s) in &series {
            let (buckets, sum, count) = match pick {
                0 => s.duration.snapshot(bounds),
                1 => s.request_bytes.snapshot(bounds),
                _ => s.response_bytes.snapshot(bounds),
            };
            m.encode_family(&labels(k))?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum, count, &buckets, None,
                )?;
        }
    }
    Ok(())
}
