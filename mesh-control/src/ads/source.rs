//! What every ADS stream shares: what it serves (the caches, per-node views, secrets), the
//! event log of ACKs and NACKs, the push order and the shutdown signal.

pub(super) use super::cache::ResourceCache;
use futures::Stream;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tonic::Status;

/// What a client said about a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted.
    Ack,
    /// Rejected, with the client's `error_detail` message.
    Nack(String),
}

/// One ACK or NACK from a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientEvent {
    /// The client's node id.
    pub node: String,
    /// Resource type URL.
    pub type_url: String,
    /// SotW: the version the client reports; delta: the nonce.
    pub version: String,
    /// ACK or NACK.
    pub verdict: Verdict,
    /// When.
    pub at: SystemTime,
}

#[derive(Debug, Default)]
pub(super) struct Events {
    pub(super) list: Vec<ClientEvent>,
    pub(super) connects: u64,
}

/// Records ACKs and NACKs per client, for logs and tests.
#[derive(Clone, Debug, Default)]
pub(crate) struct EventLog {
    pub(super) inner: Arc<Mutex<Events>>,
}

impl EventLog {
    pub(crate) fn record(&self, node: &str, type_url: &str, version: &str, error: Option<&str>) {
        let verdict = match error {
            Some(e) => {
                tracing::warn!(node, type_url, version, error = e, "NACK");
                Verdict::Nack(e.to_owned())
            }
            None => {
                tracing::info!(node, type_url, version, "ACK");
                Verdict::Ack
            }
        };
        let mut events = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Bounded: a long-running server keeps the most recent events.
        if events.list.len() >= 10_000 {
            events.list.drain(..5_000);
        }
        events.list.push(ClientEvent {
            node: node.to_owned(),
            type_url: type_url.to_owned(),
            version: version.to_owned(),
            verdict,
            at: SystemTime::now(),
        });
    }

    pub(crate) fn connected(&self, node: &str, kind: &str) {
        tracing::info!(node, kind, "client connected");
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .connects += 1;
    }
}

/// Resolves once the server is stopping.
pub(crate) async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        let stop = *rx.borrow_and_update();
        if stop {
            return;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// What a stream serves: the shared cache, plus per-node secrets when SDS is on.
#[derive(Clone, Debug)]
pub(crate) struct Source {
    /// The resources for proxyless gRPC clients, whose changes wake every stream.
    pub(crate) cache: ResourceCache,
    /// The resources for Envoy nodes, if they differ (published before `cache`, so a stream
    /// woken by `cache` sees both updated).
    pub(super) envoy_cache: Option<ResourceCache>,
    pub(super) sds: Option<Arc<super::sds::SdsIssuer>>,
}

/// The order in which a change is pushed, make-before-break: secrets, then clusters and
/// their endpoints, then the listeners and routes that point at them, so a client never holds
/// a route to a cluster the same change brings but has not sent yet.
pub(crate) fn push_order<T>(
    subs: &mut std::collections::HashMap<String, T>,
) -> Vec<(&String, &mut T)> {
    let rank = |type_url: &str| match type_url.rsplit('.').next() {
        Some("Secret") => 0,
        Some("Cluster") => 1,
        Some("ClusterLoadAssignment") => 2,
        Some("Listener") => 3,
        Some("RouteConfiguration") => 4,
        _ => 5,
    };
    let mut all: Vec<(&String, &mut T)> = subs.iter_mut().collect();
    all.sort_by_key(|(t, _)| rank(t));
    all
}

/// Whether a node is Envoy (which takes TLS certificates over SDS) rather than a proxyless
/// gRPC client (which takes them from its bootstrap's certificate providers).
pub fn is_envoy(node: &envoy_types::pb::envoy::config::core::v3::Node) -> bool {
    node.user_agent_name == "envoy"
}

impl Source {
    /// The version and resources of `type_url` for `node` (only `names` if given), and when
    /// per-node resources must be refreshed.
    pub(crate) fn view(
        &self,
        type_url: &str,
        node: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
        names: Option<&std::collections::BTreeSet<String>>,
    ) -> (
        String,
        std::collections::BTreeMap<String, super::cache::Versioned>,
        Option<tokio::time::Instant>,
    ) {
        if type_url == super::sds::SECRET_TYPE {
            let (Some(issuer), Some(node)) = (&self.sds, node) else {
                return (String::new(), Default::default(), None);
            };
            let (secrets, renew) = issuer.secrets(node, names);
            let version = secrets
                .values()
                .map(|v| v.version.as_str())
                .collect::<Vec<_>>()
                .join("-");
            return (version, secrets, renew);
        }
        let cache = match (&self.envoy_cache, node) {
            (Some(envoy), Some(n)) if is_envoy(n) => envoy,
            _ => &self.cache,
        };
        cache.with_state(|s| {
            let mut resources: std::collections::BTreeMap<String, super::cache::Versioned> = s
                .resources(type_url)
                .map(|m| {
                    m.iter()
                        .filter(|(name, _)| names.is_none_or(|n| n.contains(*name)))
                        .map(|(k, v)| {
                            let v = match &v.view {
                                Some(_) => super::cache::Versioned {
                                    resource: v.for_node(node),
                                    ..v.clone()
                                },
                                None => v.clone(),
                            };
                            (k.clone(), v)
                        })
                        .collect()
                })
                .unwrap_or_default();
            // Retired resources, until their grace ends: the version says how many are
            // left, so their expiry is a change that streams push (woken by `renew`).
            let now = tokio::time::Instant::now();
            let mut lingering = 0;
            let mut renew = None;
            for (name, (v, until)) in s.retired.get(type_url).into_iter().flatten() {
                if *until <= now || resources.contains_key(name) {
                    continue;
                }
                lingering += 1;
                renew = earliest(renew, Some(*until));
                if names.is_none_or(|n| n.contains(name)) {
                    resources.insert(name.clone(), v.clone());
                }
            }
            let version = match lingering {
                0 => s.type_version(type_url),
                n => format!("{}+{n}", s.type_version(type_url)),
            };
            (version, resources, renew)
        })
    }
}

pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The earlier of two optional instants.
pub(super) fn earliest(
    a: Option<tokio::time::Instant>,
    b: Option<tokio::time::Instant>,
) -> Option<tokio::time::Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
