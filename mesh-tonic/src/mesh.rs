//! [`Mesh`]: one xDS client, identity and metrics shared by a service's channels and server.

use std::time::Duration;

use mesh_core::identity::IdentityStore;
use mesh_core::xds::{Bootstrap, Target, XdsClient};
use mesh_core::XdsError;
use mesh_tower::metrics::Metrics;
use mesh_tower::trace::TraceLayer;
use mesh_tower::MeshClient;

use crate::MeshChannel;

/// Why the mesh could not be set up or a channel or server could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The bootstrap, the xDS client or the certificate provider failed.
    #[error(transparent)]
    Core(#[from] mesh_core::Error),
    /// A target or listener could not be resolved over xDS.
    #[error(transparent)]
    Xds(#[from] XdsError),
    /// The workload identity could not be loaded.
    #[error("workload identity: {0}")]
    Identity(#[from] mesh_core::identity::IdentityError),
    /// The target's name is not a valid authority.
    #[error("target {target:?}: {reason}")]
    Target {
        /// The target.
        target: String,
        /// What is wrong.
        reason: String,
    },
    /// The server could not start (see [`mesh_tower::server::ServeError`]).
    #[error(transparent)]
    Serve(#[from] mesh_tower::server::ServeError),
    /// The server could not be set up.
    #[error("server on {address}: {reason}")]
    Server {
        /// The listening address.
        address: String,
        /// What is wrong.
        reason: String,
    },
}

/// A service's view of the mesh: the xDS client, the workload identity and the metrics that
/// its [`MeshChannel`]s and its server share. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Mesh {
    xds: XdsClient,
    identity: Option<IdentityStore>,
    metrics: Metrics,
    trace: Option<TraceLayer>,
    wait: Duration,
}

impl Mesh {
    /// From `GRPC_XDS_BOOTSTRAP` / `GRPC_XDS_BOOTSTRAP_CONFIG`; the bootstrap's
    /// `certificate_providers.default` (file_watcher), if present, is the workload identity.
    /// Call within a tokio runtime.
    ///
    /// # Errors
    /// A missing or invalid bootstrap, or certificates that cannot be loaded.
    pub fn from_env() -> Result<Self, SetupError> {
        let bootstrap = Bootstrap::from_env().map_err(mesh_core::Error::from)?;
        Self::from_bootstrap(bootstrap)
    }

    /// From a bootstrap (see [`Mesh::from_env`]).
    ///
    /// # Errors
    /// See [`Mesh::from_env`].
    pub fn from_bootstrap(bootstrap: Bootstrap) -> Result<Self, SetupError> {
        let identity = if bootstrap.certificate_providers.contains_key("default") {
            Some(mesh_core::identity::from_bootstrap(&bootstrap, "default")?)
        } else {
            None
        };
        let xds = XdsClient::builder(bootstrap).build()?;
        let mut mesh = Self::new(xds);
        mesh.identity = identity;
        Ok(mesh)
    }

    /// Over an existing xDS client, without identity.
    pub fn new(xds: XdsClient) -> Self {
        let metrics = Metrics::default();
        metrics.observe_xds(xds.store());
        Self {
            xds,
            identity: None,
            metrics,
            trace: None,
            wait: Duration::from_secs(10),
        }
    }

    /// The workload identity for mTLS (clusters with an `UpstreamTlsContext`, and servers
    /// whose listener requires TLS).
    pub fn identity(mut self, identity: IdentityStore) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Records into `metrics` instead of the mesh's own.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        metrics.observe_xds(self.xds.store());
        self.metrics = metrics;
        self
    }

    /// Client spans with this layer (default: [`TraceLayer::client`]); servers use
    /// `ServeOptions::trace`.
    pub fn trace(mut self, layer: TraceLayer) -> Self {
        self.trace = Some(layer);
        self
    }

    /// How long [`Mesh::channel`] and `serve` wait for their configuration
    /// (default 10 s).
    pub fn wait_for_config(mut self, timeout: Duration) -> Self {
        self.wait = timeout;
        self
    }

    /// The xDS client.
    pub fn xds(&self) -> &XdsClient {
        &self.xds
    }

    /// The metrics of every channel and server of this mesh.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn workload_identity(&self) -> Option<&IdentityStore> {
        self.identity.as_ref()
    }

    pub(crate) fn wait(&self) -> Duration {
        self.wait
    }

    /// A channel to `target` (`xds:///name:port`), once its listener and routes have arrived
    /// (and, within the same wait, the clusters they name and their endpoints). Calls on it
    /// made while configuration is still arriving wait for it within their deadline.
    ///
    /// # Errors
    /// The target is invalid, or its configuration did not arrive in time (the error says
    /// what the client knows: unreachable server, NACK, or does not exist).
    pub async fn channel(&self, target: &str) -> Result<MeshChannel, SetupError> {
        let parsed = Target::parse(target)?;
        let authority =
            http::uri::Authority::try_from(parsed.name()).map_err(|e| SetupError::Target {
                target: target.to_owned(),
                reason: format!("not a host:port authority: {e}"),
            })?;
        let started = std::time::Instant::now();
        let listener = self.xds.listener(target, self.wait).await?;
        // Clusters and endpoints arrive after routes. Calls made before would wait for them
        // by themselves (`MeshClient`'s readiness layer); waiting here keeps the first
        // call's latency ordinary. What is still missing after the wait is the calls' to meet.
        let _ = self
            .xds
            .store()
            .wait_complete(&listener.name, self.wait.saturating_sub(started.elapsed()))
            .await;
        let mut builder =
            MeshClient::builder(self.xds.store().clone(), target)?.metrics(self.metrics.clone());
        if let Some(id) = &self.identity {
            builder = builder.identity(id.clone());
        }
        if let Some(t) = &self.trace {
            builder = builder.trace(t.clone());
        }
        Ok(MeshChannel::new(builder.build(), authority))
    }
}
