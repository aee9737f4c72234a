//! State-of-the-world ADS streams.

use std::collections::{BTreeSet, HashMap};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use super::{BoxStream, EventLog, Source};

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
    source: Source,
    events: EventLog,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    mut requests: Streaming<DiscoveryRequest>,
) -> BoxStream<DiscoveryResponse> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut changes = source.cache.subscribe();
        let mut subs: HashMap<String, Subscription> = HashMap::new();
        let mut node: Option<Node> = None;
        let mut node_id = String::new();
        let mut nonce_counter: u64 = 0;
        let mut renew_at: Option<Instant> = None;
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
                            tracing::debug!(node = %node_id, %status, "SotW stream error");
                            return;
                        }
                        None => return,
                    };
                    if node.is_none() {
                        if let Some(n) = &req.node {
                            node_id = n.id.clone();
                            node = Some(n.clone());
                            events.connected(&node_id, "sotw");
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
                            &node_id,
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
                        let (resp, renew) = respond(&source, node.as_ref(), &req.type_url, sub, nonce_counter);
                        renew_at = earliest(renew_at, renew);
                        if let Some(resp) = resp {
                            if tx.send(Ok(resp)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if !push_changes(&source, node.as_ref(), &mut subs, &mut nonce_counter, &tx, &mut renew_at).await {
                        return;
                    }
                }
                _ = sleep_until_opt(renew_at) => {
                    renew_at = None;
                    if !push_changes(&source, node.as_ref(), &mut subs, &mut nonce_counter, &tx, &mut renew_at).await {
                        return;
                    }
                }
            }
        }
    });
    Box::pin(ReceiverStream::new(rx).fuse())
}

async fn push_changes(
    source: &Source,
    node: Option<&Node>,
    subs: &mut HashMap<String, Subscription>,
    nonce_counter: &mut u64,
    tx: &mpsc::Sender<Result<DiscoveryResponse, tonic::Status>>,
    renew_at: &mut Option<Instant>,
) -> bool {
    for (type_url, sub) in super::push_order(subs) {
        let (current, _, renew) = source.view(type_url, node, sub.names.as_ref());
        *renew_at = earliest(*renew_at, renew);
        if sub.sent_version.as_deref() == Some(current.as_str()) {
            continue;
        }
        *nonce_counter += 1;
        if let (Some(resp), _) = respond(source, node, type_url, sub, *nonce_counter) {
            if tx.send(Ok(resp)).await.is_err() {
                return false;
            }
        }
    }
    true
}

pub(super) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

pub(super) async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn respond(
    source: &Source,
    node: Option<&Node>,
    type_url: &str,
    sub: &mut Subscription,
    nonce: u64,
) -> (Option<DiscoveryResponse>, Option<Instant>) {
    let (version, resources, renew) = source.view(type_url, node, sub.names.as_ref());
    if sub.names.as_ref().is_some_and(|n| n.is_empty()) && sub.sent_version.is_some() {
        // Unsubscribed from everything: nothing to send.
        sub.sent_version = Some(version);
        return (None, renew);
    }
    sub.sent_version = Some(version.clone());
    sub.nonce = nonce.to_string();
    let resp = DiscoveryResponse {
        version_info: version,
        resources: resources.into_values().map(|v| v.resource).collect(),
        type_url: type_url.to_owned(),
        nonce: sub.nonce.clone(),
        ..Default::default()
    };
    (Some(resp), renew)
}
