//! What the xDS client and the store both speak of: the resource kinds of the cascade and
//! the per-resource status of a config dump. A leaf: it imports neither.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

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

/// Where a subscribed resource stands, as CSDS reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceStatus {
    /// Subscribed, nothing received yet.
    Requested,
    /// The latest version was accepted.
    Acked,
    /// The latest version was rejected; the last good one (if any) keeps serving.
    Nacked,
    /// The server said, or the does-not-exist timer concluded, that it does not exist.
    DoesNotExist,
}

impl ResourceStatus {
    /// The CSDS name: `REQUESTED`, `ACKED`, `NACKED`, `DOES_NOT_EXIST`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "REQUESTED",
            Self::Acked => "ACKED",
            Self::Nacked => "NACKED",
            Self::DoesNotExist => "DOES_NOT_EXIST",
        }
    }
}

/// A rejected (NACKed) update of a resource.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejected {
    /// The version that was rejected.
    pub version: String,
    /// Why: the resource, the field and what is wrong with it.
    pub error: crate::error::TranslateError,
}

/// One resource in a [`ConfigDump`].
#[derive(Clone, Debug, PartialEq)]
pub struct ResourceDump {
    /// Kind.
    pub resource_type: ResourceType,
    /// The resource's xDS name.
    pub name: String,
    /// Version of the resource in use (empty if none).
    pub version: String,
    /// Status of the latest update.
    pub status: ResourceStatus,
    /// The rejected version and why, when the latest update was NACKed.
    pub error: Option<Rejected>,
    /// When the status last changed.
    pub updated: Option<SystemTime>,
    /// The resource as received (serialized `Any`), for CSDS.
    pub raw: Option<Arc<envoy_types::pb::google::protobuf::Any>>,
}

/// What the client holds, resource by resource, plus its connection state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConfigDump {
    /// Every subscribed resource.
    pub resources: Vec<ResourceDump>,
    /// Server URI.
    pub server: String,
    /// Whether the ADS stream is up.
    pub connected: bool,
    /// The last connection error, if any.
    pub last_error: Option<String>,
    /// The node the client identifies as (for CSDS).
    pub node: Option<envoy_types::pb::envoy::config::core::v3::Node>,
}

impl ConfigDump {
    /// A resource's entry.
    pub fn get(&self, resource_type: ResourceType, name: &str) -> Option<&ResourceDump> {
        self.resources
            .iter()
            .find(|r| r.resource_type == resource_type && r.name == name)
    }
}
