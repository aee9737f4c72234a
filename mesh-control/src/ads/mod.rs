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

pub use cache::{resource_name, NodeView, PerNode, ResourceCache, ACK_WAIT, RETIRE_GRACE};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

mod cache;

mod delta;

pub mod sds;

mod sotw;
mod source;

mod stream;

pub use source::{is_envoy, ClientEvent, Verdict};
use source::{BoxStream, EventLog, Source};

/// The ADS gRPC service.
#[derive(Clone, Debug)]
pub struct AdsServer {
    cache: ResourceCache,
    envoy_cache: Option<ResourceCache>,
    sds: Option<Arc<sds::SdsIssuer>>,
    events: EventLog,
    /// Flipped to `true` when the server shuts down, ending every open stream.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Bumped to end the streams open now (clients reconnect; the server keeps serving).
    dropping: tokio::sync::watch::Sender<u64>,
}

impl AdsServer {
    /// A server for `cache`.
    pub fn new(cache: ResourceCache) -> Self {
        Self {
            cache,
            envoy_cache: None,
            sds: None,
            events: EventLog::default(),
            stopping: tokio::sync::watch::channel(false).0,
            dropping: tokio::sync::watch::channel(0).0,
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
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
        self.events
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .connects
    }

    /// The tonic service, to mount in a `tonic::transport::Server` of your own.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(64 << 20)
    }

    /// Ends every open stream with UNAVAILABLE, as a control plane going away would.
    pub fn stop_streams(&self) {
        self.stopping.send_replace(true);
    }

    /// Ends the streams open now with UNAVAILABLE, as a flapping connection would; the
    /// server keeps serving and the clients reconnect (with their backoff).
    pub fn drop_streams(&self) {
        self.dropping.send_modify(|n| *n += 1);
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
            self.dropping.subscribe(),
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
            self.dropping.subscribe(),
            request.into_inner(),
        );
        Ok(Response::new(stream))
    }
}
