//! [`MeshClient`]: the assembled outbound stack.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use mesh_core::xds::Target;
use mesh_core::{ConfigStore, XdsError};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::MeshBody;
use crate::cluster::{ClusterRegistry, ClusterService};
use crate::error::{BoxError, MeshError};
use crate::fault::{Fault, FaultLayer};
use crate::metrics::{Direction, Metrics, MetricsLayer, MetricsService};
use crate::mirror::{Mirror, MirrorLayer};
use crate::ready::{ConfigReady, ConfigReadyLayer};
use crate::retry::{Retry, RetryLayer};
use crate::route::{Route, RouteLayer};
use crate::timeout::{Timeout, TimeoutLayer};
use crate::trace::{Trace, TraceLayer};

/// The outbound stack for one target: trace, route, metrics, fault, timeout, retry, then
/// cluster (breaker, balance, endpoint pools). Put it where a hyper client would be; it is cheap to clone.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// use std::time::Duration;
/// use mesh_core::xds::{Bootstrap, XdsClient};
/// use mesh_tower::MeshClient;
/// use tower::Service;
///
/// let xds = XdsClient::builder(Bootstrap::from_env()?).build()?;
/// xds.listener("xds:///frontend.prod.svc.cluster.local:80", Duration::from_secs(10)).await?;
/// let mut client = MeshClient::builder(xds.store().clone(), "xds:///frontend.prod.svc.cluster.local:80")?
///     .build();
/// let req = http::Request::get("http://frontend.prod.svc.cluster.local/api")
///     .body(http_body_util::Empty::<bytes::Bytes>::new())?;
/// let resp = client.ready().await?.call(req).await?;
/// println!("{}", resp.status());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct MeshClient {
    inner: Trace<Answer<ConfigReady<Route<Measured>>>>,
    metrics: Metrics,
    registry: Arc<ClusterRegistry>,
}

type Measured = MetricsService<Fault<Timeout<Mirror<Retry<ClusterService>>>>>;

/// Configures a [`MeshClient`].
#[derive(Debug)]
pub struct MeshClientBuilder {
    store: ConfigStore,
    listener: String,
    registry: Option<Arc<ClusterRegistry>>,
    peak_ewma: bool,
    identity: Option<mesh_core::identity::IdentityStore>,
    metrics: Option<Metrics>,
    access_log: Option<crate::metrics::AccessLog>,
    trace: Option<TraceLayer>,
    wait_for_config: std::time::Duration,
}

impl MeshClientBuilder {
    /// Logs each request as a structured event (off by default; see
    /// [`AccessLog`](crate::metrics::AccessLog)).
    pub fn access_log(mut self, config: crate::metrics::AccessLog) -> Self {
        self.access_log = Some(config);
        self
    }

    /// Client spans and trace propagation (default: [`TraceLayer::client`], spans from the
    /// global tracer provider, W3C headers written, W3C and B3 read).
    pub fn trace(mut self, layer: TraceLayer) -> Self {
        self.trace = Some(layer);
        self
    }

    /// The workload identity presented to TLS clusters (mTLS). Without it, clusters that
    /// require TLS refuse requests with [`MeshError::Tls`]; there is no plaintext fallback.
    pub fn identity(mut self, identity: mesh_core::identity::IdentityStore) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Records into `metrics` (shared with other clients and the admin endpoint).
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// How long a request waits for configuration that is on its way (its listener, routes,
    /// the clusters they name and their endpoints) before it is sent anyway; default 10 s,
    /// zero never waits. A request's `grpc-timeout` bounds the wait too. See [`crate::ready`].
    pub fn wait_for_config(mut self, wait: std::time::Duration) -> Self {
        self.wait_for_config = wait;
        self
    }

    /// LEAST_REQUEST clusters weigh outstanding requests by each endpoint's latency EWMA.
    pub fn peak_ewma(mut self, on: bool) -> Self {
        self.peak_ewma = on;
        self
    }

    /// Shares a cluster registry (pools, breakers) with other clients of the same store.
    pub fn registry(mut self, registry: Arc<ClusterRegistry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Builds the client.
    ///
    /// # Panics
    /// Outside a tokio runtime (the registry's sync task is spawned).
    pub fn build(self) -> MeshClient {
        let listener = self.listener;
        let metrics = self.metrics.unwrap_or_default();
        metrics.observe_xds(&self.store);
        if let Some(id) = &self.identity {
            metrics.observe_identity(id);
        }
        let registry = self.registry.unwrap_or_else(|| {
            ClusterRegistry::build(
                self.store.clone(),
                self.identity.clone(),
                Some(metrics.clone()),
            )
        });
        let cluster =
            ClusterService::new(registry.clone()).with_picker(crate::cluster::balance::ByConfig {
                peak_ewma: self.peak_ewma,
            });
        let retry = RetryLayer::new(registry.clone())
            .metrics(metrics.clone())
            .layer(cluster);
        let mirror = MirrorLayer::new().layer(retry);
        let timeout = TimeoutLayer::new().layer(mirror);
        let fault = FaultLayer::new().metrics(metrics.clone()).layer(timeout);
        let mut measure = MetricsLayer::new(metrics.clone(), Direction::Outbound);
        if let Some(a) = self.access_log {
            measure = measure.access_log(a);
        }
        let measured = measure.layer(fault);
        let routed = RouteLayer::new(self.store.clone(), listener.clone()).layer(measured);
        let routed = ConfigReadyLayer::new(self.store, listener)
            .max_wait(self.wait_for_config)
            .metrics(metrics.clone())
            .layer(routed);
        let inner = self
            .trace
            .unwrap_or_else(TraceLayer::client)
            .layer(Answer { inner: routed });
        MeshClient {
            inner,
            metrics,
            registry,
        }
    }
}

impl MeshClient {
    /// A builder for a client of `target` (`xds:///name` or a listener name) configured by
    /// `xds`: subscribes to the target's listener (and so to everything it references), so
    /// the first calls wait for their configuration by themselves (up to
    /// [`wait_for_config`](MeshClientBuilder::wait_for_config)); no `xds.ready(..)` needed.
    ///
    /// # Errors
    /// An invalid target, or a stopped xDS client.
    pub fn from_xds(
        xds: &mesh_core::xds::XdsClient,
        target: &str,
    ) -> Result<MeshClientBuilder, XdsError> {
        let name = xds.watch(target)?;
        let mut builder = Self::builder(xds.store().clone(), target)?;
        // The resource name, with the bootstrap's listener name template applied.
        builder.listener = name;
        Ok(builder)
    }

    /// A builder for a client of `target` (`xds:///name` or a listener name), reading
    /// configuration from `store`. Something must subscribe to the target's listener
    /// (`XdsClient::watch`, `listener` or `ready`); [`MeshClient::from_xds`] does.
    ///
    /// # Errors
    /// An invalid target.
    pub fn builder(store: ConfigStore, target: &str) -> Result<MeshClientBuilder, XdsError> {
        Ok(MeshClientBuilder {
            store,
            listener: Target::parse(target)?.name().to_owned(),
            registry: None,
            peak_ewma: false,
            identity: None,
            metrics: None,
            access_log: None,
            trace: None,
            wait_for_config: crate::ready::DEFAULT_MAX_WAIT,
        })
    }

    /// The golden-signal metrics of this client (serve them with [`crate::admin`]).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The cluster registry (for inspection: per-cluster counters, endpoints).
    pub fn registry(&self) -> &Arc<ClusterRegistry> {
        &self.registry
    }
}

/// The response body of a [`MeshClient`].
pub type ResponseBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Turns the errors that are answers (a route's direct response, an injected abort) into
/// responses, below the trace layer so that spans see them as responses.
#[derive(Clone, Debug)]
struct Answer<S> {
    inner: S,
}

type Answered<B> = http_body_util::Either<B, http_body_util::Full<Bytes>>;

impl<S, B, ResB> Service<Request<B>> for Answer<S>
where
    S: Service<Request<B>, Response = Response<ResB>, Error = BoxError>,
{
    type Response = Response<Answered<ResB>>;
    type Error = BoxError;
    type Future = AnswerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        AnswerFuture {
            inner: self.inner.call(req),
            held: None,
            waited: false,
        }
    }
}

pin_project! {
    /// The future of [`Answer`].
    #[derive(Debug)]
    pub struct AnswerFuture<F> {
        #[pin]
        inner: F,
        // A refusal held back while the task yields once.
        held: Option<BoxError>,
        // The inner future was pending at least once.
        waited: bool,
    }
}

impl<F, B> Future for AnswerFuture<F>
where
    F: Future<Output = Result<Response<B>, BoxError>>,
{
    type Output = Result<Response<Answered<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        use http_body_util::{Either, Full};
        // Fairness: a call that completes takes a unit of tokio's cooperative budget, as any
        // tokio resource does (a poll that stays pending costs nothing), and an answer the
        // mesh gives at once yields first; callers looping on refusals (breaker overflow, no
        // endpoint, aborts, direct responses) cannot starve the requests that were admitted.
        let this = self.project();
        let result = match this.held.take() {
            Some(e) => Err(e),
            None => {
                let coop = futures::ready!(tokio::task::coop::poll_proceed(cx));
                let Poll::Ready(result) = this.inner.poll(cx) else {
                    *this.waited = true;
                    return Poll::Pending;
                };
                coop.made_progress();
                match result {
                    // Answered at once without any I/O (a refusal, an abort, a direct
                    // response): yield once, so a caller looping on them lets the tasks of
                    // admitted requests run between two of its calls.
                    Err(e) if !*this.waited => {
                        *this.held = Some(e);
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    other => other,
                }
            }
        };
        match result {
            Ok(resp) => Poll::Ready(Ok(resp.map(Either::Left))),
            Err(e) => match e.downcast::<MeshError>() {
                // Routes that answer themselves answer here.
                Ok(me) => match *me {
                    MeshError::DirectResponse {
                        status,
                        body,
                        headers,
                        ..
                    } => {
                        let mut resp = Response::new(Either::Right(Full::new(body)));
                        *resp.status_mut() =
                            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
                        *resp.headers_mut() = *headers;
                        Poll::Ready(Ok(resp))
                    }
                    MeshError::FaultAbort { status, grpc } => {
                        let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
                        *resp.status_mut() = http::StatusCode::from_u16(status)
                            .unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
                        if let Some(code) = grpc {
                            // A trailers-only gRPC response.
                            let h = resp.headers_mut();
                            h.insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("application/grpc"),
                            );
                            h.insert("grpc-status", http::HeaderValue::from(code));
                            h.insert(
                                "grpc-message",
                                http::HeaderValue::from_static("fault%20injected"),
                            );
                        }
                        Poll::Ready(Ok(resp))
                    }
                    other => Poll::Ready(Err(Box::new(other))),
                },
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

type Routed = crate::route::ResponseFuture<
    crate::metrics::ResponseFuture<
        crate::fault::ResponseFuture<
            Timeout<Mirror<Retry<ClusterService>>>,
            MeshBody,
            crate::timeout::ResponseFuture<
                crate::retry::ResponseFuture<ClusterService, crate::cluster::ResponseFuture>,
            >,
        >,
    >,
>;

type Inner = crate::ready::ResponseFuture<
    Routed,
    Response<crate::body::Observed<crate::cluster::ClusterBody, Option<crate::metrics::Pending>>>,
>;

pin_project! {
    /// The future of [`MeshClient`].
    #[derive(Debug)]
    pub struct ResponseFuture {
        #[pin]
        inner: crate::trace::ResponseFuture<AnswerFuture<Inner>>,
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<ResponseBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut resp = futures::ready!(self.project().inner.poll(cx))?;
        crate::sensitive::mark_sensitive(resp.headers_mut());
        Poll::Ready(Ok(resp.map(|b| b.map_err(Into::into).boxed_unsync())))
    }
}

impl MeshClient {
    /// Waits until the client can take a request (`tower::ServiceExt::ready` without naming
    /// the request body type: the client's readiness does not depend on it).
    ///
    /// # Errors
    /// The client has failed for good (never, today: its readiness is that of its routes).
    pub async fn ready(&mut self) -> Result<&mut Self, BoxError> {
        std::future::poll_fn(|cx| Service::<Request<MeshBody>>::poll_ready(&mut self.inner, cx))
            .await?;
        Ok(self)
    }
}

impl<B> Service<Request<B>> for MeshClient
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<Request<MeshBody>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // Credentials are marked sensitive before any layer sees them: never printed by a
        // header map's Debug, never entered in HTTP/2's header compression table.
        crate::sensitive::mark_sensitive(req.headers_mut());
        let req = req.map(|b| b.map_err(Into::into).boxed_unsync());
        ResponseFuture {
            inner: self.inner.call(req),
        }
    }
}
