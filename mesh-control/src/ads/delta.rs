//! Incremental (delta) ADS streams.

use std::collections::{BTreeSet, HashMap};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tokio::time::Instant;

use super::source::Held;
use super::stream::{Ctx, Variant};

/// Incremental: each response holds what changed since what the client holds, and names what
/// was removed; the client subscribes and unsubscribes by name.
pub(super) struct Delta;

#[derive(Debug, Default)]
pub(super) struct Subscription {
    /// `None`: wildcard.
    names: Option<BTreeSet<String>>,
    /// What the client holds, by name: the version last sent or declared.
    client: HashMap<String, String>,
    /// Nonce of the last response sent.
    nonce: String,
    /// Subscribed names the client was told do not exist (listed in `removed_resources`
    /// once, so it need not wait out its does-not-exist timer).
    told_missing: BTreeSet<String>,
    /// The type's version when the client was last brought up to date, while the
    /// subscription has not changed since: the same version again owes nothing, so a push
    /// of another type and an ACK cost no walk through the resources.
    answered: Option<String>,
}

impl Delta {
    /// What the client lacks of `held` (resources to send) and holds that is gone (names).
    fn changes(
        sub: &mut Subscription,
        names: Option<&BTreeSet<String>>,
        type_url: &str,
        held: &Held<'_>,
    ) -> (Vec<Resource>, Vec<String>) {
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        // How many of the client's resources are still held, and how many are held at all:
        // when they cover what the client has and what it asked for, nothing is missing.
        let (mut kept, mut count) = (0, 0);
        for (name, v) in held.iter() {
            count += 1;
            match sub.client.get(name) {
                Some(version) if *version == v.version => kept += 1,
                had => {
                    kept += usize::from(had.is_some());
                    resources.push(Resource {
                        name: name.to_owned(),
                        version: v.version.clone(),
                        resource: Some(held.resource(v)),
                        ..Default::default()
                    });
                }
            }
        }
        let wanted = |name: &str| names.is_none_or(|n| n.contains(name));
        if kept < sub.client.len() {
            for name in sub.client.keys() {
                if held.get(name).is_none() && wanted(name) {
                    removed.push(name.clone());
                }
            }
        }
        // Listeners and clusters asked for by name that the server does not have: say so at
        // once (as SotW's full state does for them). Endpoints and route configurations may
        // follow the resource that names them, so their absence proves nothing.
        let full_state = type_url.ends_with(".Listener") || type_url.ends_with(".Cluster");
        if let Some(names) = names.filter(|n| full_state && n.len() > count) {
            for name in names {
                if held.get(name).is_none()
                    && !sub.client.contains_key(name)
                    && sub.told_missing.insert(name.clone())
                {
                    removed.push(name.clone());
                }
            }
        }
        if !sub.told_missing.is_empty() {
            sub.told_missing.retain(|n| held.get(n).is_none());
        }
        (resources, removed)
    }
}

impl Variant for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    type Subscription = Subscription;
    const NAME: &'static str = "delta";

    fn on_request(
        sub: &mut Subscription,
        req: &DeltaDiscoveryRequest,
        first: bool,
        cx: &Ctx<'_>,
    ) -> bool {
        if !req.response_nonce.is_empty() && req.response_nonce == sub.nonce {
            cx.events.record(
                cx.node_id,
                &req.type_url,
                &req.response_nonce,
                req.error_detail.as_ref().map(|s| s.message.as_str()),
            );
        }
        if first
            || !req.resource_names_subscribe.is_empty()
            || !req.resource_names_unsubscribe.is_empty()
        {
            sub.answered = None;
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
                    sub.told_missing.remove(n);
                }
            }
        }
        true
    }

    /// The changes the client lacks, or `None` when it is up to date.
    fn respond(
        sub: &mut Subscription,
        cx: &Ctx<'_>,
        nonce: u64,
        _pushed: bool,
    ) -> (Option<DeltaDiscoveryResponse>, Option<Instant>) {
        // Lent out while the subscription is borrowed mutably, not cloned.
        let names = sub.names.take();
        let ((resources, removed), renew) =
            cx.source
                .view(cx.type_url, cx.node, names.as_ref(), |version, held| {
                    if sub.answered.as_deref() == Some(version) {
                        return (Vec::new(), Vec::new());
                    }
                    sub.answered = Some(version.to_owned());
                    Self::changes(sub, names.as_ref(), cx.type_url, held)
                });
        sub.names = names;
        if resources.is_empty() && removed.is_empty() {
            return (None, renew);
        }
        for r in &resources {
            sub.client.insert(r.name.clone(), r.version.clone());
        }
        for n in &removed {
            sub.client.remove(n);
        }
        sub.nonce = nonce.to_string();
        let resp = DeltaDiscoveryResponse {
            resources,
            type_url: cx.type_url.to_owned(),
            removed_resources: removed,
            nonce: sub.nonce.clone(),
            ..Default::default()
        };
        (Some(resp), renew)
    }
}
