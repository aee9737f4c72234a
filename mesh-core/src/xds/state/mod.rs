//! The ADS protocol as a sans-io state machine.
//!
//! [`AdsState`] keeps, per resource type, what is subscribed, the last ACKed version (SotW),
//! the last nonce, and the resources received with their status. It is driven by
//! [`AdsState::on_connected`], [`AdsState::on_sotw_response`] /
//! [`AdsState::on_delta_response`], [`AdsState::poll_timers`] and the watch calls; each
//! returns the requests to send. The translated configuration is kept as a [`Snapshot`]
//! that is updated in place, so the I/O task only publishes it.

use super::bootstrap::ProtocolMode;
use super::translate::TranslateError;
use super::ResourceType;
use crate::config::{Cluster, EndpointAssignment, Listener, RouteConfig, Snapshot};
use crate::store::{ConfigDump, DumpResources, Rejected, ResourceDump, ResourceStatus};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest,
};
use envoy_types::pb::google::protobuf::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

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

    /// The entry as the dump shows it.
    fn dump(&self, resource_type: ResourceType, name: &str) -> ResourceDump {
        ResourceDump {
            resource_type,
            name: name.to_owned(),
            version: self.version.clone(),
            status: self.status,
            error: self.error.clone(),
            updated: self.updated,
            raw: self.raw.clone(),
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
    /// The dump's entries as last built, and the names changed since (rebuilt from
    /// their entries by [`Self::config_dump`]).
    dumped: DumpResources,
    dump_stale: BTreeSet<(ResourceType, String)>,
    /// What was last published: [`Self::snapshot`] with route updates held back.
    published: Snapshot,
    /// Route configurations held back (their previous version published), since when.
    holds: BTreeMap<String, Instant>,
    /// Holds that ran out before the clusters arrived (the update was then applied).
    holds_expired: u64,
    /// When the cache file in use was saved, until a server answers.
    from_cache: Option<SystemTime>,
    /// A cache file is loaded and will serve if no server answers first.
    cache_pending: bool,
    /// The server in use lists `ignore_resource_deletion` (gRFC A53).
    ignore_deletion: bool,
}

/// The longest a route update waits for the clusters and endpoints it points at before it
/// is applied anyway.
pub const ROUTE_HOLD: Duration = Duration::from_secs(5);

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
            dumped: DumpResources::default(),
            dump_stale: BTreeSet::new(),
            published: Snapshot::default(),
            holds: BTreeMap::new(),
            holds_expired: 0,
            from_cache: None,
            cache_pending: false,
            ignore_deletion: false,
        }
    }

    /// The node's id.
    pub fn node_id(&self) -> &str {
        &self.node.id
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

    /// Every resource held, at its version in use: what a cache file keeps.
    pub(crate) fn held(&self) -> Vec<(ResourceType, String, String, Any)> {
        let mut out = Vec::new();
        for rt in ResourceType::ALL {
            for (name, e) in &self.types[rt.index()].entries {
                if let (Some(_), Some(raw)) = (&e.resource, &e.raw) {
                    out.push((rt, name.clone(), e.version.clone(), (**raw).clone()));
                }
            }
        }
        out
    }

    /// Applies what a cache file held, in cascade order, as if a server had sent it (each
    /// resource only if the watches need it); nothing is sent. The dump says the
    /// configuration came from a file saved at `saved_at` until a server answers.
    pub(crate) fn restore(
        &mut self,
        responses: Vec<DeltaDiscoveryResponse>,
        saved_at: SystemTime,
        now: Instant,
    ) -> Step {
        let mut changed = Step::default();
        for r in responses {
            let step = self.on_delta_response(r, now);
            changed.snapshot_changed |= step.snapshot_changed;
            changed.dump_changed |= step.dump_changed;
        }
        self.from_cache = Some(saved_at);
        self.cache_pending = false;
        changed.dump_changed = true;
        changed
    }

    /// Whether the server in use has `ignore_resource_deletion` (gRFC A53): its deletions
    /// of resources the client holds (a SotW LDS/CDS response without them, a delta
    /// removal) are logged and not applied.
    pub fn set_ignore_resource_deletion(&mut self, on: bool) {
        self.ignore_deletion = on;
    }

    /// Says a cache file is loaded and will serve unless a server answers first (so callers
    /// wait for it rather than fail at once while no server is reachable).
    pub(crate) fn set_cache_pending(&mut self, pending: bool) {
        self.cache_pending = pending;
        self.dump_dirty = true;
    }

    /// Whether a subscribed resource has not arrived yet (nor been found not to exist): what
    /// makes a client fall back to its next server when this one is unreachable (gRFC A71).
    pub fn is_waiting(&self) -> bool {
        self.types.iter().any(|t| {
            t.entries
                .values()
                .any(|e| e.status == ResourceStatus::Requested)
        })
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
        for rt in ResourceType::ALL {
            for (name, e) in self.types[rt.index()].entries.iter_mut() {
                if e.deadline.is_some_and(|d| d <= now) {
                    e.deadline = None;
                    if e.resource.is_none() {
                        e.status = ResourceStatus::DoesNotExist;
                        e.updated = Some(SystemTime::now());
                        self.dump_dirty = true;
                        self.dump_stale.insert((rt, name.clone()));
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
        // Only a route configuration that differs from the one published can be held back:
        // one changed since (found without visiting what the two snapshots share), or one
        // held now.
        let candidates: BTreeSet<String> = self
            .snapshot
            .route_configs()
            .changes_from(self.published.route_configs())
            .filter(|(_, rc)| rc.is_some())
            .map(|(name, _)| name.to_owned())
            .chain(self.holds.keys().cloned())
            .collect();
        for name in &candidates {
            let Some(rc) = self.snapshot.route_config(name) else {
                continue;
            };
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
                    .map(move |(name, e)| e.dump(*rt, name))
            })
            .collect()
    }

    /// Builds a full [`ConfigDump`]. The entries changed since the last one are rebuilt;
    /// the rest are shared with it.
    pub fn config_dump(&mut self, server: &str, last_error: Option<String>) -> ConfigDump {
        for (rt, name) in std::mem::take(&mut self.dump_stale) {
            match self.types[rt.index()].entries.get(&name) {
                Some(e) => self.dumped.insert(e.dump(rt, &name)),
                None => self.dumped.remove(rt, &name),
            }
        }
        ConfigDump {
            resources: self.dumped.clone(),
            server: server.to_owned(),
            connected: self.connected,
            last_error,
            node: Some(self.node.clone()),
            from_cache: self.from_cache,
            cache_pending: self.cache_pending,
        }
    }
}

mod decode;
mod response;
mod subscribe;

#[cfg(test)]
mod tests;
