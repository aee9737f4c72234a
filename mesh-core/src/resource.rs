//! The resource kinds of the xDS cascade, which the xDS client, the store and errors all
//! speak of. A leaf: it imports nothing of the crate.

use std::fmt;

/// The four resource kinds of the client's cascade, in subscription order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    /// LDS.
    Listener,
    /// RDS.
    RouteConfiguration,
    /// CDS.
    Cluster,
    /// EDS.
    ClusterLoadAssignment,
}

impl ResourceType {
    /// All kinds, in cascade order.
    pub const ALL: [ResourceType; 4] = [
        ResourceType::Listener,
        ResourceType::RouteConfiguration,
        ResourceType::Cluster,
        ResourceType::ClusterLoadAssignment,
    ];

    /// The xDS type URL.
    pub fn type_url(self) -> &'static str {
        match self {
            Self::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            Self::RouteConfiguration => {
                "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
            }
            Self::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            Self::ClusterLoadAssignment => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
        }
    }

    /// The kind for a type URL.
    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// Short name used in messages: `listener`, `route_config`, `cluster`, `cluster_load_assignment`.
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Listener => "listener",
            Self::RouteConfiguration => "route_config",
            Self::Cluster => "cluster",
            Self::ClusterLoadAssignment => "cluster_load_assignment",
        }
    }

    /// Index into per-type arrays.
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// In state-of-the-world, a response lists every subscribed resource of this kind, so a
    /// missing one is deleted (LDS and CDS). RDS and EDS responses may be partial.
    pub fn sotw_absence_is_deletion(self) -> bool {
        matches!(self, Self::Listener | Self::Cluster)
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.short_name())
    }
}
