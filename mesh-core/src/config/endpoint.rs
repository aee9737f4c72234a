//! Endpoints of a cluster (EDS `ClusterLoadAssignment`).

use std::net::SocketAddr;

/// `envoy.config.core.v3.Locality`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Sub-zone.
    pub sub_zone: String,
}

/// An endpoint's health as reported by the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthStatus {
    /// Not reported: treated as healthy.
    Unknown,
    /// Healthy.
    Healthy,
    /// Not to be used.
    Unhealthy,
    /// Finishing existing work; receives no new requests.
    Draining,
    /// Health check timed out: treated as unhealthy.
    Timeout,
    /// Usable, but only when nothing healthy is left.
    Degraded,
}

impl HealthStatus {
    /// Whether new requests may go to the endpoint (UNKNOWN and HEALTHY, as in gRPC).
    pub fn is_routable(self) -> bool {
        matches!(self, Self::Unknown | Self::Healthy)
    }
}

/// One endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Where to connect.
    pub address: SocketAddr,
    /// Relative weight inside its locality (default 1).
    pub weight: u32,
    /// Reported health.
    pub health: HealthStatus,
    /// Hostname, if the control plane gave one (used for TLS SNI when set).
    pub hostname: String,
}

/// The endpoints of one locality at one priority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalityEndpoints {
    /// Where.
    pub locality: Locality,
    /// Locality weight for locality-weighted balancing (0: the locality is not used when
    /// locality weighting is on).
    pub weight: u32,
    /// Priority, 0 being the highest.
    pub priority: u32,
    /// Its endpoints.
    pub endpoints: Vec<Endpoint>,
}

/// `envoy.config.endpoint.v3.ClusterLoadAssignment`.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointAssignment {
    /// The EDS service name (or cluster name).
    pub cluster_name: String,
    /// Localities, sorted by priority then configuration order.
    pub localities: Vec<LocalityEndpoints>,
    /// Drop a fraction of requests, per category.
    pub drop_overloads: Vec<DropOverload>,
}

impl EndpointAssignment {
    /// Every endpoint, all priorities.
    pub fn endpoints(&self) -> impl Iterator<Item = (&LocalityEndpoints, &Endpoint)> {
        self.localities
            .iter()
            .flat_map(|l| l.endpoints.iter().map(move |e| (l, e)))
    }

    /// Highest priority number in use plus one (0 when empty).
    pub fn priority_count(&self) -> u32 {
        self.localities
            .iter()
            .map(|l| l.priority + 1)
            .max()
            .unwrap_or(0)
    }
}

/// `ClusterLoadAssignment.Policy.DropOverload`.
#[derive(Clone, Debug, PartialEq)]
pub struct DropOverload {
    /// Category for stats.
    pub category: String,
    /// Fraction of requests dropped.
    pub fraction: super::Fraction,
}
