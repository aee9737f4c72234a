//! Upstream clusters (CDS).

use std::sync::Arc;
use std::time::Duration;

use super::endpoint::EndpointAssignment;
use super::tls::UpstreamTls;

/// Where a cluster's endpoints come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Discovery {
    /// From EDS, under this service name.
    Eds {
        /// The `ClusterLoadAssignment` name to subscribe to.
        service_name: String,
    },
    /// Listed in the cluster itself.
    Static(Arc<EndpointAssignment>),
    /// Host names resolved by DNS (`STRICT_DNS`, `LOGICAL_DNS`, or the `envoy.clusters.dns`
    /// extension).
    Dns(Arc<DnsDiscovery>),
    /// An aggregate cluster (`envoy.clusters.aggregate`): these clusters in priority order;
    /// a request goes to the first that has an endpoint to take it, balanced by that
    /// cluster's own policy (gRFC A37 and A75).
    Aggregate(Arc<[String]>),
}

/// A DNS cluster: its host names, and how and how often to resolve them.
#[derive(Clone, Debug, PartialEq)]
pub struct DnsDiscovery {
    /// `LOGICAL_DNS` (or `all_addresses_in_single_endpoint`): one endpoint, at the first
    /// address resolved; otherwise (`STRICT_DNS`) every address is an endpoint.
    pub logical: bool,
    /// The names, with the locality, weight and priority of the load assignment.
    pub localities: Vec<DnsLocality>,
    /// How often to resolve (`dns_refresh_rate`, default 5 s).
    pub refresh_rate: Duration,
    /// Resolve again when the records' TTL runs out instead (`respect_dns_ttl`).
    pub respect_ttl: bool,
    /// Which address families (`dns_lookup_family`).
    pub family: DnsLookupFamily,
    /// Name servers to ask (from `typed_dns_resolver_config`); empty: the system's
    /// (`/etc/resolv.conf`).
    pub nameservers: Vec<std::net::SocketAddr>,
}

/// One locality of a DNS cluster's load assignment.
#[derive(Clone, Debug, PartialEq)]
pub struct DnsLocality {
    /// Where.
    pub locality: super::endpoint::Locality,
    /// Locality weight.
    pub weight: u32,
    /// Priority.
    pub priority: u32,
    /// Names to resolve, with their port, endpoint weight and health.
    pub targets: Vec<DnsTarget>,
}

/// One name of a DNS cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct DnsTarget {
    /// Host name (or an IP literal).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Weight of each endpoint it resolves to.
    pub weight: u32,
    /// Reported health.
    pub health: super::endpoint::HealthStatus,
}

/// `dns_lookup_family`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DnsLookupFamily {
    /// IPv6 if there is any, else IPv4 (Envoy's `AUTO`).
    #[default]
    Auto,
    /// IPv4 only.
    V4Only,
    /// IPv6 only.
    V6Only,
    /// IPv4 if there is any, else IPv6.
    V4Preferred,
    /// Both.
    All,
}

impl DnsDiscovery {
    /// The endpoints for the addresses each host resolved to (hosts not resolved yet have
    /// none). A logical cluster has one endpoint, at the first address of its one host.
    pub fn assignment(
        &self,
        cluster_name: &str,
        resolved: &std::collections::HashMap<String, Vec<std::net::IpAddr>>,
    ) -> EndpointAssignment {
        use super::endpoint::{Endpoint, LocalityEndpoints};
        let mut localities = Vec::with_capacity(self.localities.len());
        for l in &self.localities {
            let mut endpoints = Vec::new();
            for t in &l.targets {
                let addrs = resolved.get(&t.host).map(Vec::as_slice).unwrap_or_default();
                let take = if self.logical { 1 } else { addrs.len() };
                for ip in addrs.iter().take(take) {
                    endpoints.push(Endpoint {
                        address: std::net::SocketAddr::new(*ip, t.port),
                        weight: t.weight,
                        health: t.health,
                        hostname: t.host.clone(),
                    });
                }
            }
            localities.push(LocalityEndpoints {
                locality: l.locality.clone(),
                weight: l.weight,
                priority: l.priority,
                endpoints,
            });
        }
        EndpointAssignment {
            cluster_name: cluster_name.to_owned(),
            localities,
            drop_overloads: Vec::new(),
        }
    }

    /// Every distinct host name.
    pub fn hosts(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self
            .localities
            .iter()
            .flat_map(|l| l.targets.iter().map(|t| t.host.as_str()))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// How an endpoint is chosen inside the cluster.
#[derive(Clone, Debug, PartialEq)]
pub enum LbPolicy {
    /// Round robin.
    RoundRobin,
    /// Power of `choice_count` choices, least outstanding requests (default 2).
    LeastRequest {
        /// How many random endpoints are compared.
        choice_count: u32,
    },
    /// Uniform random.
    Random,
    /// Consistent hashing on a ring (Ketama).
    RingHash {
        /// Minimum ring size.
        min_ring_size: u64,
        /// Maximum ring size.
        max_ring_size: u64,
    },
    /// Maglev consistent hashing.
    Maglev {
        /// Lookup table size (prime).
        table_size: u64,
    },
}

/// Limits of one priority of `circuit_breakers.thresholds`, with Envoy's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Thresholds {
    /// Connections to the whole cluster.
    pub max_connections: u32,
    /// Requests waiting for a connection.
    pub max_pending_requests: u32,
    /// Requests in flight.
    pub max_requests: u32,
    /// Retries in flight.
    pub max_retries: u32,
    /// Retries allowed as a share of active requests (overrides `max_retries`).
    pub retry_budget: Option<RetryBudget>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
        }
    }
}

/// `Thresholds.RetryBudget`.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryBudget {
    /// Active retries may be this percentage of active requests (default 20).
    pub budget_percent: f64,
    /// Retries always allowed at once regardless of the percentage (default 3).
    pub min_retry_concurrency: u32,
}

/// `circuit_breakers`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CircuitBreakers {
    /// DEFAULT priority.
    pub default: Thresholds,
    /// HIGH priority, when configured.
    pub high: Option<Thresholds>,
    /// Per-endpoint connection cap (`per_host_thresholds.max_connections`).
    pub per_host_max_connections: Option<u32>,
}

/// `outlier_detection`, with Envoy's defaults; `None` fields are detectors turned off.
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierDetection {
    /// Sweep interval (default 10 s).
    pub interval: Duration,
    /// Ejection time, multiplied by the number of times the host was ejected (default 30 s).
    pub base_ejection_time: Duration,
    /// Cap on the ejection time (default 300 s).
    pub max_ejection_time: Duration,
    /// At most this percentage of hosts ejected at once (default 10).
    pub max_ejection_percent: u32,
    /// Consecutive 5xx before ejection (default 5), and enforcement percentage.
    pub consecutive_5xx: Option<(u32, u32)>,
    /// Consecutive gateway errors before ejection, and enforcement percentage
    /// (Envoy's default enforcement is 0, so it is off unless configured).
    pub consecutive_gateway_failure: Option<(u32, u32)>,
    /// Success-rate detector.
    pub success_rate: Option<SuccessRateEjection>,
    /// Failure-percentage detector.
    pub failure_percentage: Option<FailurePercentageEjection>,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            consecutive_5xx: Some((5, 100)),
            consecutive_gateway_failure: None,
            success_rate: Some(SuccessRateEjection::default()),
            failure_percentage: None,
        }
    }
}

/// Success-rate outlier detection.
#[derive(Clone, Debug, PartialEq)]
pub struct SuccessRateEjection {
    /// Hosts needed in the cluster (default 5).
    pub minimum_hosts: u32,
    /// Requests a host needs in the interval (default 100).
    pub request_volume: u32,
    /// Ejected below mean − stdev × factor/1000 (default 1900).
    pub stdev_factor: u32,
    /// Enforcement percentage (default 100).
    pub enforcing: u32,
}

impl Default for SuccessRateEjection {
    fn default() -> Self {
        Self {
            minimum_hosts: 5,
            request_volume: 100,
            stdev_factor: 1900,
            enforcing: 100,
        }
    }
}

/// Failure-percentage outlier detection.
#[derive(Clone, Debug, PartialEq)]
pub struct FailurePercentageEjection {
    /// Ejected at or above this failure percentage (default 85).
    pub threshold: u32,
    /// Hosts needed in the cluster (default 5).
    pub minimum_hosts: u32,
    /// Requests a host needs in the interval (default 50).
    pub request_volume: u32,
    /// Enforcement percentage.
    pub enforcing: u32,
}

/// HTTP version spoken to the cluster's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (prior knowledge in plaintext, ALPN `h2` over TLS).
    Http2,
    /// Whatever ALPN negotiates over TLS; HTTP/1.1 in plaintext.
    Auto,
}

/// HTTP/2 tuning (`Http2ProtocolOptions`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Http2Options {
    /// `max_concurrent_streams`.
    pub max_concurrent_streams: Option<u32>,
    /// `initial_stream_window_size`.
    pub initial_stream_window_size: Option<u32>,
    /// `initial_connection_window_size`.
    pub initial_connection_window_size: Option<u32>,
}

/// `envoy.config.cluster.v3.Cluster`.
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    /// Resource name.
    pub name: String,
    /// Endpoint source.
    pub discovery: Discovery,
    /// Endpoint choice.
    pub lb_policy: LbPolicy,
    /// Honour locality weights (`locality_weighted_lb_config`).
    pub locality_weighted: bool,
    /// Circuit breakers.
    pub circuit_breakers: CircuitBreakers,
    /// Outlier detection, when configured.
    pub outlier_detection: Option<OutlierDetection>,
    /// TCP (and TLS) connect timeout (default 5 s).
    pub connect_timeout: Duration,
    /// HTTP version.
    pub protocol: UpstreamProtocol,
    /// HTTP/2 settings, when HTTP/2 is configured.
    pub http2: Option<Http2Options>,
    /// `max_requests_per_connection`, if set.
    pub max_requests_per_connection: Option<u32>,
    /// Upstream TLS (mTLS to the endpoints), when configured.
    pub tls: Option<UpstreamTls>,
    /// Slow start for endpoints added after the first assignment, when configured.
    pub slow_start: Option<SlowStart>,
}

/// Slow start (Envoy's `slow_start_config`, Istio's `warmupDurationSecs`): an endpoint added
/// after the cluster's first assignment starts with a small share of traffic that grows
/// over `window`, so a cold instance (empty caches, JIT, connection pools) is not flooded.
/// Its weight is `weight × max(min_weight_percent, (t / window)^(1/aggression))`.
#[derive(Clone, Debug, PartialEq)]
pub struct SlowStart {
    /// How long an endpoint stays in slow start.
    pub window: Duration,
    /// How fast traffic grows: 1.0 linearly, higher is faster at the start.
    pub aggression: f64,
    /// The smallest share, as a fraction (0.1 = Envoy's default 10 %).
    pub min_weight: f64,
}

impl SlowStart {
    /// The weight factor, in `min_weight..=1`, of an endpoint `elapsed` into slow start.
    pub fn factor(&self, elapsed: Duration) -> f64 {
        if elapsed >= self.window || self.window.is_zero() {
            return 1.0;
        }
        // Envoy counts at least one second, so a new endpoint is not starved at t = 0.
        let t = elapsed.as_secs_f64().max(1.0) / self.window.as_secs_f64();
        t.min(1.0)
            .powf(1.0 / self.aggression)
            .max(self.min_weight)
            .min(1.0)
    }
}

impl Cluster {
    /// The EDS resource name the cluster needs, if it uses EDS.
    pub fn eds_service_name(&self) -> Option<&str> {
        match &self.discovery {
            Discovery::Eds { service_name } => Some(service_name),
            Discovery::Static(_) | Discovery::Dns(_) | Discovery::Aggregate(_) => None,
        }
    }
}
