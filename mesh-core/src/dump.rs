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
    pub resources: DumpResources,
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
        self.resources.get(resource_type, name)
    }
}

/// The subscribed resources of a [`ConfigDump`]: by type (in cascade order), then by name.
///
/// Persistent maps: the client keeps one and updates the entries a response touched, and
/// publishing a dump clones it in O(1), so the cost of an update follows what it changed,
/// not how much the client holds.
///
/// ```
/// use mesh_core::{DumpResources, ResourceDump, ResourceStatus};
/// use mesh_core::xds::ResourceType;
/// let mut all = DumpResources::default();
/// all.insert(ResourceDump {
///     resource_type: ResourceType::Cluster,
///     name: "backend".into(),
///     version: "1".into(),
///     status: ResourceStatus::Acked,
///     error: None,
///     updated: None,
///     raw: None,
/// });
/// assert_eq!(all.len(), 1);
/// assert_eq!(all.get(ResourceType::Cluster, "backend").unwrap().version, "1");
/// assert!(all.get(ResourceType::Listener, "backend").is_none());
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DumpResources {
    by_type: [imbl::OrdMap<Arc<str>, Arc<ResourceDump>>; 4],
}

impl DumpResources {
    /// A resource's entry.
    pub fn get(&self, resource_type: ResourceType, name: &str) -> Option<&ResourceDump> {
        self.by_type[resource_type.index()].get(name).map(|r| &**r)
    }

    /// Every entry: listeners, route configurations, clusters, endpoints, each by name.
    pub fn iter(&self) -> impl Iterator<Item = &ResourceDump> + '_ {
        self.by_type.iter().flat_map(|m| m.values().map(|r| &**r))
    }

    /// The entries of one type, by name.
    pub fn of_type(&self, resource_type: ResourceType) -> impl Iterator<Item = &ResourceDump> + '_ {
        self.by_type[resource_type.index()].values().map(|r| &**r)
    }

    /// How many resources are subscribed.
    pub fn len(&self) -> usize {
        self.by_type.iter().map(imbl::OrdMap::len).sum()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.by_type.iter().all(imbl::OrdMap::is_empty)
    }

    /// Adds or replaces an entry.
    pub fn insert(&mut self, r: ResourceDump) {
        self.by_type[r.resource_type.index()].insert(Arc::from(r.name.as_str()), Arc::new(r));
    }

    /// Removes an entry.
    pub fn remove(&mut self, resource_type: ResourceType, name: &str) {
        let m = &mut self.by_type[resource_type.index()];
        if m.contains_key(name) {
            m.remove(name);
        }
    }
}

impl<'a> IntoIterator for &'a DumpResources {
    type Item = &'a ResourceDump;
    type IntoIter = Box<dyn Iterator<Item = &'a ResourceDump> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl FromIterator<ResourceDump> for DumpResources {
    fn from_iter<I: IntoIterator<Item = ResourceDump>>(iter: I) -> Self {
        let mut all = DumpResources::default();
        for r in iter {
            all.insert(r);
        }
        all
    }
}
