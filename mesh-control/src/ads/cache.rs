//! The resources a server serves, with per-resource versions.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use tokio::sync::watch;

/// The name of an xDS resource (`name`, or `cluster_name` for endpoints), if its type is
/// known and it decodes.
pub fn resource_name(any: &Any) -> Option<String> {
    let ty = any.type_url.rsplit('/').next()?;
    let bytes = any.value.as_slice();
    if ty == Listener::full_name() {
        Listener::decode(bytes).ok().map(|m| m.name)
    } else if ty == RouteConfiguration::full_name() {
        RouteConfiguration::decode(bytes).ok().map(|m| m.name)
    } else if ty == Cluster::full_name() {
        Cluster::decode(bytes).ok().map(|m| m.name)
    } else if ty == ClusterLoadAssignment::full_name() {
        ClusterLoadAssignment::decode(bytes)
            .ok()
            .map(|m| m.cluster_name)
    } else if ty == Secret::full_name() {
        Secret::decode(bytes).ok().map(|m| m.name)
    } else {
        None
    }
}

/// Rewrites one served resource for the node that asks, e.g. a ClusterLoadAssignment's
/// priorities and locality weights by the node's locality (Istio's locality load balancing).
pub trait NodeView: Send + Sync + std::fmt::Debug {
    /// The resource as `node` should see it (`None`: as it is).
    fn rewrite(&self, node: &Node, resource: &Any) -> Option<Any>;
    /// Identifies what the rewrite does: a change of it is a change of the resource.
    fn fingerprint(&self) -> u64;
}

/// A resource that looks different per node, with what to do for each node.
#[derive(Clone, Debug)]
pub struct PerNode {
    /// The type URL of the resource.
    pub type_url: String,
    /// Its name.
    pub name: String,
    /// The rewrite.
    pub view: Arc<dyn NodeView>,
}

impl PartialEq for PerNode {
    fn eq(&self, other: &Self) -> bool {
        self.type_url == other.type_url
            && self.name == other.name
            && self.view.fingerprint() == other.view.fingerprint()
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Versioned {
    pub(crate) version: String,
    pub(crate) resource: Any,
    /// A per-node rewrite of `resource`, if any.
    pub(crate) view: Option<Arc<dyn NodeView>>,
}

impl Versioned {
    /// The resource as `node` sees it.
    pub(crate) fn for_node(&self, node: Option<&Node>) -> Any {
        match (&self.view, node) {
            (Some(view), Some(node)) => view
                .rewrite(node, &self.resource)
                .unwrap_or_else(|| self.resource.clone()),
            _ => self.resource.clone(),
        }
    }

    fn same(&self, resource: &Any, view: Option<&Arc<dyn NodeView>>) -> bool {
        self.resource == *resource
            && self.view.as_ref().map(|v| v.fingerprint()) == view.map(|v| v.fingerprint())
    }
}

/// How long a removed cluster or endpoint assignment is still served to clients that ask
/// for it, so that routes pointing at it are replaced before it goes (break after make).
pub const RETIRE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a stream waits for the ACK or NACK of a push before it pushes that type again
/// (see [`ResourceCache::set_ack_wait`]).
pub const ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The names each recent change of a type touched (changed, added or removed), so a
/// stream brought up to date at one version finds what it lacks by reading the changes
/// since, not by comparing every resource of the type.
#[derive(Debug, Default)]
pub(crate) struct ChangeLog {
    /// (the type's version after the change, the names it touched), oldest first.
    entries: std::collections::VecDeque<(u64, Vec<String>)>,
    /// Changes at or before this version are no longer listed.
    floor: u64,
}

/// How many changes of a type the log keeps: a stream further behind compares everything.
const CHANGES_KEPT: usize = 256;

impl ChangeLog {
    fn record(&mut self, version: u64, names: Vec<String>) {
        if self.entries.len() == CHANGES_KEPT {
            if let Some((v, _)) = self.entries.pop_front() {
                self.floor = v;
            }
        }
        self.entries.push_back((version, names));
    }

    /// The names touched after version `since`, or `None` when the log does not reach back
    /// that far (or `since` is not a version of this cache).
    pub(crate) fn since(&self, since: &str) -> Option<impl Iterator<Item = &str> + '_> {
        let since: u64 = since.parse().ok()?;
        if since < self.floor {
            return None;
        }
        let start = self.entries.partition_point(|(v, _)| *v <= since);
        Some(
            self.entries
                .range(start..)
                .flat_map(|(_, names)| names.iter().map(String::as_str)),
        )
    }
}

#[derive(Debug, Default)]
pub(crate) struct CacheState {
    counter: u64,
    /// type_url -> (version of the type's last change, resources by name)
    pub(crate) types: HashMap<String, (String, BTreeMap<String, Versioned>)>,
    /// type_url -> the names its recent changes touched.
    pub(crate) changes: HashMap<String, ChangeLog>,
    /// Clusters and endpoint assignments removed by the last changes, still served until
    /// their deadline: type_url -> name -> (resource, until).
    pub(crate) retired: HashMap<String, BTreeMap<String, (Versioned, tokio::time::Instant)>>,
    /// The grace of retired resources (`None`: [`RETIRE_GRACE`]).
    grace: Option<std::time::Duration>,
    /// How long a stream waits for the ACK of a push before it pushes again (`None`:
    /// [`ACK_WAIT`]).
    ack_wait: Option<std::time::Duration>,
}

impl CacheState {
    pub(crate) fn type_version(&self, type_url: &str) -> String {
        self.types
            .get(type_url)
            .map(|(v, _)| v.clone())
            .unwrap_or_default()
    }

    pub(crate) fn resources(&self, type_url: &str) -> Option<&BTreeMap<String, Versioned>> {
        self.types.get(type_url).map(|(_, r)| r)
    }
}

#[derive(Debug)]
struct Inner {
    state: Mutex<CacheState>,
    changed: watch::Sender<u64>,
}

/// Versioned resources shared by every stream of a server. Cloning shares the cache.
///
/// Each change bumps a counter; a resource whose bytes changed gets the counter as its new
/// version, and so does its type (the SotW `version_info`). Unchanged resources keep their
/// version, so delta streams send only what changed.
#[derive(Clone, Debug)]
pub struct ResourceCache {
    inner: Arc<Inner>,
}

impl Default for ResourceCache {
    fn default() -> Self {
        Self::new()
    }
}

impl ResourceCache {
    /// The cache's state. A panic while it was held (in another stream's task) leaves it
    /// whole (every write is one assignment or one map update), so it stays usable.
    fn state(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An empty cache.
    pub fn new() -> Self {
        let (changed, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(CacheState::default()),
                changed,
            }),
        }
    }

    /// Replaces the whole set of served resources. Returns names it could not read.
    pub fn set_resources(&self, resources: impl IntoIterator<Item = Any>) -> Vec<String> {
        self.set_resources_per_node(resources, Vec::new())
    }

    /// Replaces the whole set of served resources, some of them rewritten for each node that
    /// asks (`per_node`). Returns names it could not read.
    pub fn set_resources_per_node(
        &self,
        resources: impl IntoIterator<Item = Any>,
        per_node: Vec<PerNode>,
    ) -> Vec<String> {
        let views: HashMap<(String, String), Arc<dyn NodeView>> = per_node
            .into_iter()
            .map(|p| ((p.type_url, p.name), p.view))
            .collect();
        let mut bad = Vec::new();
        let mut next: HashMap<String, BTreeMap<String, Any>> = HashMap::new();
        for any in resources {
            match resource_name(&any) {
                Some(name) => {
                    next.entry(any.type_url.clone())
                        .or_default()
                        .insert(name, any);
                }
                None => bad.push(any.type_url.clone()),
            }
        }
        let mut state = self.state();
        state.counter += 1;
        let version = state.counter.to_string();
        let mut changed = false;
        let type_urls: std::collections::BTreeSet<String> =
            state.types.keys().chain(next.keys()).cloned().collect();
        let now = tokio::time::Instant::now();
        let grace = state.grace.unwrap_or(RETIRE_GRACE);
        for type_url in type_urls {
            let new = next.remove(&type_url).unwrap_or_default();
            // Break after make: removed clusters and endpoints linger for clients still
            // routed to them; names that come back are live again.
            if type_url.ends_with(".Cluster") || type_url.ends_with(".ClusterLoadAssignment") {
                let gone: Vec<(String, Versioned)> = state
                    .types
                    .get(&type_url)
                    .map(|(_, old)| {
                        old.iter()
                            .filter(|(n, _)| !new.contains_key(*n))
                            .map(|(n, v)| (n.clone(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                let retired = state.retired.entry(type_url.clone()).or_default();
                retired.retain(|n, (_, until)| !new.contains_key(n) && *until > now);
                for (n, v) in gone {
                    retired.insert(n, (v, now + grace));
                }
            }
            let (type_version, old) = state.types.entry(type_url.clone()).or_default();
            // Every name the change touches: removed, added or changed.
            let mut touched: Vec<String> = old
                .keys()
                .filter(|k| !new.contains_key(*k))
                .cloned()
                .collect();
            let mut merged = BTreeMap::new();
            for (name, any) in new {
                let view = views.get(&(type_url.clone(), name.clone())).cloned();
                match old.get(&name) {
                    Some(v) if v.same(&any, view.as_ref()) => {
                        merged.insert(name, v.clone());
                    }
                    _ => {
                        touched.push(name.clone());
                        merged.insert(
                            name,
                            Versioned {
                                version: version.clone(),
                                resource: any,
                                view,
                            },
                        );
                    }
                }
            }
            if !touched.is_empty() {
                *type_version = version.clone();
                *old = merged;
                changed = true;
                let counter = state.counter;
                state
                    .changes
                    .entry(type_url)
                    .or_default()
                    .record(counter, touched);
            }
        }
        drop(state);
        if changed {
            self.inner.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
        bad
    }

    /// How long removed clusters and endpoint assignments are still served to clients that
    /// ask for them (default [`RETIRE_GRACE`]; zero removes them at once).
    pub fn set_retire_grace(&self, grace: std::time::Duration) {
        self.state().grace = Some(grace);
    }

    /// How long a stream waits for a client to ACK or NACK a push before it sends the next
    /// one (default [`ACK_WAIT`]; zero pushes every change at once, without waiting).
    ///
    /// While a push of a type is unanswered, the changes that come are held and sent
    /// together, merged, when the client answers: a client slower than the rate of change
    /// gets the latest state in fewer, larger responses instead of a queue of stale ones
    /// (istiod's `PILOT_ENABLE_FLOW_CONTROL`). A client that never answers gets a push once
    /// per wait. A stream takes the wait in force when it opens.
    ///
    /// ```
    /// use mesh_control::ads::ResourceCache;
    /// use std::time::Duration;
    /// let cache = ResourceCache::new();
    /// // A client that has not answered within a second gets the next push anyway.
    /// cache.set_ack_wait(Duration::from_secs(1));
    /// ```
    pub fn set_ack_wait(&self, wait: std::time::Duration) {
        self.state().ack_wait = Some(wait);
    }

    /// The wait set by [`Self::set_ack_wait`].
    pub(crate) fn ack_wait(&self) -> std::time::Duration {
        self.state().ack_wait.unwrap_or(ACK_WAIT)
    }

    /// Adds or replaces one resource, leaving the others as they are.
    pub fn upsert(&self, resource: Any) -> bool {
        let Some(name) = resource_name(&resource) else {
            return false;
        };
        let mut state = self.state();
        state.counter += 1;
        let version = state.counter.to_string();
        let (type_version, map) = state.types.entry(resource.type_url.clone()).or_default();
        if map.get(&name).is_some_and(|v| v.same(&resource, None)) {
            return true;
        }
        *type_version = version.clone();
        let type_url = resource.type_url.clone();
        map.insert(
            name.clone(),
            Versioned {
                version,
                resource,
                view: None,
            },
        );
        let counter = state.counter;
        state
            .changes
            .entry(type_url)
            .or_default()
            .record(counter, vec![name]);
        drop(state);
        self.inner.changed.send_modify(|v| *v = v.wrapping_add(1));
        true
    }

    /// Removes one resource.
    pub fn remove(&self, type_url: &str, name: &str) -> bool {
        let mut state = self.state();
        state.counter += 1;
        let version = state.counter.to_string();
        let Some((type_version, map)) = state.types.get_mut(type_url) else {
            return false;
        };
        if map.remove(name).is_none() {
            return false;
        }
        *type_version = version;
        let counter = state.counter;
        state
            .changes
            .entry(type_url.to_owned())
            .or_default()
            .record(counter, vec![name.to_owned()]);
        drop(state);
        self.inner.changed.send_modify(|v| *v = v.wrapping_add(1));
        true
    }

    /// Every resource currently served.
    pub fn resources(&self) -> Vec<Any> {
        let state = self.state();
        state
            .types
            .values()
            .flat_map(|(_, m)| m.values().map(|v| v.resource.clone()))
            .collect()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    pub(crate) fn with_state<T>(&self, f: impl FnOnce(&CacheState) -> T) -> T {
        f(&self.state())
    }
}
