//! Serving: the accept loop with its limits, the inbound stack and the answers to its errors.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};

use crate::authz::{Authz, AuthzLayer};
use crate::error::BoxError;
use crate::ext::{LocalAddr, RemoteAddr};
use crate::metrics::{AccessLog, Direction, Metrics, MetricsLayer, MetricsService};
use crate::tls::MeshAcceptor;
use crate::trace::{Trace, TraceLayer};

/// The inbound stack over an application service `S`.
pub type Inbound<S> = AnswerErrors<Trace<MetricsService<Authz<S>>>>;

/// The inbound stack: sensitive headers marked, then trace > metrics > authz > application,
/// its errors answered as responses (so its error type is [`Infallible`], as axum and hyper
/// want). [`SENSITIVE_HEADERS`](crate::SENSITIVE_HEADERS) are marked before any layer sees
/// them.
///
/// With axum, it is an ordinary layer (`Router::layer(InboundLayer::new("reviews"))`); see
/// `examples/axum.rs`.
///
/// ```
/// use mesh_tower::metrics::Metrics;
/// use mesh_tower::server::InboundLayer;
/// use tower::Layer;
///
/// let metrics = Metrics::default();
/// let app = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
/// });
/// // Serve `inbound` with `mesh_tower::server::serve`; scrape `metrics` with `mesh_tower::admin`.
/// let inbound = InboundLayer::new("reviews").metrics(metrics.clone()).layer(app);
/// # drop(inbound);
/// ```
#[derive(Clone, Debug)]
pub struct InboundLayer {
    service: String,
    metrics: Metrics,
    trace: TraceLayer,
    authz: AuthzLayer,
    access_log: Option<AccessLog>,
}

impl InboundLayer {
    /// The stack for the service called `service` (the cluster label of its inbound
    /// metrics): server spans from the global tracer provider, fresh metrics, no RBAC rules.
    pub fn new(service: &str) -> Self {
        Self {
            service: service.to_owned(),
            metrics: Metrics::default(),
            trace: TraceLayer::server(),
            authz: AuthzLayer::new(Vec::new()),
            access_log: None,
        }
    }

    /// Records into `metrics` (share them with the outbound client to serve both on one
    /// admin endpoint).
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Server spans (e.g. with a given tracer or propagation formats).
    pub fn trace(mut self, layer: TraceLayer) -> Self {
        self.trace = layer;
        self
    }

    /// Authorization rules.
    pub fn authz(mut self, layer: AuthzLayer) -> Self {
        self.authz = layer;
        self
    }

    /// Logs each inbound request (see [`AccessLog`]).
    pub fn access_log(mut self, config: AccessLog) -> Self {
        self.access_log = Some(config);
        self
    }
}

impl<S> tower::Layer<S> for InboundLayer {
    type Service = Inbound<S>;

    fn layer(&self, app: S) -> Inbound<S> {
        let mut metrics =
            MetricsLayer::new(self.metrics.clone(), Direction::Inbound).service(&self.service);
        if let Some(a) = self.access_log {
            metrics = metrics.access_log(a);
        }
        AnswerErrors {
            inner: self.trace.layer(metrics.layer(self.authz.layer(app))),
        }
    }
}

/// Marks the credential headers of requests and responses sensitive
/// ([`SENSITIVE_HEADERS`](crate::SENSITIVE_HEADERS)), and answers the errors of the service
/// it wraps as responses, after the span and the metrics
/// below it have recorded them: a [`MeshError`](crate::MeshError) (e.g. from an outbound call
/// the handler made with `?`) with its own status (504 for a timeout, 503 for no healthy
/// endpoint...), any other error with 500; each is logged at `WARN`. Its error type is
/// [`Infallible`].
///
/// ```
/// use mesh_tower::server::InboundLayer;
/// use tower::{Layer, ServiceExt};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let app = tower::service_fn(|_req: http::Request<String>| async {
///     Err::<http::Response<String>, _>("the database is down")
/// });
/// // The inbound stack ends in `AnswerErrors`: the error becomes a 500, never an `Err`.
/// let inbound = InboundLayer::new("reviews").layer(app);
/// let resp = inbound.oneshot(http::Request::new(String::new())).await.unwrap();
/// assert_eq!(resp.status(), 500);
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct AnswerErrors<S> {
    inner: S,
}

impl<S> AnswerErrors<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

pin_project_lite::pin_project! {
    /// The response body of [`AnswerErrors`]: the inner service's, or empty for an error.
    /// Its `Default` is empty, so layers that make responses of their own (tower-http's
    /// timeout, for one) can sit above the inbound stack.
    #[project = AnsweredBodyProj]
    #[derive(Debug)]
    // pin-project-lite takes no attributes on fields; `body` is the inner service's body.
    #[allow(missing_docs)]
    pub enum AnsweredBody<B> {
        /// The inner service's body (`body`).
        Inner { #[pin] body: B },
        /// No body (an error answered, or a default).
        Empty,
    }
}

// pin-project-lite's enums take no `#[default]` variant attribute.
#[allow(clippy::derivable_impls)]
impl<B> Default for AnsweredBody<B> {
    fn default() -> Self {
        Self::Empty
    }
}

impl<B: http_body::Body> http_body::Body for AnsweredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        match self.project() {
            AnsweredBodyProj::Inner { body } => body.poll_frame(cx),
            AnsweredBodyProj::Empty => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Inner { body } => body.is_end_stream(),
            Self::Empty => true,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Self::Inner { body } => body.size_hint(),
            Self::Empty => http_body::SizeHint::with_exact(0),
        }
    }
}

impl<S, ReqB, B> Service<Request<ReqB>> for AnswerErrors<S>
where
    S: Service<Request<ReqB>, Response = Response<B>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<AnsweredBody<B>>;
    type Error = Infallible;
    type Future = AnswerErrorsFuture<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        // A service that cannot become ready is answered when called.
        match self.inner.poll_ready(cx) {
            std::task::Poll::Ready(Err(e)) => {
                let e: BoxError = e.into();
                tracing::warn!("inbound service not ready: {e}");
                std::task::Poll::Ready(Ok(()))
            }
            std::task::Poll::Ready(Ok(())) => std::task::Poll::Ready(Ok(())),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        crate::sensitive::mark_sensitive(req.headers_mut());
        AnswerErrorsFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`AnswerErrors`].
    #[derive(Debug)]
    pub struct AnswerErrorsFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, B, E> Future for AnswerErrorsFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<AnsweredBody<B>>, Infallible>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let out = futures::ready!(self.project().inner.poll(cx));
        std::task::Poll::Ready(Ok(match out {
            Ok(mut resp) => {
                crate::sensitive::mark_sensitive(resp.headers_mut());
                resp.map(|body| AnsweredBody::Inner { body })
            }
            Err(e) => {
                let e: BoxError = e.into();
                let status = e
                    .downcast_ref::<crate::MeshError>()
                    .map_or(http::StatusCode::INTERNAL_SERVER_ERROR, |m| m.status());
                tracing::warn!("inbound request answered {status}: {e}");
                let mut resp = Response::new(AnsweredBody::Empty);
                *resp.status_mut() = status;
                resp
            }
        }))
    }
}

/// Serves `service` on `listener` through `acceptor` until `shutdown`; then stops accepting
/// and lets open connections finish their requests.
///
/// ```no_run
/// # async fn run(identity: mesh_core::identity::IdentityStore) -> Result<(), Box<dyn std::error::Error>> {
/// use mesh_tower::tls::{MeshAcceptor, PeerIdentity, TlsMode};
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8443").await?;
/// let acceptor = MeshAcceptor::new(TlsMode::Strict, Some(&identity))?;
/// let app = tower::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
///     let peer = req.extensions().get::<PeerIdentity>().and_then(|p| p.0.clone());
///     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
///         bytes::Bytes::from(format!("hello {peer:?}")),
///     )))
/// });
/// mesh_tower::server::serve(listener, acceptor, app, std::future::pending()).await;
/// # Ok(()) }
/// ```
pub async fn serve<S, B>(
    listener: TcpListener,
    acceptor: MeshAcceptor,
    service: S,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (_keep, config) = tokio::sync::watch::channel((acceptor, service));
    serve_with(listener, config, shutdown).await;
}

/// What a server holds against abusive or broken clients. The defaults are on in [`serve`],
/// [`serve_with`] and `serve_xds`; [`serve_with_limits`] takes others.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections at most; beyond it, a new connection is closed at once (and logged).
    /// Default 10 000.
    pub max_connections: usize,
    /// Time a client has to send a whole HTTP/1.1 request head (slowloris defence); the
    /// connection is closed after it. hyper starts this timer whenever it waits for a head,
    /// so it also closes HTTP/1.1 keep-alive connections idle that long: the default, 60 s,
    /// is above the mesh client's 30 s pool idle timeout, so a pooled connection is never
    /// closed under a request being sent on it.
    pub header_read_timeout: Duration,
    /// Largest request head in bytes: HTTP/1.1 heads beyond it get 431, HTTP/2 header lists
    /// beyond it reset the stream. Default 64 KiB (at least 8 KiB).
    pub max_header_bytes: usize,
    /// Concurrent HTTP/2 streams per connection. Default 256.
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            max_concurrent_streams: 256,
        }
    }
}

/// Like [`serve`], with the acceptor and service taken from `config` for each new
/// connection: when the server's configuration changes (its TLS mode or authorization from
/// xDS), new connections get the new pair while open ones finish with the one they had.
pub async fn serve_with<S, B>(
    listener: TcpListener,
    config: tokio::sync::watch::Receiver<(MeshAcceptor, S)>,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    serve_with_limits(listener, config, Limits::default(), shutdown).await;
}

/// [`serve_with`] under `limits`.
///
/// ```no_run
/// # async fn run(app: mesh_tower::server::Inbound<tower::util::ServiceFn<fn(http::Request<hyper::body::Incoming>) -> std::future::Ready<Result<http::Response<http_body_util::Empty<bytes::Bytes>>, std::convert::Infallible>>>>) {
/// use std::time::Duration;
/// use mesh_tower::server::{serve_with_limits, Limits};
/// use mesh_tower::tls::{MeshAcceptor, TlsMode};
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await.unwrap();
/// let acceptor = MeshAcceptor::new(TlsMode::Disable, None).unwrap();
/// let (_keep, config) = tokio::sync::watch::channel((acceptor, app));
/// let limits = Limits { max_connections: 1_000, header_read_timeout: Duration::from_secs(5), ..Limits::default() };
/// serve_with_limits(listener, config, limits, std::future::pending()).await;
/// # }
/// ```
pub async fn serve_with_limits<S, B>(
    listener: TcpListener,
    config: tokio::sync::watch::Receiver<(MeshAcceptor, S)>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut shed = 0u64;
    let builder = connection_builder(&limits);
    let graceful = GracefulShutdown::new();
    let local = listener.local_addr().ok();
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // At the limit: shed the newcomer rather than fall over.
            shed += 1;
            if shed.is_power_of_two() {
                tracing::warn!(
                    "connection from {remote} refused: {} connections open (max_connections); {shed} refused so far",
                    limits.max_connections
                );
            }
            drop(tcp);
            continue;
        };
        let (acceptor, service) = config.borrow().clone();
        let watcher = graceful.watcher();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let (stream, peer) = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!("{e}");
                    return;
                }
            };
            let hyper_svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(peer.clone());
                req.extensions_mut().insert(RemoteAddr(remote));
                if let Some(l) = local {
                    req.extensions_mut().insert(LocalAddr(l));
                }
                #[cfg(feature = "axum")]
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(remote));
                answer(service.clone(), req)
            });
            let conn = builder.serve_connection(TokioIo::new(stream), hyper_svc);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The HTTP/1.1 and HTTP/2 connection settings of `limits`.
fn connection_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_concurrent_streams);
    builder
}

/// Calls the inbound service; a failure of the service itself (not an error response)
/// becomes a 500, logged.
async fn answer<S, B>(
    svc: S,
    req: Request<Incoming>,
) -> Result<Response<crate::body::MeshBody>, Infallible>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    match svc.oneshot(req).await {
        Ok(resp) => Ok(resp.map(|b| {
            http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(
                b,
                Into::<BoxError>::into,
            ))
        })),
        Err(e) => {
            let e: BoxError = e.into();
            tracing::warn!("inbound service failed: {e}");
            let mut r = Response::new(http_body_util::BodyExt::boxed_unsync(
                http_body_util::BodyExt::map_err(
                    http_body_util::Empty::<bytes::Bytes>::new(),
                    |never: Infallible| -> BoxError { match never {} },
                ),
            ));
            *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            Ok(r)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::Layer;

    /// The inbound stack answers its application's errors: a mesh error with its own status,
    /// any other with 500; the stack's error type is `Infallible`.
    #[tokio::test]
    async fn errors_are_answered_as_responses() {
        let app = tower::service_fn(|req: Request<String>| async move {
            match req.uri().path() {
                "/mesh" => {
                    Err::<Response<String>, BoxError>(Box::new(crate::MeshError::NoRouteConfig {
                        listener: "backend".into(),
                    }))
                }
                "/other" => Err("boom".into()),
                _ => Ok(Response::new("ok".to_owned())),
            }
        });
        let inbound = InboundLayer::new("svc").layer(app);
        for (path, status) in [("/mesh", 503), ("/other", 500), ("/", 200)] {
            let resp: Result<_, Infallible> = inbound
                .clone()
                .oneshot(Request::get(path).body(String::new()).unwrap())
                .await;
            let Ok(resp) = resp;
            assert_eq!(resp.status(), status, "{path}");
        }
    }
}
