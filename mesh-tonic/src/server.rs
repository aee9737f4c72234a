//! [`serve`]: a tonic service behind the inbound stack, configured by the server's xDS
//! listener (glue over [`mesh_tower::server::serve_xds`]).

use std::future::Future;

use mesh_tower::metrics::AccessLog;
use mesh_tower::server::{serve_xds, XdsServe};
use mesh_tower::tls::TlsMode;
use mesh_tower::trace::TraceLayer;
use tokio::net::TcpListener;

use crate::{Mesh, MeshError};

/// How [`serve`] runs a server.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    service: String,
    tls_mode: Option<TlsMode>,
    trace: Option<TraceLayer>,
    access_log: Option<AccessLog>,
}

impl ServeOptions {
    /// A server for the service called `service` (the cluster label of its metrics).
    pub fn new(service: &str) -> Self {
        Self {
            service: service.to_owned(),
            tls_mode: None,
            trace: None,
            access_log: None,
        }
    }

    /// Serve in this mode without an xDS server listener (no RBAC). Without it, the mode and
    /// the authorization rules come from the listener named by the bootstrap's
    /// `server_listener_resource_name_template`.
    pub fn tls_mode(mut self, mode: TlsMode) -> Self {
        self.tls_mode = Some(mode);
        self
    }

    /// Server spans with this layer (default: [`TraceLayer::server`]).
    pub fn trace(mut self, layer: TraceLayer) -> Self {
        self.trace = Some(layer);
        self
    }

    /// Logs each request (see [`AccessLog`]).
    pub fn access_log(mut self, config: AccessLog) -> Self {
        self.access_log = Some(config);
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
/// # async fn run(mesh: mesh_tonic::Mesh, routes: tonic::service::Routes) -> Result<(), mesh_tonic::MeshError> {
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:50051").await.map_err(|e| {
///     mesh_tonic::MeshError::Server { address: "0.0.0.0:50051".into(), reason: e.to_string() }
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
) -> Result<(), MeshError> {
    let mut o = XdsServe::new(&options.service)
        .metrics(mesh.metrics().clone())
        .wait_for_config(mesh.wait());
    if let Some(id) = mesh.workload_identity() {
        o = o.identity(id.clone());
    }
    if let Some(t) = options.trace {
        o = o.trace(t);
    }
    if let Some(a) = options.access_log {
        o = o.access_log(a);
    }
    if let Some(m) = options.tls_mode {
        o = o.tls_mode(m);
    }
    serve_xds(mesh.xds(), listener, routes, o, shutdown)
        .await
        .map_err(MeshError::from)
}
