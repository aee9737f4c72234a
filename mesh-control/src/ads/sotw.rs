//! State-of-the-world ADS streams.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::time::Instant;

use super::stream::{Ctx, Variant};

/// State of the world: each response holds every resource of its type the client subscribed
/// to; the client ACKs or NACKs a response by its nonce and version.
pub(super) struct Sotw;

#[derive(Debug, Default)]
pub(super) struct Subscription {
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

impl Variant for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    type Subscription = Subscription;
    const NAME: &'static str = "sotw";

    fn on_request(
        sub: &mut Subscription,
        req: &DiscoveryRequest,
        first: bool,
        cx: &Ctx<'_>,
    ) -> bool {
        if !req.response_nonce.is_empty() {
            if req.response_nonce != sub.nonce {
                // A stale ACK/NACK for a response that has since been superseded.
                return false;
            }
            cx.events.record(
                cx.node_id,
                &req.type_url,
                &req.version_info,
                req.error_detail.as_ref().map(|s| s.message.as_str()),
            );
        }
        // Legacy wildcard: an LDS/CDS stream that starts with no names, and stays wildcard
        // while it keeps sending none.
        let wildcard = req.resource_names.is_empty()
            && if first {
                is_wildcard_type(&req.type_url)
            } else {
                sub.names.is_none()
            };
        let names: Option<BTreeSet<String>> = if wildcard {
            None
        } else {
            Some(
                req.resource_names
                    .iter()
                    .filter(|n| n.as_str() != "*")
                    .cloned()
                    .collect(),
            )
        };
        let changed = names != sub.names || first;
        sub.names = names;
        // An ACK/NACK without a change of subscription needs no answer.
        changed || req.response_nonce.is_empty()
    }

    fn respond(
        sub: &mut Subscription,
        cx: &Ctx<'_>,
        nonce: u64,
        pushed: bool,
    ) -> (Option<DiscoveryResponse>, Option<Instant>) {
        let names = sub.names.as_ref();
        let (resp, renew) = cx
            .source
            .view(cx.type_url, cx.node, names, |version, held| {
                if pushed && sub.sent_version.as_deref() == Some(version) {
                    // The change left this type as the client holds it.
                    return None;
                }
                if sub.names.as_ref().is_some_and(|n| n.is_empty()) && sub.sent_version.is_some() {
                    // Unsubscribed from everything: nothing to send.
                    sub.sent_version = Some(version.to_owned());
                    return None;
                }
                sub.sent_version = Some(version.to_owned());
                sub.nonce = nonce.to_string();
                Some(DiscoveryResponse {
                    version_info: version.to_owned(),
                    resources: held.iter().map(|(_, v)| held.resource(v)).collect(),
                    type_url: cx.type_url.to_owned(),
                    nonce: sub.nonce.clone(),
                    ..Default::default()
                })
            });
        (resp, renew)
    }
}
