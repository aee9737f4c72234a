//! What every ADS stream shares: what it serves (the caches, per-node views, secrets), the
//! event log of ACKs and NACKs, the push order and the shutdown signal.

pub(super) use super::cache::ResourceCache;
use super::cache::{ChangeLog, Versioned};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::Any;
use futures::Stream;
use std::collections::{BTreeMap, BTreeSet};
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
pub fn is_envoy(node: &Node) -> bool {
    node.user_agent_name == "envoy"
}

/// What a stream may send of one resource type, borrowed from the cache while its lock is
/// held: nothing is cloned until a response needs it.
pub(crate) struct Held<'a> {
    live: Option<&'a BTreeMap<String, Versioned>>,
    /// Retired resources still in their grace (and not live again), as the names allow.
    lingering: BTreeMap<&'a str, &'a Versioned>,
    names: Option<&'a BTreeSet<String>>,
    node: Option<&'a Node>,
    /// The names the type's recent changes touched.
    log: Option<&'a ChangeLog>,
}

impl<'a> Held<'a> {
    /// The names touched by the changes after `version` (subscribed or not), or `None` when
    /// they are not known: then every resource must be compared.
    pub(crate) fn touched_since(&self, version: &str) -> Option<impl Iterator<Item = &'a str>> {
        self.log?.since(version)
    }

    fn wanted(&self, name: &str) -> bool {
        self.names.is_none_or(|n| n.contains(name))
    }

    /// The resource `name`, if it is served and subscribed.
    pub(crate) fn get(&self, name: &str) -> Option<&'a Versioned> {
        if !self.wanted(name) {
            return None;
        }
        self.live
            .and_then(|m| m.get(name))
            .or_else(|| self.lingering.get(name).copied())
    }

    /// Every resource served and subscribed.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&'a str, &'a Versioned)> + '_ {
        let live: Box<dyn Iterator<Item = (&'a str, &'a Versioned)>> = match (self.live, self.names)
        {
            (None, _) => Box::new(std::iter::empty()),
            (Some(m), None) => Box::new(m.iter().map(|(k, v)| (k.as_str(), v))),
            // Few names of many resources: look them up.
            (Some(m), Some(names)) if names.len() * 8 < m.len() => Box::new(
                names
                    .iter()
                    .filter_map(|n| m.get_key_value(n))
                    .map(|(k, v)| (k.as_str(), v)),
            ),
            // Both sorted by name: walk them side by side.
            (Some(m), Some(names)) => Box::new(Join {
                live: m.iter().peekable(),
                names: names.iter().peekable(),
                _names: std::marker::PhantomData,
            }),
        };
        live.chain(self.lingering.iter().map(|(k, v)| (*k, *v)))
    }

    /// A resource as this node sees it (per-node rewrites applied).
    pub(crate) fn resource(&self, v: &Versioned) -> Any {
        v.for_node(self.node)
    }
}

/// The resources of a sorted map whose names are in a sorted set, one comparison a step.
struct Join<'a, L: Iterator, N: Iterator> {
    live: std::iter::Peekable<L>,
    names: std::iter::Peekable<N>,
    _names: std::marker::PhantomData<&'a ()>,
}

impl<'a, L, N> Iterator for Join<'a, L, N>
where
    L: Iterator<Item = (&'a String, &'a Versioned)>,
    N: Iterator<Item = &'a String>,
{
    type Item = (&'a str, &'a Versioned);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (k, _) = self.live.peek()?;
            let n = self.names.peek()?;
            match k.as_str().cmp(n.as_str()) {
                std::cmp::Ordering::Less => {
                    self.live.next();
                }
                std::cmp::Ordering::Greater => {
                    self.names.next();
                }
                std::cmp::Ordering::Equal => {
                    self.names.next();
                    return self.live.next().map(|(k, v)| (k.as_str(), v));
                }
            }
        }
    }
}

impl Source {
    /// Calls `f` with the version of `type_url` for `node` and what it may be sent (only
    /// `names` if given); returns what `f` returns and when per-node resources must be
    /// refreshed. `f` runs under the cache's lock: it should copy only what it sends.
    pub(crate) fn view<T>(
        &self,
        type_url: &str,
        node: Option<&Node>,
        names: Option<&BTreeSet<String>>,
        f: impl FnOnce(&str, &Held<'_>) -> T,
    ) -> (T, Option<tokio::time::Instant>) {
        if type_url == super::sds::SECRET_TYPE {
            let (secrets, renew) = match (&self.sds, node) {
                (Some(issuer), Some(node)) => issuer.secrets(node, names),
                _ => (BTreeMap::new(), None),
            };
            let version = secrets
                .values()
                .map(|v| v.version.as_str())
                .collect::<Vec<_>>()
                .join("-");
            let held = Held {
                live: Some(&secrets),
                lingering: BTreeMap::new(),
                names,
                node,
                log: None,
            };
            return (f(&version, &held), renew);
        }
        let cache = match (&self.envoy_cache, node) {
            (Some(envoy), Some(n)) if is_envoy(n) => envoy,
            _ => &self.cache,
        };
        cache.with_state(|s| {
            let live = s.resources(type_url);
            // Retired resources, until their grace ends: the version says how many are
            // left, so their expiry is a change that streams push (woken by `renew`).
            let now = tokio::time::Instant::now();
            let mut lingering = BTreeMap::new();
            let mut count = 0;
            let mut renew = None;
            for (name, (v, until)) in s.retired.get(type_url).into_iter().flatten() {
                if *until <= now || live.is_some_and(|m| m.contains_key(name)) {
                    continue;
                }
                count += 1;
                renew = earliest(renew, Some(*until));
                if names.is_none_or(|n| n.contains(name)) {
                    lingering.insert(name.as_str(), v);
                }
            }
            let version = match count {
                0 => s.type_version(type_url),
                n => format!("{}+{n}", s.type_version(type_url)),
            };
            let held = Held {
                live,
                lingering,
                names,
                node,
                log: s.changes.get(type_url),
            };
            (f(&version, &held), renew)
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
