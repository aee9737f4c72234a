//! [`serve`]: a tonic service behind the inbound stack, configured by the server's xDS
//! listener.

use std::future::Future;
use std::sync::Arc;

use mesh_core::config::{HttpFilterKind, Listener, ListenerKind, RbacConfig};
use mesh_tower::authz::AuthzLayer;
use mesh_tower::metrics::AccessLog;
use mesh_tower::server::{Inbound, InboundLayer};
use mesh_tower::tls::{MeshAcceptor, TlsMode};
use mesh_tower::trace::TraceLayer;
use tokio::net::TcpListener;
use tower::Layer;

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

type Config = (MeshAcceptor, Inbound<tonic::service::Routes>);

/// What a server listener says: the TLS mode and the RBAC filters of its HTTP chains.
fn from_listener(listener: &Listener) -> Option<(TlsMode, Vec<RbacConfig>)> {
    let ListenerKind::Server(server) = &listener.kind else {
        return None;
    };
    let rbac = server
        .filter_chains
        .iter()
        .chain(server.default_filter_chain.iter())
        .find_map(|c| c.http.as_ref())
        .map(|hcm| {
            hcm.http_filters
                .iter()
                .filter_map(|f| match &f.kind {
                    HttpFilterKind::Rbac(r) => Some(r.clone()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some((TlsMode::from_listener(server), rbac))
}

fn build(
    mesh: &Mesh,
    options: &ServeOptions,
    routes: &tonic::service::Routes,
    mode: TlsMode,
    rbac: Vec<RbacConfig>,
    address: &str,
) -> Result<Config, MeshError> {
    let acceptor = MeshAcceptor::new(mode, mesh.workload_identity())
        .map_err(|reason| MeshError::Server {
            address: address.to_owned(),
            reason,
        })?
        .with_metrics(mesh.metrics().clone());
    let mut layer = InboundLayer::new(&options.service)
        .metrics(mesh.metrics().clone())
        .trace(options.trace.clone().unwrap_or_else(TraceLayer::server))
        .authz(AuthzLayer::new(rbac));
    if let Some(a) = options.access_log {
        layer = layer.access_log(a);
    }
    Ok((acceptor, layer.layer(routes.clone())))
}

/// Serves `routes` on `listener` behind the inbound stack until `shutdown`, then drains.
///
/// The server's configuration is its xDS listener: the bootstrap's
/// `server_listener_resource_name_template` with `0.0.0.0:PORT` (Istio's
/// `xds.istio.io/grpc/lds/inbound/%s`). Its filter chains give the TLS mode (mTLS only,
/// mTLS and plaintext, or plaintext) and its RBAC filters the authorization rules. Like a
/// proxyless gRPC server, nothing is served until the listener arrives; a later version
/// applies to new connections, and a listener that is removed or rejected leaves the last
/// good one in force.
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
    let port = listener
        .local_addr()
        .map_err(|e| MeshError::Server {
            address: "?".into(),
            reason: e.to_string(),
        })?
        .port();
    let address = format!("0.0.0.0:{port}");
    if let Some(mode) = options.tls_mode {
        let config = build(mesh, &options, &routes, mode, Vec::new(), &address)?;
        let (_keep, rx) = tokio::sync::watch::channel(config);
        mesh_tower::server::serve_with(listener, rx, shutdown).await;
        return Ok(());
    }
    let name = mesh
        .xds()
        .bootstrap()
        .server_listener_name(&address)
        .ok_or_else(|| MeshError::Server {
            address: address.clone(),
            reason: "the bootstrap has no server_listener_resource_name_template (set one, or \
                     choose a mode with ServeOptions::tls_mode)"
                .into(),
        })?;
    mesh.xds().watch_listener(&name)?;
    let store = mesh.xds().store().clone();
    let first = store
        .wait_for(mesh.wait(), |s| {
            s.listener(&name)
                .is_some_and(|l| matches!(l.kind, ListenerKind::Server(_)))
        })
        .await
        .map_err(|_| {
            let dump = store.dump();
            let status = dump
                .get(mesh_core::xds::ResourceType::Listener, &name)
                .map(|r| match &r.error {
                    Some((_, e)) => format!("{}: {e}", r.status.as_str()),
                    None => r.status.as_str().to_owned(),
                })
                .unwrap_or_else(|| "not received".into());
            MeshError::Server {
                address: address.clone(),
                reason: format!(
                    "server listener {name:?} did not arrive within {:?} ({status}; xDS server \
                     {}, connected: {})",
                    mesh.wait(),
                    dump.server,
                    dump.connected
                ),
            }
        })?;
    // Correctness: checked by wait_for above.
    let current: Arc<Listener> = first.listener(&name).cloned().expect("server listener");
    let (mode, rbac) = from_listener(&current).expect("a server listener");
    tracing::info!(listener = %name, ?mode, rbac_filters = rbac.len(), "serving");
    let (tx, rx) =
        tokio::sync::watch::channel(build(mesh, &options, &routes, mode, rbac, &address)?);

    // Follow the listener: new connections get the new mode and rules.
    let follow = {
        let mesh = mesh.clone();
        let options = options.clone();
        let address = address.clone();
        let mut changes = store.subscribe();
        async move {
            let mut current = current;
            while changes.changed().await.is_ok() {
                let snap = store.load();
                let Some(next) = snap.listener(&name) else {
                    tracing::warn!(listener = %name, "server listener removed; keeping the last one");
                    continue;
                };
                if Arc::ptr_eq(next, &current) {
                    continue;
                }
                current = next.clone();
                let Some((mode, rbac)) = from_listener(&current) else {
                    continue;
                };
                match build(&mesh, &options, &routes, mode, rbac, &address) {
                    Ok(c) => {
                        tracing::info!(listener = %name, ?mode, "server listener updated");
                        let _ = tx.send(c);
                    }
                    Err(e) => tracing::warn!("{e}; keeping the last server configuration"),
                }
            }
            // The store outlives the server; should it not, keep serving what we have.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = mesh_tower::server::serve_with(listener, rx, shutdown) => {}
        () = follow => {}
    }
    Ok(())
}
