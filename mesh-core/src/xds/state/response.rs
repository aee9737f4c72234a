//! Responses: applying what a SotW or delta response carries, the ACK or NACK, and what a
//! removal takes with it.

use super::decode::{decode, nack_message, nack_status, refused, Decoded};
use super::*;
use crate::store::{Rejected, ResourceStatus};
use crate::xds::translate::TranslateError;
use crate::xds::ResourceType;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::time::Instant;

impl AdsState {
    /// What every response starts with: a server's answer replaces what a cache file held;
    /// the type must be one of the cascade's (else what the NACK says).
    fn begin_response(&mut self, type_url: &str) -> Result<ResourceType, String> {
        if self.from_cache.take().is_some() || self.cache_pending {
            self.cache_pending = false;
            self.dump_dirty = true;
        }
        ResourceType::from_type_url(type_url)
            .ok_or_else(|| format!("unsupported type_url {type_url:?}"))
    }

    /// One named resource of a response: the first of a name is applied if subscribed
    /// (extras are ignored, as gRPC does), a repeat is refused (it would otherwise leave the
    /// resource NACKed while serving the version just applied); a refusal is recorded.
    #[allow(clippy::too_many_arguments)]
    fn take(
        &mut self,
        rt: ResourceType,
        name: &str,
        version: &str,
        result: Result<Resource, TranslateError>,
        raw: Option<Any>,
        present: &mut BTreeSet<String>,
        errors: &mut Vec<TranslateError>,
    ) {
        if !present.insert(name.to_owned()) {
            errors.push(refused(rt, name, "duplicate resource in response".into()));
            return;
        }
        if !self.types[rt.index()].entries.contains_key(name) {
            return;
        }
        if let Err(e) = &result {
            errors.push(e.clone());
        }
        self.apply(rt, name, version, result, raw);
    }

    /// Handles a SotW response: the ACK or NACK, plus any subscription changes it caused
    /// further down the cascade.
    pub fn on_sotw_response(&mut self, mut resp: DiscoveryResponse, now: Instant) -> Step {
        let rt = match self.begin_response(&resp.type_url) {
            Ok(rt) => rt,
            Err(detail) => {
                let nack = DiscoveryRequest {
                    type_url: resp.type_url,
                    response_nonce: resp.nonce,
                    error_detail: Some(nack_status(detail.clone())),
                    ..Default::default()
                };
                return self.step(vec![Outbound::Sotw(nack)], Some(Verdict::Nack(detail)));
            }
        };
        let decoded: Vec<Decoded> = std::mem::take(&mut resp.resources)
            .into_iter()
            .map(|any| decode(rt, any))
            .collect();
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
            self.take(
                rt,
                &name,
                &resp.version_info,
                result,
                raw,
                &mut present,
                &mut errors,
            );
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
        // What is wanted follows from listeners, routes and clusters; endpoints name
        // nothing, so a response of them leaves the subscriptions as they are.
        if rt != ResourceType::ClusterLoadAssignment {
            out.extend(self.resubscribe(now));
        }
        self.step(out, Some(verdict))
    }

    /// Handles a delta response: the ACK or NACK, plus any subscription changes.
    pub fn on_delta_response(&mut self, mut resp: DeltaDiscoveryResponse, now: Instant) -> Step {
        let rt = match self.begin_response(&resp.type_url) {
            Ok(rt) => rt,
            Err(detail) => {
                let nack = DeltaDiscoveryRequest {
                    type_url: resp.type_url,
                    response_nonce: resp.nonce,
                    error_detail: Some(nack_status(detail.clone())),
                    ..Default::default()
                };
                return self.step(vec![Outbound::Delta(nack)], Some(Verdict::Nack(detail)));
            }
        };
        let mut errors = Vec::new();
        let mut present = BTreeSet::new();
        for r in std::mem::take(&mut resp.resources) {
            let Some(any) = r.resource else {
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
            self.take(
                rt,
                &name,
                &r.version,
                result,
                raw,
                &mut present,
                &mut errors,
            );
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
        // What is wanted follows from listeners, routes and clusters; endpoints name
        // nothing, so a response of them leaves the subscriptions as they are.
        if rt != ResourceType::ClusterLoadAssignment {
            out.extend(self.resubscribe(now));
        }
        self.step(out, Some(verdict))
    }

    pub(super) fn apply(
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
        self.dump_stale.insert((rt, name.to_owned()));
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

    pub(super) fn remove(&mut self, rt: ResourceType, name: &str) {
        let ignore = self.ignore_deletion;
        let Some(entry) = self.types[rt.index()].entries.get_mut(name) else {
            return;
        };
        // gRFC A53: a server with `ignore_resource_deletion` cannot take away what is held.
        if ignore && entry.resource.is_some() {
            tracing::warn!(
                kind = rt.short_name(),
                name,
                "the server deleted a resource; kept (ignore_resource_deletion)"
            );
            return;
        }
        entry.deadline = None;
        entry.resource = None;
        entry.raw = None;
        entry.version.clear();
        entry.error = None;
        entry.status = ResourceStatus::DoesNotExist;
        entry.updated = Some(SystemTime::now());
        self.dump_dirty = true;
        self.dump_stale.insert((rt, name.to_owned()));
        if self.drop_from_snapshot(rt, name) {
            self.snapshot_dirty = true;
        }
    }

    pub(super) fn drop_from_snapshot(&mut self, rt: ResourceType, name: &str) -> bool {
        match rt {
            ResourceType::Listener => self.snapshot.remove_listener(name),
            ResourceType::RouteConfiguration => self.snapshot.remove_route_config(name),
            ResourceType::Cluster => self.snapshot.remove_cluster(name),
            ResourceType::ClusterLoadAssignment => self.snapshot.remove_endpoints(name),
        }
    }
}
