//! An immutable, complete view of the configuration at one moment.

use std::sync::Arc;

use super::cluster::{Cluster, Discovery};
use super::endpoint::EndpointAssignment;
use super::listener::{Listener, RouteSource};
use super::route::RouteConfig;

use super::map::ResourceMap;

type Map<T> = ResourceMap<T>;

/// Every resource the mesh holds, by name. Cheap to clone: each kind is a persistent
/// [`ResourceMap`], so an update of one resource copies O(log n) of its kind's map and
/// shares the rest with the snapshot it came from.
///
/// A snapshot comes from the xDS client, from a static file or from code:
///
/// ```
/// use mesh_core::config::*;
/// let snap = Snapshot::default()
///     .with_route_config(RouteConfig {
///         name: "r".into(),
///         virtual_hosts: vec![],
///         ignore_port_in_host_matching: false,
///         request_headers: HeaderMutation::default(),
///         response_headers: HeaderMutation::default(),
///     });
/// assert!(snap.route_config("r").is_some());
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    listeners: Map<Listener>,
    route_configs: Map<RouteConfig>,
    clusters: Map<Cluster>,
    endpoints: Map<EndpointAssignment>,
    generation: u64,
}

impl Snapshot {
    /// Increases by one with every published change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// All listeners.
    pub fn listeners(&self) -> &ResourceMap<Listener> {
        &self.listeners
    }

    /// All route configurations.
    pub fn route_configs(&self) -> &ResourceMap<RouteConfig> {
        &self.route_configs
    }

    /// All clusters.
    pub fn clusters(&self) -> &ResourceMap<Cluster> {
        &self.clusters
    }

    /// All endpoint assignments, by EDS name.
    pub fn endpoint_assignments(&self) -> &ResourceMap<EndpointAssignment> {
        &self.endpoints
    }

    /// A listener by name.
    pub fn listener(&self, name: &str) -> Option<&Arc<Listener>> {
        self.listeners.get(name)
    }

    /// A route configuration by name.
    pub fn route_config(&self, name: &str) -> Option<&Arc<RouteConfig>> {
        self.route_configs.get(name)
    }

    /// A cluster by name.
    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name)
    }

    /// The route configuration an API listener uses, inline or by RDS.
    pub fn routes_for_listener(&self, listener: &str) -> Option<Arc<RouteConfig>> {
        self.routes_for(self.listener(listener)?.api()?)
    }

    /// The routes of an HTTP connection manager: inline, or its RDS resource.
    pub fn routes_for(&self, hcm: &super::HttpConnectionManager) -> Option<Arc<RouteConfig>> {
        match &hcm.routes {
            RouteSource::Inline(rc) => Some(rc.clone()),
            RouteSource::Rds(name) => self.route_config(name).cloned(),
        }
    }

    /// A cluster's endpoints: its static assignment, or its EDS resource.
    pub fn endpoints_for_cluster(&self, cluster: &str) -> Option<Arc<EndpointAssignment>> {
        match &self.cluster(cluster)?.discovery {
            Discovery::Static(cla) => Some(cla.clone()),
            Discovery::Eds { service_name } => self.endpoints.get(service_name).cloned(),
            // Resolved by the data path (see mesh-tower's cluster registry).
            Discovery::Dns(_) => None,
            // An aggregate has no endpoints of its own.
            Discovery::Aggregate(_) => None,
        }
    }

    /// Adds or replaces a listener.
    pub fn with_listener(mut self, listener: Listener) -> Self {
        self.set_listener(Arc::new(listener));
        self
    }

    /// Adds or replaces a route configuration.
    pub fn with_route_config(mut self, rc: RouteConfig) -> Self {
        self.set_route_config(Arc::new(rc));
        self
    }

    /// Adds or replaces a cluster.
    pub fn with_cluster(mut self, cluster: Cluster) -> Self {
        self.set_cluster(Arc::new(cluster));
        self
    }

    /// Adds or replaces an endpoint assignment (keyed by `cluster_name`, the EDS name).
    pub fn with_endpoints(mut self, cla: EndpointAssignment) -> Self {
        self.set_endpoints(Arc::new(cla));
        self
    }

    /// Adds or replaces a listener in place.
    pub fn set_listener(&mut self, v: Arc<Listener>) {
        let name: Arc<str> = v.name.as_str().into();
        self.listeners.insert(name, v);
    }

    /// Adds or replaces a route configuration in place.
    pub fn set_route_config(&mut self, v: Arc<RouteConfig>) {
        let name: Arc<str> = v.name.as_str().into();
        self.route_configs.insert(name, v);
    }

    /// Adds or replaces a cluster in place.
    pub fn set_cluster(&mut self, v: Arc<Cluster>) {
        let name: Arc<str> = v.name.as_str().into();
        self.clusters.insert(name, v);
    }

    /// Adds or replaces an endpoint assignment in place.
    pub fn set_endpoints(&mut self, v: Arc<EndpointAssignment>) {
        let name: Arc<str> = v.cluster_name.as_str().into();
        self.endpoints.insert(name, v);
    }

    /// Removes a listener.
    pub fn remove_listener(&mut self, name: &str) -> bool {
        self.listeners.contains_key(name) && self.listeners.remove(name).is_some()
    }

    /// Removes a route configuration.
    pub fn remove_route_config(&mut self, name: &str) -> bool {
        self.route_configs.contains_key(name) && self.route_configs.remove(name).is_some()
    }

    /// Removes a cluster.
    pub fn remove_cluster(&mut self, name: &str) -> bool {
        self.clusters.contains_key(name) && self.clusters.remove(name).is_some()
    }

    /// Removes an endpoint assignment.
    pub fn remove_endpoints(&mut self, name: &str) -> bool {
        self.endpoints.contains_key(name) && self.endpoints.remove(name).is_some()
    }

    /// Marks the snapshot as the next generation (done by [`crate::ConfigStore::publish`]).
    pub(crate) fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }
}
