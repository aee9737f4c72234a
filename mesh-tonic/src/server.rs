//! [`serve`]: a tonic service behind the inbound stack, configured by the server's xDS
//! listener (glue over [`mesh_tower::server::serve_xds`]).

use std::future::Future;

use mesh_tower::metrics::AccessLog;
use mesh_tower::server::{serve_xds, Limits, XdsServe};
use mesh_tower::tls::TlsMode;
use mesh_tower::trace::TraceLayer;
use tokio::net::TcpListener;

use crate::{Mesh, SetupError};

/// How [`serve`] runs a server: [`XdsServe`]'s options, less those the [`Mesh`] gives
/// (its identity, metrics and configuration wait).
#[derive(Clone, Debug)]
pub struct ServeOptions {
    inner: XdsServe,
}

impl ServeOptions {
    /// A server for the service called `service` (the cluster label of its metrics).
    pub fn new(service: &str) -> Self {
        Self {
            inner: XdsServe::new(service),
        }
    }

    /// Serve in this mode without an xDS server listener (no RBAC). Without it, the mode and
    /// the authorization rules come from the listener named by the bootstrap's
    /// `server_listener_resource_name_template`.
    pub fn tls_mode(mut self, mode: TlsMode) -> Self {
        self.inner = self.inner.tls_mode(mode);
        self
    }

    /// Server spans with this layer (default: [`TraceLayer::server`]).
    pub fn trace(mut self, layer: TraceLayer) -> Self {
        self.inner = self.inner.trace(layer);
        self
    }

    /// Logs each request (see [`AccessLog`]).
    pub fn access_log(mut self, config: AccessLog) -> Self {
        self.inner = self.inner.access_log(config);
        self
    }

    /// Connection, header and stream limits (default [`Limits::default`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.inner = self.inner.limits(limits);
        self
    }
}

/// Serves `routes` on `listener` behind the inbound stack until `shutdown`, then drains.
///
/// The TLS mode (mTLS only, mTLS and plaintext, plaintext) and the RBAC rules come from the
/// server's xDS listener (`server_listener_resource_name_template` with `0.0.0.0:PORT`, e.g.
/// Istio's `xds.istio.io/grpc/lds/inbound/%s`) and follow its updates; see
/// [`mesh_tower::server::serve_xds`]. Metrics go to [`Mesh::metrics`].
///
/// ```no_run
/// # async fn run(mesh: mesh_tonic::Mesh, routes: tonic::service::Routes) -> Result<(), mesh_tonic::SetupError> {
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:50051").await.map_err(|e| {
///     mesh_tonic::SetupError::Server { address: "0.0.0.0:50051".into(), reason: e.to_string() }
/// })?;
/// let shutdown = std::future::pending(); // e.g. a ctrl-c future
/// mesh_tonic::serve(&mesh, listener, routes, mesh_tonic::ServeOptions::new("greeter"), shutdown).await
/// # }
/// ```
///
/// # Errors
/// No server listener name and no explicit mode, the listener not arriving in time, or a
/// mode that needs an identity the mesh does not have.
pub async fn serve(
    mesh: &Mesh,
    listener: TcpListener,
    routes: tonic::service::Routes,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SetupError> {
    let mut o = options
        .inner
        .metrics(mesh.metrics().clone())
        .wait_for_config(mesh.wait());
    if let Some(id) = mesh.workload_identity() {
        o = o.identity(id.clone());
    }
    serve_xds(mesh.xds(), listener, routes, o, shutdown)
        .await
        .map_err(SetupError::from)
}
