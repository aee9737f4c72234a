//! What the client holds, resource by resource: the status of each subscribed resource,
//! why an update was rejected, and the connection state (`/config_dump`, CSDS). Imports
//! only the leaf modules `resource` and `error`; the store and the xDS client build on it.

use std::sync::Arc;
use std::time::SystemTime;

use crate::resource::ResourceType;

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
    /// When the configuration in use came from a cache file: when that file was saved
    /// (cleared when a server answers).
    pub from_cache: Option<SystemTime>,
    /// A cache file is loaded and will serve unless a server answers first.
    pub cache_pending: bool,
}

impl ConfigDump {
    /// A resource's entry.
    pub fn get(&self, resource_type: ResourceType, name: &str) -> Option<&ResourceDump> {
        self.resources
            .iter()
            .find(|r| r.resource_type == resource_type && r.name == name)
    }
}
