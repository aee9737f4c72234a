//! State-of-the-world ADS streams.

use std::collections::{BTreeSet, HashMap};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use super::{BoxStream, EventLog, ResourceCache};

#[derive(Debug, Default)]
struct Subscription {
    /// `None`: wildcard (an LDS/CDS first request with no names).
    names: Option<BTreeSet<String>>,
    /// Version of the last response sent.
    sent_version: Option<String>,
    /// Nonce of the last response sent.
    nonce: String,
}

fn is_wildcard_type(type_url: &str) -> bool {
    type_url.ends_with(".Listener") || type_url.ends_with(".Cluster")
}

pub(super) fn serve(
    cache: ResourceCache,
    events: EventLog,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    mut requests: Streaming<DiscoveryRequest>,
) -> BoxStream<DiscoveryResponse> {
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
                            tracing::debug!(%node, %status, "SotW stream error");
                            return;
                        }
                        None => return,
                    };
                    if let Some(n) = &req.node {
                        if node.is_empty() {
                            node = n.id.clone();
                            events.connected(&node, "sotw");
                        }
                    }
                    let first = !subs.contains_key(&req.type_url);
                    let sub = subs.entry(req.type_url.clone()).or_default();
                    if !req.response_nonce.is_empty() {
                        if req.response_nonce != sub.nonce {
                            // A stale ACK/NACK for a response that has since been superseded.
                            continue;
                        }
                        events.record(
                            &node,
                            &req.type_url,
                            &req.version_info,
                            req.error_detail.as_ref().map(|s| s.message.as_str()),
                        );
                    }
                    // Legacy wildcard: an LDS/CDS stream that starts with no names, and stays
                    // wildcard while it keeps sending none.
                    let wildcard = req.resource_names.is_empty()
                        && if first { is_wildcard_type(&req.type_url) } else { sub.names.is_none() };
                    let names: Option<BTreeSet<String>> = if wildcard {
                        None
                    } else {
                        Some(req.resource_names.iter().filter(|n| n.as_str() != "*").cloned().collect())
                    };
                    let changed = names != sub.names || first;
                    sub.names = names;
                    // An ACK/NACK without a change of subscription needs no answer.
                    if changed || req.response_nonce.is_empty() {
                        nonce_counter += 1;
                        let Some(resp) = respond(&cache, &req.type_url, sub, nonce_counter) else { continue };
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
                        let current = cache.with_state(|s| s.type_version(type_url));
                        if sub.sent_version.as_deref() == Some(current.as_str()) {
                            continue;
                        }
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

fn respond(
    cache: &ResourceCache,
    type_url: &str,
    sub: &mut Subscription,
    nonce: u64,
) -> Option<DiscoveryResponse> {
    let (version, resources) = cache.with_state(|s| {
        let version = s.type_version(type_url);
        let resources = s
            .resources(type_url)
            .map(|m| {
                m.iter()
                    .filter(|(name, _)| sub.names.as_ref().is_none_or(|n| n.contains(*name)))
                    .map(|(_, v)| v.resource.clone())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        (version, resources)
    });
    if sub.names.as_ref().is_some_and(|n| n.is_empty()) && sub.sent_version.is_some() {
        // Unsubscribed from everything: nothing to send.
        sub.sent_version = Some(version);
        return None;
    }
    sub.sent_version = Some(version.clone());
    sub.nonce = nonce.to_string();
    Some(DiscoveryResponse {
        version_info: version,
        resources,
        type_url: type_url.to_owned(),
        nonce: sub.nonce.clone(),
        ..Default::default()
    })
}
