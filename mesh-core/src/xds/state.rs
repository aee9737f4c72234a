//! The ADS protocol as a sans-io state machine.
//!
//! [`AdsState`] keeps, per resource type, what is subscribed, the last ACKed version (SotW),
//! the last nonce, and the resources received with their status. It is driven by
//! [`AdsState::on_connected`], [`AdsState::on_sotw_response`] /
//! [`AdsState::on_delta_response`], [`AdsState::poll_timers`] and the watch calls; each
//! returns the requests to send. The translated configuration is kept as a [`Snapshot`]
//! that is updated in place, so the I/O task only publishes it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment as PbCla;
use envoy_types::pb::envoy::config::listener::v3::Listener as PbListener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration as PbRouteConfig;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as PbResource,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status;
use prost::{Message, Name};
use tokio::time::Instant;

use super::bootstrap::ProtocolMode;
use super::translate::TranslateError;
use super::ResourceType;
use crate::config::{Cluster, EndpointAssignment, Listener, RouteConfig, RouteSource, Snapshot};
use crate::store::{ConfigDump, Rejected, ResourceDump, ResourceStatus};

/// How long a subscribed resource may go unanswered before it is taken not to exist
/// (gRPC's default).
pub const DOES_NOT_EXIST_TIMEOUT: Duration = Duration::from_secs(15);

/// gRPC status code INVALID_ARGUMENT, used in NACKs.
const INVALID_ARGUMENT: i32 = 3;

/// A request for the I/O task to send.
#[derive(Clone, Debug, PartialEq)]
pub enum Outbound {
    /// On a SotW stream.
    Sotw(DiscoveryRequest),
    /// On a delta stream.
    Delta(DeltaDiscoveryRequest),
}

/// What the client said about a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted: every resource in it was applied.
    Ack,
    /// Rejected, with the message sent as the NACK's `error_detail` (what was good in it was
    /// still applied; the rejected resources keep their last good version).
    Nack(String),
}

/// What one event (a response, a subscription change, a timer, the stream going up or down)
/// asks of the I/O task.
#[derive(Clone, Debug, Default, PartialEq)]
#[must_use = "the requests must be sent and the changes published"]
pub struct Step {
    /// Requests to send, in order: the ACK or NACK first, then subscription changes.
    pub send: Vec<Outbound>,
    /// The verdict on the response handled, if the event was one.
    pub verdict: Option<Verdict>,
    /// The snapshot changed: publish [`AdsState::publish_view`].
    pub snapshot_changed: bool,
    /// A resource's status (or the connection state) changed: publish the dump.
    pub dump_changed: bool,
}

#[derive(Clone, Debug)]
enum Resource {
    Listener(Arc<Listener>),
    RouteConfig(Arc<RouteConfig>),
    Cluster(Arc<Cluster>),
    Endpoints(Arc<EndpointAssignment>),
}

#[derive(Clone, Debug)]
struct Entry {
    /// Version of the resource held (empty if none).
    version: String,
    resource: Option<Resource>,
    raw: Option<Arc<Any>>,
    status: ResourceStatus,
    error: Option<Rejected>,
    updated: Option<SystemTime>,
    /// Does-not-exist deadline, while waiting for the first answer.
    deadline: Option<Instant>,
    /// SotW, never received: how many more responses must lack it before its absence means
    /// it does not exist (a response in flight when it was requested may predate the request).
    answers_needed: u8,
}

impl Entry {
    fn requested() -> Self {
        Self {
            version: String::new(),
            resource: None,
            raw: None,
            status: ResourceStatus::Requested,
            error: None,
            updated: None,
            deadline: None,
            answers_needed: 0,
        }
    }
}

#[derive(Debug, Default)]
struct TypeState {
    /// Names the server knows we want (the last request on this stream).
    sent_names: BTreeSet<String>,
    /// Whether a request for this type went out on the current stream.
    sent: bool,
    /// SotW: the last accepted `version_info`.
    version_info: String,
    /// The last response's nonce.
    nonce: String,
    /// A request that changed the names went out and no response has arrived since.
    in_flight: bool,
    entries: BTreeMap<String, Entry>,
}

/// The ADS client protocol, without I/O.
///
/// ```
/// use mesh_core::xds::{AdsState, Outbound, ProtocolMode};
/// use envoy_types::pb::envoy::config::core::v3::Node;
/// use tokio::time::Instant;
///
/// let mut ads = AdsState::new(ProtocolMode::Sotw, Node { id: "n1".into(), ..Default::default() });
/// // Nothing is sent before the stream is up; on connect the subscription goes out.
/// assert!(ads.watch_listener("greeter:50051", Instant::now()).send.is_empty());
/// let step = ads.on_connected(Instant::now());
/// assert!(step.dump_changed, "the dump shows the stream up");
/// let Outbound::Sotw(req) = &step.send[0] else { unreachable!() };
/// assert_eq!(req.resource_names, vec!["greeter:50051".to_string()]);
/// assert_eq!(req.node.as_ref().unwrap().id, "n1");
/// ```
#[derive(Debug)]
pub struct AdsState {
    mode: ProtocolMode,
    node: Node,
    connected: bool,
    node_sent: bool,
    roots: BTreeSet<String>,
    types: [TypeState; 4],
    snapshot: Snapshot,
    snapshot_dirty: bool,
    dump_dirty: bool,
    /// What was last published: [`Self::snapshot`] with route updates held back.
    published: Snapshot,
    /// Route configurations held back (their previous version published), since when.
    holds: BTreeMap<String, Instant>,
    /// Holds that ran out before the clusters arrived (the update was then applied).
    holds_expired: u64,
}

/// The longest a route update waits for the clusters and endpoints it points at before it
/// is applied anyway.
pub const ROUTE_HOLD: Duration = Duration::from_secs(5);

/// The outcome of one resource in a response.
type Decoded = (
    Option<String>,
    Result<Resource, TranslateError>,
    Option<Any>,
);

impl AdsState {
    /// A state machine for a client identified by `node`.
    pub fn new(mode: ProtocolMode, node: Node) -> Self {
        Self {
            mode,
            node,
            connected: false,
            node_sent: false,
            roots: BTreeSet::new(),
            types: Default::default(),
            snapshot: Snapshot::default(),
            snapshot_dirty: false,
            dump_dirty: false,
            published: Snapshot::default(),
            holds: BTreeMap::new(),
            holds_expired: 0,
        }
    }

    /// The protocol variant.
    pub fn mode(&self) -> ProtocolMode {
        self.mode
    }

    /// Whether the stream is up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Subscribes to a listener (an `xds:///name` target) and, through it, to everything it
    /// references.
    pub fn watch_listener(&mut self, name: &str, now: Instant) -> Step {
        let send = if self.roots.insert(name.to_owned()) {
            self.resubscribe(now)
        } else {
            Vec::new()
        };
        self.step(send, None)
    }

    /// Drops a listener subscription and whatever only it referenced.
    pub fn unwatch_listener(&mut self, name: &str, now: Instant) -> Step {
        let send = if self.roots.remove(name) {
            self.resubscribe(now)
        } else {
            Vec::new()
        };
        self.step(send, None)
    }

    /// The stream is up: (re)send every subscription with the versions held, so the server
    /// need not resend what the client already has.
    pub fn on_connected(&mut self, now: Instant) -> Step {
        self.connected = true;
        self.node_sent = false;
        for t in &mut self.types {
            t.sent = false;
            t.nonce.clear();
            t.sent_names.clear();
            t.in_flight = false;
        }
        self.dump_dirty = true;
        let send = self.resubscribe(now);
        self.step(send, None)
    }

    /// The stream is gone. Everything held stays and keeps serving; the does-not-exist timers
    /// stop, since silence from a dead stream says nothing.
    pub fn on_disconnected(&mut self) -> Step {
        self.connected = false;
        for t in &mut self.types {
            for e in t.entries.values_mut() {
                e.deadline = None;
            }
        }
        self.dump_dirty = true;
        self.step(Vec::new(), None)
    }

    /// The earliest does-not-exist deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.types
            .iter()
            .flat_map(|t| t.entries.values().filter_map(|e| e.deadline))
            .chain(self.holds.values().map(|since| *since + ROUTE_HOLD))
            .min()
    }

    /// Fires due does-not-exist timers. A resource that never arrived is marked
    /// DOES_NOT_EXIST; this changes status only (nothing held is removed).
    pub fn poll_timers(&mut self, now: Instant) -> Step {
        if self.holds.values().any(|since| *since + ROUTE_HOLD <= now) {
            self.snapshot_dirty = true;
        }
        for t in &mut self.types {
            for e in t.entries.values_mut() {
                if e.deadline.is_some_and(|d| d <= now) {
                    e.deadline = None;
                    if e.resource.is_none() {
                        e.status = ResourceStatus::DoesNotExist;
                        e.updated = Some(SystemTime::now());
                        self.dump_dirty = true;
                    }
                }
            }
        }
        self.step(Vec::new(), None)
    }

    /// The translated configuration.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The snapshot to publish now: [`Self::snapshot`], except that a route configuration
    /// whose new version points at clusters (or their endpoints) still on their way keeps its
    /// previous version, with the clusters that version uses, until they arrive or
    /// [`ROUTE_HOLD`] passes (then it applies and is counted in
    /// [`Self::holds_expired`]). A shift to a new subset so never routes a request to a
    /// cluster the client does not hold yet.
    pub fn publish_view(&mut self, now: Instant) -> Snapshot {
        let mut out = self.snapshot.clone();
        let mut holds = BTreeMap::new();
        for (name, rc) in self.snapshot.route_configs() {
            let Some(prev) = self.published.route_config(name).cloned() else {
                continue;
            };
            if Arc::ptr_eq(&prev, rc) || rc.cluster_names().iter().all(|c| self.ready(c)) {
                continue;
            }
            let since = self.holds.get(name).copied().unwrap_or(now);
            if now.saturating_duration_since(since) >= ROUTE_HOLD {
                self.holds_expired += 1;
                tracing::warn!(route_config = %name, "route update applied after waiting {ROUTE_HOLD:?} for its clusters");
                continue;
            }
            holds.insert(name.clone(), since);
            for c in prev.cluster_names() {
                if out.cluster(c).is_none() {
                    if let Some(pc) = self.published.cluster(c) {
                        out.set_cluster(pc.clone());
                    }
                }
                let eds = out
                    .cluster(c)
                    .and_then(|cl| cl.eds_service_name().map(str::to_owned));
                if let Some(eds) = eds {
                    if out.endpoint_assignments().get(&eds).is_none() {
                        if let Some(e) = self.published.endpoint_assignments().get(&eds) {
                            out.set_endpoints(e.clone());
                        }
                    }
                }
            }
            out.set_route_config(prev);
        }
        self.holds = holds;
        self.published = out.clone();
        out
    }

    /// Route updates applied only after [`ROUTE_HOLD`], their clusters still missing.
    pub fn holds_expired(&self) -> u64 {
        self.holds_expired
    }

    /// Whether a cluster a route names is held with its endpoints, or will not come (the
    /// server says it does not exist, or it was rejected).
    fn ready(&self, cluster: &str) -> bool {
        let status = |rt: ResourceType, name: &str| {
            self.types[rt.index()].entries.get(name).map(|e| e.status)
        };
        let gone = |s: Option<ResourceStatus>| {
            matches!(
                s,
                Some(ResourceStatus::DoesNotExist | ResourceStatus::Nacked)
            )
        };
        match self.snapshot.cluster(cluster) {
            None => gone(status(ResourceType::Cluster, cluster)),
            Some(c) => match c.eds_service_name() {
                None => true,
                Some(eds) => {
                    self.snapshot.endpoint_assignments().contains_key(eds)
                        || gone(status(ResourceType::ClusterLoadAssignment, eds))
                }
            },
        }
    }

    /// The step of an event: `send`, the verdict, and what the event changed.
    fn step(&mut self, send: Vec<Outbound>, verdict: Option<Verdict>) -> Step {
        Step {
            send,
            verdict,
            snapshot_changed: std::mem::take(&mut self.snapshot_dirty),
            dump_changed: std::mem::take(&mut self.dump_dirty),
        }
    }

    /// The status of one resource.
    pub fn status(&self, resource_type: ResourceType, name: &str) -> Option<ResourceStatus> {
        self.types[resource_type.index()]
            .entries
            .get(name)
            .map(|e| e.status)
    }

    /// Why the latest update of one resource was rejected, if it was.
    pub fn error(&self, resource_type: ResourceType, name: &str) -> Option<&TranslateError> {
        self.types[resource_type.index()]
            .entries
            .get(name)
            .and_then(|e| e.error.as_ref().map(|r| &r.error))
    }

    /// Every subscribed resource with its version and status.
    pub fn dump(&self) -> Vec<ResourceDump> {
        ResourceType::ALL
            .iter()
            .flat_map(|rt| {
                self.types[rt.index()]
                    .entries
                    .iter()
                    .map(move |(name, e)| ResourceDump {
                        resource_type: *rt,
                        name: name.clone(),
                        version: e.version.clone(),
                        status: e.status,
                        error: e.error.clone(),
                        updated: e.updated,
                        raw: e.raw.clone(),
                    })
            })
            .collect()
    }

    /// Builds a full [`ConfigDump`].
    pub fn config_dump(&self, server: &str, last_error: Option<String>) -> ConfigDump {
        ConfigDump {
            resources: self.dump(),
            server: server.to_owned(),
            connected: self.connected,
            last_error,
            node: Some(self.node.clone()),
        }
    }

    // ----- responses ---------------------------------------------------------------------

    /// Handles a SotW response: the ACK or NACK, plus any subscription changes it caused
    /// further down the cascade.
    pub fn on_sotw_response(&mut self, resp: DiscoveryResponse, now: Instant) -> Step {
        let Some(rt) = ResourceType::from_type_url(&resp.type_url) else {
            let detail = format!("unsupported type_url {:?}", resp.type_url);
            let nack = Outbound::Sotw(DiscoveryRequest {
                type_url: resp.type_url,
                response_nonce: resp.nonce,
                error_detail: Some(nack_status(detail.clone())),
                ..Default::default()
            });
            return self.step(vec![nack], Some(Verdict::Nack(detail)));
        };
        let decoded: Vec<Decoded> = resp.resources.iter().map(|any| decode(rt, any)).collect();
        let mut errors = Vec::new();
        let mut present = BTreeSet::new();
        let mut unnamed = false;
        for (name, result, raw) in decoded {
            let Some(name) = name else {
                unnamed = true;
                if let Err(e) = result {
                    errors.push(e);
                }
                continue;
            };
            if !present.insert(name.clone()) {
                errors.push(refused(rt, &name, "duplicate resource in response".into()));
                continue;
            }
            if !self.types[rt.index()].entries.contains_key(&name) {
                // Not subscribed (the server sent extra); ignore, as gRPC does.
                continue;
            }
            if let Err(e) = &result {
                errors.push(e.clone());
            }
            self.apply(rt, &name, &resp.version_info, result, raw);
        }
        // LDS and CDS: a subscribed resource missing from a SotW response is deleted. When a
        // resource could not be decoded far enough to be named, it may be the missing one,
        // so nothing is deleted on that response.
        if rt.sotw_absence_is_deletion() && !unnamed {
            let missing: Vec<String> = self.types[rt.index()]
                .entries
                .keys()
                .filter(|n| !present.contains(*n))
                .cloned()
                .collect();
            for name in missing {
                let e = self.types[rt.index()]
                    .entries
                    .get_mut(&name)
                    .expect("missing names are subscribed");
                if e.resource.is_none() {
                    // Never received: conclusive only on a response that answers a request
                    // that had it (then a caller waiting for it hears at once, not after
                    // the does-not-exist timer).
                    if e.status == ResourceStatus::DoesNotExist || e.answers_needed == 0 {
                        continue;
                    }
                    e.answers_needed -= 1;
                    if e.answers_needed > 0 {
                        continue;
                    }
                }
                self.remove(rt, &name);
            }
        }
        self.types[rt.index()].in_flight = false;
        let t = &mut self.types[rt.index()];
        t.nonce = resp.nonce.clone();
        let verdict = if errors.is_empty() {
            t.version_info = resp.version_info.clone();
            Verdict::Ack
        } else {
            let message = nack_message(&errors);
            tracing::warn!(type_url = %resp.type_url, version = %resp.version_info, "NACK: {message}");
            Verdict::Nack(message)
        };
        let error_detail = match &verdict {
            Verdict::Ack => None,
            Verdict::Nack(m) => Some(nack_status(m.clone())),
        };
        let ack = DiscoveryRequest {
            version_info: t.version_info.clone(),
            resource_names: t.sent_names.iter().cloned().collect(),
            type_url: rt.type_url().to_owned(),
            response_nonce: resp.nonce,
            error_detail,
            ..Default::default()
        };
        let mut out = vec![Outbound::Sotw(ack)];
        out.extend(self.resubscribe(now));
        self.step(out, Some(verdict))
    }

    /// Handles a delta response: the ACK or NACK, plus any subscription changes.
    pub fn on_delta_response(&mut self, resp: DeltaDiscoveryResponse, now: Instant) -> Step {
        let Some(rt) = ResourceType::from_type_url(&resp.type_url) else {
            let detail = format!("unsupported type_url {:?}", resp.type_url);
            let nack = Outbound::Delta(DeltaDiscoveryRequest {
                type_url: resp.type_url,
                response_nonce: resp.nonce,
                error_detail: Some(nack_status(detail.clone())),
                ..Default::default()
            });
            return self.step(vec![nack], Some(Verdict::Nack(detail)));
        };
        let mut errors = Vec::new();
        for r in &resp.resources {
            let Some(any) = &r.resource else {
                // A resource without a body is a heartbeat for its TTL; nothing to update.
                continue;
            };
            let (name, result, raw) = decode(rt, any);
            let name = match name {
                Some(n) => n,
                None if !r.name.is_empty() => r.name.clone(),
                None => {
                    if let Err(e) = result {
                        errors.push(e);
                    }
                    continue;
                }
            };
            if !r.name.is_empty() && r.name != name {
                errors.push(refused(
                    rt,
                    &r.name,
                    format!("the resource's own name is {name:?}"),
                ));
                continue;
            }
            if !self.types[rt.index()].entries.contains_key(&name) {
                continue;
            }
            if let Err(e) = &result {
                errors.push(e.clone());
            }
            self.apply(rt, &name, &r.version, result, raw);
        }
        for name in &resp.removed_resources {
            if self.types[rt.index()].entries.contains_key(name) {
                self.remove(rt, name);
            }
        }
        let t = &mut self.types[rt.index()];
        t.nonce = resp.nonce.clone();
        let verdict = if errors.is_empty() {
            Verdict::Ack
        } else {
            let message = nack_message(&errors);
            tracing::warn!(type_url = %resp.type_url, "NACK: {message}");
            Verdict::Nack(message)
        };
        let error_detail = match &verdict {
            Verdict::Ack => None,
            Verdict::Nack(m) => Some(nack_status(m.clone())),
        };
        let mut out = vec![Outbound::Delta(DeltaDiscoveryRequest {
            type_url: rt.type_url().to_owned(),
            response_nonce: resp.nonce,
            error_detail,
            ..Default::default()
        })];
        out.extend(self.resubscribe(now));
        self.step(out, Some(verdict))
    }

    fn apply(
        &mut self,
        rt: ResourceType,
        name: &str,
        version: &str,
        result: Result<Resource, TranslateError>,
        raw: Option<Any>,
    ) {
        let entry = self.types[rt.index()]
            .entries
            .get_mut(name)
            .expect("apply is called for subscribed names only");
        entry.deadline = None;
        entry.updated = Some(SystemTime::now());
        self.dump_dirty = true;
        match result {
            Ok(resource) => {
                entry.version = version.to_owned();
                entry.status = ResourceStatus::Acked;
                entry.error = None;
                entry.raw = raw.map(Arc::new);
                entry.resource = Some(resource.clone());
                self.snapshot_dirty = true;
                match resource {
                    Resource::Listener(l) => self.snapshot.set_listener(l),
                    Resource::RouteConfig(r) => self.snapshot.set_route_config(r),
                    Resource::Cluster(c) => self.snapshot.set_cluster(c),
                    Resource::Endpoints(e) => {
                        // The EDS name is the subscription name even if the resource's
                        // cluster_name differs in case or form.
                        if e.cluster_name == name {
                            self.snapshot.set_endpoints(e);
                        } else {
                            let mut e = (*e).clone();
                            e.cluster_name = name.to_owned();
                            self.snapshot.set_endpoints(Arc::new(e));
                        }
                    }
                }
            }
            Err(error) => {
                // Correctness: the last good resource (if any) stays in the snapshot.
                entry.status = ResourceStatus::Nacked;
                entry.error = Some(Rejected {
                    version: version.to_owned(),
                    error,
                });
            }
        }
    }

    fn remove(&mut self, rt: ResourceType, name: &str) {
        let Some(entry) = self.types[rt.index()].entries.get_mut(name) else {
            return;
        };
        entry.deadline = None;
        entry.resource = None;
        entry.raw = None;
        entry.version.clear();
        entry.error = None;
        entry.status = ResourceStatus::DoesNotExist;
        entry.updated = Some(SystemTime::now());
        self.dump_dirty = true;
        if self.drop_from_snapshot(rt, name) {
            self.snapshot_dirty = true;
        }
    }

    fn drop_from_snapshot(&mut self, rt: ResourceType, name: &str) -> bool {
        match rt {
            ResourceType::Listener => self.snapshot.remove_listener(name),
            ResourceType::RouteConfiguration => self.snapshot.remove_route_config(name),
            ResourceType::Cluster => self.snapshot.remove_cluster(name),
            ResourceType::ClusterLoadAssignment => self.snapshot.remove_endpoints(name),
        }
    }

    // ----- subscriptions -----------------------------------------------------------------

    /// What should be subscribed, per type, given the roots and what is held.
    fn desired(&self) -> [BTreeSet<String>; 4] {
        let mut listeners = self.roots.clone();
        listeners.retain(|n| !n.is_empty());
        let mut routes = BTreeSet::new();
        let mut clusters = BTreeSet::new();
        let mut inline_routes: Vec<Arc<RouteConfig>> = Vec::new();
        for name in &listeners {
            if let Some(l) = self.snapshot.listener(name) {
                for src in l.route_sources() {
                    match src {
                        RouteSource::Rds(n) => {
                            routes.insert(n.clone());
                        }
                        RouteSource::Inline(rc) => inline_routes.push(rc.clone()),
                    }
                }
            }
        }
        let held_routes = routes
            .iter()
            .filter_map(|n| self.snapshot.route_config(n).cloned());
        for rc in held_routes.chain(inline_routes) {
            clusters.extend(rc.cluster_names().into_iter().map(str::to_owned));
        }
        // The clusters of aggregate clusters, transitively (a cycle ends where a name is
        // already wanted).
        let mut queue: Vec<String> = clusters.iter().cloned().collect();
        while let Some(name) = queue.pop() {
            if let Some(crate::config::Discovery::Aggregate(children)) =
                self.snapshot.cluster(&name).map(|c| &c.discovery)
            {
                for child in children.iter() {
                    if clusters.insert(child.clone()) {
                        queue.push(child.clone());
                    }
                }
            }
        }
        let endpoints = clusters
            .iter()
            .filter_map(|n| self.snapshot.cluster(n))
            .filter_map(|c| c.eds_service_name().map(str::to_owned))
            .collect();
        [listeners, routes, clusters, endpoints]
    }

    /// Brings every type's subscription in line with [`Self::desired`]; returns the
    /// requests for the types that changed. Repeats until stable, since dropping a listener
    /// can drop routes, which can drop clusters.
    fn resubscribe(&mut self, now: Instant) -> Vec<Outbound> {
        let desired = self.desired();
        let mut out = Vec::new();
        for rt in ResourceType::ALL {
            let want = &desired[rt.index()];
            // Track new names, forget ones no longer wanted.
            let t = &mut self.types[rt.index()];
            let mut removed = Vec::new();
            t.entries.retain(|name, _| {
                let keep = want.contains(name);
                if !keep {
                    removed.push(name.clone());
                }
                keep
            });
            for name in want {
                t.entries
                    .entry(name.clone())
                    .or_insert_with(Entry::requested);
            }
            if !removed.is_empty() {
                self.dump_dirty = true;
                for name in &removed {
                    if self.drop_from_snapshot(rt, name) {
                        self.snapshot_dirty = true;
                    }
                }
            }
            if !self.connected {
                continue;
            }
            let t = &mut self.types[rt.index()];
            if t.sent && t.sent_names == *want {
                continue;
            }
            if !t.sent && want.is_empty() {
                continue;
            }
            // Start does-not-exist timers for names the server has not answered yet.
            let in_flight = t.in_flight;
            for name in want.difference(&t.sent_names) {
                if let Some(e) = t.entries.get_mut(name) {
                    if e.resource.is_none() && e.status != ResourceStatus::DoesNotExist {
                        e.deadline = Some(now + DOES_NOT_EXIST_TIMEOUT);
                        e.answers_needed = if in_flight { 2 } else { 1 };
                    }
                }
            }
            t.in_flight = true;
            let node = (!self.node_sent).then(|| self.node.clone());
            self.node_sent = true;
            let req = match self.mode {
                ProtocolMode::Sotw => Outbound::Sotw(DiscoveryRequest {
                    version_info: t.version_info.clone(),
                    node,
                    resource_names: want.iter().cloned().collect(),
                    type_url: rt.type_url().to_owned(),
                    response_nonce: t.nonce.clone(),
                    ..Default::default()
                }),
                ProtocolMode::Delta => {
                    let subscribe: Vec<String> = want.difference(&t.sent_names).cloned().collect();
                    let unsubscribe: Vec<String> = t.sent_names.difference(want).cloned().collect();
                    let initial_resource_versions: HashMap<String, String> = if t.sent {
                        HashMap::new()
                    } else {
                        t.entries
                            .iter()
                            .filter(|(_, e)| e.resource.is_some())
                            .map(|(n, e)| (n.clone(), e.version.clone()))
                            .collect()
                    };
                    Outbound::Delta(DeltaDiscoveryRequest {
                        node,
                        type_url: rt.type_url().to_owned(),
                        resource_names_subscribe: subscribe,
                        resource_names_unsubscribe: unsubscribe,
                        initial_resource_versions,
                        ..Default::default()
                    })
                }
            };
            t.sent = true;
            t.sent_names = want.clone();
            out.push(req);
        }
        // A removal above may have changed what is held, and so what is desired.
        if self.desired() != desired {
            out.extend(self.resubscribe(now));
        }
        out
    }
}

/// A resource that could not be decoded far enough to be named.
fn undecodable(rt: ResourceType, message: String) -> TranslateError {
    TranslateError {
        resource_type: rt,
        name: String::new(),
        path: String::new(),
        message,
    }
}

/// A response-level problem with one named resource.
fn refused(rt: ResourceType, name: &str, message: String) -> TranslateError {
    TranslateError {
        resource_type: rt,
        name: name.to_owned(),
        path: String::new(),
        message,
    }
}

/// The NACK message of a response: every problem in it.
fn nack_message(errors: &[TranslateError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn nack_status(message: String) -> Status {
    Status {
        code: INVALID_ARGUMENT,
        message,
        details: Vec::new(),
    }
}

/// Decodes and translates one resource. The name is `None` when the bytes could not be
/// decoded far enough to find it.
fn decode(rt: ResourceType, any: &Any) -> Decoded {
    // Some servers wrap resources in `envoy.service.discovery.v3.Resource`.
    let unwrapped;
    let any = if any
        .type_url
        .ends_with(&format!("/{}", PbResource::full_name()))
    {
        match PbResource::decode(any.value.as_slice()) {
            Ok(PbResource {
                resource: Some(inner),
                ..
            }) => {
                unwrapped = inner;
                &unwrapped
            }
            Ok(_) => {
                return (
                    None,
                    Err(undecodable(rt, "wrapped resource has no body".into())),
                    None,
                )
            }
            Err(e) => {
                return (
                    None,
                    Err(undecodable(
                        rt,
                        format!("undecodable Resource wrapper: {e}"),
                    )),
                    None,
                )
            }
        }
    } else {
        any
    };
    if any.type_url != rt.type_url() {
        return (
            None,
            Err(undecodable(
                rt,
                format!(
                    "resource of type {:?} in a {} response",
                    any.type_url,
                    rt.type_url()
                ),
            )),
            None,
        );
    }
    fn run<P: Message + Default, T>(
        any: &Any,
        rt: ResourceType,
        name: impl Fn(&P) -> String,
        translate: impl Fn(&P) -> Result<T, TranslateError>,
        wrap: impl Fn(Arc<T>) -> Resource,
    ) -> Decoded {
        match P::decode(any.value.as_slice()) {
            Err(e) => (
                None,
                Err(undecodable(rt, format!("cannot decode protobuf: {e}"))),
                None,
            ),
            Ok(p) => {
                let n = name(&p);
                let result = translate(&p).map(|t| wrap(Arc::new(t)));
                (Some(n), result, Some(any.clone()))
            }
        }
    }
    match rt {
        ResourceType::Listener => run::<PbListener, _>(
            any,
            rt,
            |p| p.name.clone(),
            |p| Listener::try_from(p),
            Resource::Listener,
        ),
        ResourceType::RouteConfiguration => run::<PbRouteConfig, _>(
            any,
            rt,
            |p| p.name.clone(),
            |p| RouteConfig::try_from(p),
            Resource::RouteConfig,
        ),
        ResourceType::Cluster => run::<PbCluster, _>(
            any,
            rt,
            |p| p.name.clone(),
            |p| Cluster::try_from(p),
            Resource::Cluster,
        ),
        ResourceType::ClusterLoadAssignment => run::<PbCla, _>(
            any,
            rt,
            |p| p.cluster_name.clone(),
            |p| EndpointAssignment::try_from(p),
            Resource::Endpoints,
        ),
    }
}

#[cfg(test)]
mod tests;
