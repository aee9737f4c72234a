//! An ADS server (SotW and delta) over a shared [`ResourceCache`].
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use mesh_control::ads::{AdsServer, ResourceCache};
//! let cache = ResourceCache::new();
//! // cache.set_resources(resources) publishes; every connected client gets the change.
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:18000").await?;
//! AdsServer::new(cache).serve(listener, std::future::pending()).await
//! # }
//! ```

mod cache;
mod delta;
pub mod sds;
mod sotw;
mod stream;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

pub use cache::{resource_name, NodeView, PerNode, ResourceCache, RETIRE_GRACE};

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
struct Events {
    list: Vec<ClientEvent>,
    connects: u64,
}

/// Records ACKs and NACKs per client, for logs and tests.
#[derive(Clone, Debug, Default)]
pub(crate) struct EventLog {
    inner: Arc<Mutex<Events>>,
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
        let mut events = self.inner.lock().expect("event log lock");
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
        self.inner.lock().expect("event log lock").connects += 1;
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
    envoy_cache: Option<ResourceCache>,
    sds: Option<Arc<sds::SdsIssuer>>,
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
        std::collections::BTreeMap<String, cache::Versioned>,
        Option<tokio::time::Instant>,
    ) {
        if type_url == sds::SECRET_TYPE {
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
            let mut resources: std::collections::BTreeMap<String, cache::Versioned> = s
                .resources(type_url)
                .map(|m| {
                    m.iter()
                        .filter(|(name, _)| names.is_none_or(|n| n.contains(*name)))
                        .map(|(k, v)| {
                            let v = match &v.view {
                                Some(_) => cache::Versioned {
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
                renew = stream::earliest(renew, Some(*until));
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

/// The ADS gRPC service.
#[derive(Clone, Debug)]
pub struct AdsServer {
    cache: ResourceCache,
    envoy_cache: Option<ResourceCache>,
    sds: Option<Arc<sds::SdsIssuer>>,
    events: EventLog,
    /// Flipped to `true` when the server shuts down, ending every open stream.
    stopping: tokio::sync::watch::Sender<bool>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl AdsServer {
    /// A server for `cache`.
    pub fn new(cache: ResourceCache) -> Self {
        Self {
            cache,
            envoy_cache: None,
            sds: None,
            events: EventLog::default(),
            stopping: tokio::sync::watch::channel(false).0,
        }
    }

    /// Also serves workload certificates over SDS (see [`sds`]).
    pub fn with_sds(mut self, issuer: sds::SdsIssuer) -> Self {
        self.sds = Some(Arc::new(issuer));
        self
    }

    /// Serves Envoy nodes (see [`is_envoy`]) from `cache` instead. Publish into it before
    /// the main cache: streams wake on the main cache's changes.
    pub fn with_envoy_cache(mut self, cache: ResourceCache) -> Self {
        self.envoy_cache = Some(cache);
        self
    }

    fn source(&self) -> Source {
        Source {
            cache: self.cache.clone(),
            envoy_cache: self.envoy_cache.clone(),
            sds: self.sds.clone(),
        }
    }

    /// The cache served.
    pub fn cache(&self) -> &ResourceCache {
        &self.cache
    }

    /// Every ACK and NACK received so far (most recent last).
    pub fn events(&self) -> Vec<ClientEvent> {
        self.events
            .inner
            .lock()
            .expect("event log lock")
            .list
            .clone()
    }

    /// NACKs received so far.
    pub fn nacks(&self) -> Vec<ClientEvent> {
        self.events()
            .into_iter()
            .filter(|e| matches!(e.verdict, Verdict::Nack(_)))
            .collect()
    }

    /// How many streams have been opened.
    pub fn connects(&self) -> u64 {
        self.events.inner.lock().expect("event log lock").connects
    }

    /// The tonic service, to mount in a `tonic::transport::Server` of your own.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(64 << 20)
    }

    /// Ends every open stream with UNAVAILABLE, as a control plane going away would.
    pub fn stop_streams(&self) {
        self.stopping.send_replace(true);
    }

    /// Serves on `listener` until `shutdown` completes; open streams then end with
    /// UNAVAILABLE so clients reconnect elsewhere.
    ///
    /// # Errors
    /// The transport failed.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let stopping = self.stopping.clone();
        let shutdown = async move {
            shutdown.await;
            stopping.send_replace(true);
        };
        tonic::transport::Server::builder()
            .add_service(self.into_service())
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(std::io::Error::other)
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let stream = stream::serve::<sotw::Sotw>(
            self.source(),
            self.events.clone(),
            self.stopping.subscribe(),
            request.into_inner(),
        );
        Ok(Response::new(stream))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let stream = stream::serve::<delta::Delta>(
            self.source(),
            self.events.clone(),
            self.stopping.subscribe(),
            request.into_inner(),
        );
        Ok(Response::new(stream))
    }
}
