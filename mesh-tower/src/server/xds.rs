//! A server configured by its xDS server listener (see [`serve_xds`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use mesh_core::config::{
    HttpFilterKind, Listener, ListenerKind, RbacConfig, RequestPolicy, RouteConfig, RouteSource,
    Snapshot,
};
use mesh_core::identity::IdentityStore;
use mesh_core::xds::XdsClient;
use mesh_core::ConfigStore;
use tokio::net::TcpListener;
use tower::{Layer, Service};

use super::serve::{serve_with_limits, Inbound, InboundLayer, Limits};
use crate::authz::AuthzLayer;
use crate::error::BoxError;
use crate::metrics::{AccessLog, Metrics};
use crate::tls::{MeshAcceptor, TlsMode};
use crate::trace::TraceLayer;

/// Why an xDS-configured server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listening socket has no address.
    #[error("listening socket: {0}")]
    Io(#[from] std::io::Error),
    /// The bootstrap names no server listeners and no mode was given.
    #[error("server on {address}: the bootstrap has no server_listener_resource_name_template (set one, or choose a mode with XdsServe::tls_mode)")]
    NoTemplate {
        /// The listening address.
        address: String,
    },
    /// The server listener did not arrive in time.
    #[error("server on {address}: listener {name:?} did not arrive within {waited:?} ({status}; xDS server {server}, connected: {connected})")]
    NotDelivered {
        /// The listening address.
        address: String,
        /// The listener's name.
        name: String,
        /// How long it waited.
        waited: Duration,
        /// The resource's status (`REQUESTED`, `NACKED: why`, `DOES_NOT_EXIST`).
        status: String,
        /// The xDS server.
        server: String,
        /// Whether the stream was up.
        connected: bool,
    },
    /// The listener asks for TLS and the server has no identity.
    #[error("server on {address}: {reason}")]
    Tls {
        /// The listening address.
        address: String,
        /// What is missing.
        reason: String,
    },
    /// The server listener asks for what a server cannot do.
    #[error("server on {address}: {reason}")]
    Policy {
        /// The listening address.
        address: String,
        /// What.
        reason: String,
    },
    /// The xDS client stopped.
    #[error(transparent)]
    Xds(#[from] mesh_core::XdsError),
}

/// How [`serve_xds`] runs a server.
#[derive(Clone, Debug)]
pub struct XdsServe {
    service: String,
    identity: Option<IdentityStore>,
    metrics: Metrics,
    trace: Option<TraceLayer>,
    access_log: Option<AccessLog>,
    tls_mode: Option<TlsMode>,
    wait: Duration,
    limits: Limits,
}

impl XdsServe {
    /// A server for the service called `service` (the cluster label of its metrics).
    pub fn new(service: &str) -> Self {
        Self {
            service: service.to_owned(),
            identity: None,
            metrics: Metrics::default(),
            trace: None,
            access_log: None,
            tls_mode: None,
            wait: Duration::from_secs(10),
            limits: Limits::default(),
        }
    }

    /// The workload identity (needed when the listener asks for TLS).
    pub fn identity(mut self, identity: IdentityStore) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Records into `metrics`.
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
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

    /// Serve in this mode without an xDS server listener (and without RBAC).
    pub fn tls_mode(mut self, mode: TlsMode) -> Self {
        self.tls_mode = Some(mode);
        self
    }

    /// Connection, header and stream limits (default [`Limits::default`](super::serve::Limits)).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How long to wait for the server listener (default 10 s).
    pub fn wait_for_config(mut self, timeout: Duration) -> Self {
        self.wait = timeout;
        self
    }

    fn build<A>(
        &self,
        app: &A,
        ServerPolicy {
            tls_mode: mode,
            rbac,
            request,
            routes,
        }: ServerPolicy,
        address: &str,
    ) -> Result<(MeshAcceptor, Inbound<A>), ServeError>
    where
        A: Clone,
    {
        let acceptor = MeshAcceptor::new(mode, self.identity.as_ref())
            .map_err(|reason| ServeError::Tls {
                address: address.to_owned(),
                reason,
            })?
            .with_metrics(self.metrics.clone());
        let mut layer = InboundLayer::new(&self.service)
            .metrics(self.metrics.clone())
            .trace(self.trace.clone().unwrap_or_else(TraceLayer::server))
            .authz({
                let authz = AuthzLayer::named(rbac).with_request_policy(request);
                match routes {
                    Some(rc) => authz.with_routes(rc),
                    None => authz,
                }
            });
        if let Some(a) = self.access_log {
            layer = layer.access_log(a);
        }
        Ok((acceptor, layer.layer(app.clone())))
    }
}

/// What a server listener asks of the server.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ServerPolicy {
    /// mTLS only, mTLS and plaintext, or plaintext.
    pub tls_mode: TlsMode,
    /// The RBAC filters of its HTTP chain, by name, in order.
    pub rbac: Vec<(String, RbacConfig)>,
    /// Its HTTP chain's routes, for per-route RBAC (inline, or the RDS resource).
    pub routes: Option<Arc<RouteConfig>>,
    /// Its connection manager's request policy (path normalization, escaped slashes,
    /// underscore headers), applied before RBAC.
    pub request: RequestPolicy,
}

/// What a server listener says: the TLS mode, and the RBAC filters and request policy of its
/// HTTP chain.
pub fn listener_policy(listener: &Listener) -> Option<ServerPolicy> {
    let ListenerKind::Server(server) = &listener.kind else {
        return None;
    };
    let hcm = server
        .filter_chains
        .iter()
        .chain(server.default_filter_chain.iter())
        .find_map(|c| c.http.as_ref());
    let rbac = hcm
        .map(|hcm| {
            hcm.http_filters
                .iter()
                .filter_map(|f| match &f.kind {
                    HttpFilterKind::Rbac(r) => Some((f.name.clone(), r.clone())),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(ServerPolicy {
        tls_mode: TlsMode::from_listener(server),
        rbac,
        request: hcm.map(|h| h.request.clone()).unwrap_or_default(),
        routes: hcm.and_then(|h| match &h.routes {
            RouteSource::Inline(rc) => Some(rc.clone()),
            RouteSource::Rds(_) => None,
        }),
    })
}

/// [`listener_policy`], with the routes of an RDS connection manager taken from `snapshot`.
/// A server's routes must all be `non_forwarding_action` (it hands requests to the
/// application); anything else is an error naming the route configuration.
///
/// # Errors
/// A route of the server listener that forwards, redirects or answers by itself.
pub fn server_policy(
    listener: &Listener,
    snapshot: &mesh_core::config::Snapshot,
) -> Option<Result<ServerPolicy, String>> {
    let mut policy = listener_policy(listener)?;
    if policy.routes.is_none() {
        if let ListenerKind::Server(server) = &listener.kind {
            let rds = server
                .filter_chains
                .iter()
                .chain(server.default_filter_chain.iter())
                .find_map(|c| c.http.as_ref())
                .and_then(|h| match &h.routes {
                    RouteSource::Rds(name) => Some(name),
                    RouteSource::Inline(_) => None,
                });
            if let Some(name) = rds {
                policy.routes = snapshot.route_config(name).cloned();
            }
        }
    }
    if let Some(rc) = &policy.routes {
        for vh in &rc.virtual_hosts {
            for r in &vh.routes {
                if r.action != mesh_core::config::RouteAction::NonForwarding {
                    return Some(Err(format!(
                        "route configuration {:?}: route {:?} of virtual host {:?} does not use non_forwarding_action; a server hands every authorized request to the application and does not route",
                        rc.name, r.name, vh.name
                    )));
                }
            }
        }
    }
    Some(Ok(policy))
}

/// Serves `app` on `listener` behind the inbound stack until `shutdown`, then drains.
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
/// # async fn run(xds: mesh_core::xds::XdsClient, id: mesh_core::identity::IdentityStore) -> Result<(), mesh_tower::server::ServeError> {
/// use mesh_tower::server::{serve_xds, XdsServe};
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
/// let app = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from("hi"))))
/// });
/// serve_xds(&xds, listener, app, XdsServe::new("reviews").identity(id), std::future::pending()).await
/// # }
/// ```
///
/// # Errors
/// No server listener name and no explicit mode, the listener not arriving in time, or a
/// mode that needs an identity the server does not have.
pub async fn serve_xds<A, B>(
    xds: &XdsClient,
    listener: TcpListener,
    app: A,
    options: XdsServe,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError>
where
    A: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    A::Future: Send + 'static,
    A::Error: Into<BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Default + Send + 'static,
    B::Error: Into<BoxError> + std::fmt::Display,
{
    if let Some(id) = &options.identity {
        options.metrics.observe_identity(id);
    }
    let port = listener.local_addr()?.port();
    let address = format!("0.0.0.0:{port}");
    if let Some(mode) = options.tls_mode {
        let policy = ServerPolicy {
            tls_mode: mode,
            rbac: Vec::new(),
            request: RequestPolicy::default(),
            routes: None,
        };
        let config = options.build(&app, policy, &address)?;
        let (_keep, rx) = tokio::sync::watch::channel(config);
        serve_with_limits(listener, rx, options.limits, shutdown).await;
        return Ok(());
    }
    let name = xds
        .bootstrap()
        .server_listener_name(&address)
        .ok_or_else(|| ServeError::NoTemplate {
            address: address.clone(),
        })?;
    xds.watch_listener(&name)?;
    let store = xds.store().clone();
    let first = delivered(&store, &name, &address, options.wait).await?;
    // Correctness: wait_for above saw a server listener under this name.
    let current: Arc<Listener> = first.listener(&name).cloned().expect("server listener");
    let policy = match server_policy(&current, &first).expect("a server listener") {
        Ok(p) => p,
        Err(reason) => {
            return Err(ServeError::Policy {
                address: address.clone(),
                reason,
            })
        }
    };
    tracing::info!(listener = %name, mode = ?policy.tls_mode, rbac_filters = policy.rbac.len(), "serving");
    let limits = options.limits;
    let (tx, rx) = tokio::sync::watch::channel(options.build(&app, policy, &address)?);

    // Follow the listener: new connections get the new mode and rules.
    let follow = follow(store, name, current, options, app, address, tx);
    tokio::select! {
        () = serve_with_limits(listener, rx, limits, shutdown) => {}
        () = follow => {}
    }
    Ok(())
}

/// Waits up to `wait` for the server listener `name`: the snapshot that has it, or an error
/// saying what the client knows of it (NACKed and why, does not exist, not received).
async fn delivered(
    store: &ConfigStore,
    name: &str,
    address: &str,
    wait: Duration,
) -> Result<Arc<Snapshot>, ServeError> {
    store
        .wait_for(wait, |s| {
            s.listener(name)
                .is_some_and(|l| matches!(l.kind, ListenerKind::Server(_)))
        })
        .await
        .map_err(|_| {
            let dump = store.dump();
            let status = dump
                .get(mesh_core::xds::ResourceType::Listener, name)
                .map(|r| match &r.error {
                    Some(rejected) => format!("{}: {}", r.status.as_str(), rejected.error),
                    None => r.status.as_str().to_owned(),
                })
                .unwrap_or_else(|| "not received".into());
            ServeError::NotDelivered {
                address: address.to_owned(),
                name: name.to_owned(),
                waited: wait,
                status,
                server: dump.server.clone(),
                connected: dump.connected,
            }
        })
}

/// Follows the server listener `name`: each change that alters its mode, rules or routes
/// is built and sent to the accept loop (new connections take it); a bad one is logged and
/// the last good configuration kept.
async fn follow<A, B>(
    store: ConfigStore,
    name: String,
    current: Arc<Listener>,
    options: XdsServe,
    app: A,
    address: String,
    tx: tokio::sync::watch::Sender<(MeshAcceptor, Inbound<A>)>,
) where
    A: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    A::Future: Send + 'static,
    A::Error: Into<BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Default + Send + 'static,
    B::Error: Into<BoxError> + std::fmt::Display,
{
    let mut changes = store.subscribe();
    let mut current = current;
    let mut routes = None;
    while changes.changed().await.is_ok() {
        let snap = store.load();
        let Some(next) = snap.listener(&name) else {
            tracing::warn!(listener = %name, "server listener removed; keeping the last one");
            continue;
        };
        let policy = match server_policy(next, &snap) {
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                tracing::warn!(listener = %name, "{e}; keeping the last server configuration");
                continue;
            }
            None => continue,
        };
        // Rebuild when the listener or its routes change.
        let same_routes = match (&routes, &policy.routes) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if Arc::ptr_eq(next, &current) && same_routes {
            continue;
        }
        current = next.clone();
        routes = policy.routes.clone();
        let mode = policy.tls_mode;
        match options.build(&app, policy, &address) {
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
