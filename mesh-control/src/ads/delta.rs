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

#[derive(Clone, Debug, Default)]
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
    /// A resource as a delta response carries it, as this node sees it.
    fn send(held: &Held<'_>, name: &str, v: &super::cache::Versioned) -> Resource {
        Resource {
            name: name.to_owned(),
            version: v.version.clone(),
            resource: Some(held.resource(v)),
            ..Default::default()
        }
    }

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
                    resources.push(Self::send(held, name, v));
                }
            }
        }
        let wanted = |name: &str| names.is_none_or(|n| n.contains(name));
        // Listeners and clusters asked for by name that the server does not have: say so at
        // once (as SotW's full state does for them), and once only. Endpoints and route
        // configurations may follow the resource that names them, so their absence proves
        // nothing.
        let full_state = type_url.ends_with(".Listener") || type_url.ends_with(".Cluster");
        if kept < sub.client.len() {
            for name in sub.client.keys() {
                if held.get(name).is_none() && wanted(name) {
                    removed.push(name.clone());
                    if full_state && names.is_some() {
                        sub.told_missing.insert(name.clone());
                    }
                }
            }
        }
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

    /// [`Self::changes`] for a client that was up to date before the changes that touched
    /// `touched`: only those names are compared, so a push costs what changed, not what the
    /// type holds.
    fn changes_in<'a>(
        sub: &mut Subscription,
        names: Option<&BTreeSet<String>>,
        type_url: &str,
        held: &Held<'_>,
        touched: impl Iterator<Item = &'a str>,
    ) -> (Vec<Resource>, Vec<String>) {
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        let full_state = type_url.ends_with(".Listener") || type_url.ends_with(".Cluster");
        let mut seen = BTreeSet::new();
        for name in touched {
            if !seen.insert(name) {
                continue;
            }
            match held.get(name) {
                Some(v) if sub.client.get(name) != Some(&v.version) => {
                    resources.push(Self::send(held, name, v));
                }
                Some(_) => {}
                None if names.is_none_or(|n| n.contains(name)) => {
                    if sub.client.contains_key(name) {
                        removed.push(name.to_owned());
                        if full_state && names.is_some() {
                            sub.told_missing.insert(name.to_owned());
                        }
                    } else if full_state
                        && names.is_some()
                        && sub.told_missing.insert(name.to_owned())
                    {
                        removed.push(name.to_owned());
                    }
                }
                None => {}
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
        let changed = first
            || !req.resource_names_subscribe.is_empty()
            || !req.resource_names_unsubscribe.is_empty();
        if changed {
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
        // An ACK or NACK alone needs no answer: the changes since come as pushes.
        changed || req.response_nonce.is_empty()
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
                    let touched = sub.answered.as_deref().and_then(|v| held.touched_since(v));
                    let changes = match touched {
                        Some(touched) => {
                            Self::changes_in(sub, names.as_ref(), cx.type_url, held, touched)
                        }
                        None => Self::changes(sub, names.as_ref(), cx.type_url, held),
                    };
                    sub.answered = Some(version.to_owned());
                    changes
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ads::source::{ResourceCache, Source};
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::google::protobuf::Any;
    use prost::{Message, Name};

    fn cluster(name: &str, timeout_s: i64) -> Any {
        let c = Cluster {
            name: name.into(),
            connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: timeout_s,
                nanos: 0,
            }),
            ..Default::default()
        };
        Any {
            type_url: Cluster::type_url(),
            value: c.encode_to_vec(),
        }
    }

    /// After every change, a stream that reads only the names the changes touched sends
    /// and removes exactly what one comparing every resource does: for a wildcard and a
    /// named subscription (with names the server lacks), through changes, additions and
    /// removals (lingering for a grace, then gone), and falls back to the full comparison
    /// when the log does not reach back.
    #[test]
    fn reading_the_changes_equals_comparing_everything() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let cache = ResourceCache::new();
            cache.set_retire_grace(std::time::Duration::from_secs(1));
            let source = Source {
                cache: cache.clone(),
                envoy_cache: None,
                sds: None,
            };
            let type_url = Cluster::type_url();
            let named: BTreeSet<String> = ["c1", "c3", "c5", "c40", "missing"]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
            let mut subs = [
                (None, Subscription::default()),
                (Some(named), Subscription::default()),
            ];
            let mut fast_paths = 0;
            let mut state: Vec<(String, i64)> = (0..30).map(|i| (format!("c{i}"), 1)).collect();
            for round in 0..40u32 {
                let r = round as usize;
                match round % 5 {
                    0 => {
                        let i = r % state.len();
                        state[i].1 += 1;
                    }
                    1 => {
                        state.push((format!("c{}", 30 + r), 1));
                    }
                    2 => {
                        state.remove((r * 7) % state.len());
                    }
                    3 => tokio::time::advance(std::time::Duration::from_secs(2)).await,
                    _ => {
                        for s in state.iter_mut().step_by(3) {
                            s.1 += 1;
                        }
                    }
                }
                cache.set_resources(state.iter().map(|(n, t)| cluster(n, *t)));
                for (names, sub) in &mut subs {
                    let ((fast, full), _) =
                        source.view(&type_url, None, names.as_ref(), |version, held| {
                            let mut a = sub.clone();
                            let fast = sub
                                .answered
                                .as_deref()
                                .filter(|v| *v != version)
                                .and_then(|v| held.touched_since(v))
                                .map(|t| {
                                    Delta::changes_in(&mut a, names.as_ref(), &type_url, held, t)
                                });
                            let mut b = sub.clone();
                            let full = Delta::changes(&mut b, names.as_ref(), &type_url, held);
                            // The stream goes on from the full comparison's view.
                            *sub = b;
                            sub.answered = Some(version.to_owned());
                            (fast, full)
                        });
                    let (resources, removed) = &full;
                    for r in resources {
                        sub.client.insert(r.name.clone(), r.version.clone());
                    }
                    for n in removed {
                        sub.client.remove(n);
                    }
                    if let Some((fr, fm)) = fast {
                        fast_paths += 1;
                        let key = |v: &Vec<Resource>| {
                            let mut k: Vec<(String, String)> = v
                                .iter()
                                .map(|r| (r.name.clone(), r.version.clone()))
                                .collect();
                            k.sort();
                            k
                        };
                        let sorted = |mut v: Vec<String>| {
                            v.sort();
                            v
                        };
                        assert_eq!(key(&fr), key(resources), "round {round} {names:?}");
                        assert_eq!(
                            sorted(fm),
                            sorted(removed.clone()),
                            "round {round} {names:?}"
                        );
                    }
                }
            }
            assert!(fast_paths > 20, "the changes were read {fast_paths} times");
        });
    }
}
