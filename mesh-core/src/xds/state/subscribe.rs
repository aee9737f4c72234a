//! Subscriptions: what the client wants (the listeners watched and everything they
//! reference) and the requests that bring the server in line.

use super::*;
use crate::config::{RouteConfig, RouteSource};
use crate::store::ResourceStatus;
use crate::xds::bootstrap::ProtocolMode;
use crate::xds::ResourceType;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use tokio::time::Instant;

impl AdsState {
    // ----- subscriptions -----------------------------------------------------------------
    /// What should be subscribed, per type, given the roots and what is held.
    pub(super) fn desired(&self) -> [BTreeSet<String>; 4] {
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
    pub(super) fn resubscribe(&mut self, now: Instant) -> Vec<Outbound> {
        let desired = self.desired();
        let mut out = Vec::new();
        let mut dropped = false;
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
                if let std::collections::btree_map::Entry::Vacant(v) = t.entries.entry(name.clone())
                {
                    v.insert(Entry::requested());
                    self.dump_stale.insert((rt, name.clone()));
                }
            }
            if !removed.is_empty() {
                dropped = true;
                self.dump_dirty = true;
                for name in &removed {
                    self.dump_stale.insert((rt, name.clone()));
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
        if dropped && self.desired() != desired {
            out.extend(self.resubscribe(now));
        }
        out
    }
}
