//! Incremental (delta) ADS streams.

use std::collections::{BTreeSet, HashMap};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use super::{BoxStream, EventLog, ResourceCache};

#[derive(Debug, Default)]
struct Subscription {
    /// `None`: wildcard.
    names: Option<BTreeSet<String>>,
    /// What the client holds, by name: the version last sent or declared.
    client: HashMap<String, String>,
    /// Nonce of the last response sent.
    nonce: String,
}

pub(super) fn serve(
    cache: ResourceCache,
    events: EventLog,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    mut requests: Streaming<DeltaDiscoveryRequest>,
) -> BoxStream<DeltaDiscoveryResponse> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut changes = cache.subscribe();
        let mut subs: HashMap<String, Subscription> = HashMap::new();
        let mut node = String::new();
        let mut nonce_counter: u64 = 0;
        loop {
            tokio::select! {
                _ = super::stopped(&mut stopping) => {
                    let _ = tx.send(Err(tonic::Status::unavailable("xDS server shutting down"))).await;
                    return;
                }
                req = requests.next() => {
                    let req = match req {
                        Some(Ok(r)) => r,
                        Some(Err(status)) => {
                            tracing::debug!(%node, %status, "delta stream error");
                            return;
                        }
                        None => return,
                    };
                    if let Some(n) = &req.node {
                        if node.is_empty() {
                            node = n.id.clone();
                            events.connected(&node, "delta");
                        }
                    }
                    let first = !subs.contains_key(&req.type_url);
                    let sub = subs.entry(req.type_url.clone()).or_default();
                    if !req.response_nonce.is_empty() && req.response_nonce == sub.nonce {
                        events.record(
                            &node,
                            &req.type_url,
                            &req.response_nonce,
                            req.error_detail.as_ref().map(|s| s.message.as_str()),
                        );
                    }
                    if first {
                        sub.client = req.initial_resource_versions.clone();
                        let explicit: BTreeSet<String> = req
                            .resource_names_subscribe
                            .iter()
                            .filter(|n| n.as_str() != "*")
                            .cloned()
                            .collect();
                        let wildcard = req.resource_names_subscribe.is_empty()
                            || req.resource_names_subscribe.iter().any(|n| n == "*");
                        sub.names = if wildcard { None } else { Some(explicit) };
                    } else {
                        if req.resource_names_subscribe.iter().any(|n| n == "*") {
                            sub.names = None;
                        }
                        if let Some(names) = &mut sub.names {
                            names.extend(req.resource_names_subscribe.iter().cloned());
                            for n in &req.resource_names_unsubscribe {
                                names.remove(n);
                                sub.client.remove(n);
                            }
                        }
                    }
                    nonce_counter += 1;
                    if let Some(resp) = respond(&cache, &req.type_url, sub, nonce_counter) {
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    for (type_url, sub) in subs.iter_mut() {
                        nonce_counter += 1;
                        if let Some(resp) = respond(&cache, type_url, sub, nonce_counter) {
                            if tx.send(Ok(resp)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
    });
    Box::pin(ReceiverStream::new(rx).fuse())
}

/// The changes the client lacks, or `None` when it is up to date.
fn respond(
    cache: &ResourceCache,
    type_url: &str,
    sub: &mut Subscription,
    nonce: u64,
) -> Option<DeltaDiscoveryResponse> {
    let (resources, removed) = cache.with_state(|s| {
        let held = s.resources(type_url);
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        let wanted = |name: &str| sub.names.as_ref().is_none_or(|n| n.contains(name));
        if let Some(held) = held {
            for (name, v) in held.iter().filter(|(n, _)| wanted(n)) {
                if sub.client.get(name) != Some(&v.version) {
                    resources.push(Resource {
                        name: name.clone(),
                        version: v.version.clone(),
                        resource: Some(v.resource.clone()),
                        ..Default::default()
                    });
                }
            }
        }
        for name in sub.client.keys() {
            if held.is_none_or(|h| !h.contains_key(name)) && wanted(name) {
                removed.push(name.clone());
            }
        }
        (resources, removed)
    });
    if resources.is_empty() && removed.is_empty() {
        return None;
    }
    for r in &resources {
        sub.client.insert(r.name.clone(), r.version.clone());
    }
    for n in &removed {
        sub.client.remove(n);
    }
    sub.nonce = nonce.to_string();
    Some(DeltaDiscoveryResponse {
        system_version_info: String::new(),
        resources,
        type_url: type_url.to_owned(),
        removed_resources: removed,
        nonce: sub.nonce.clone(),
        ..Default::default()
    })
}
