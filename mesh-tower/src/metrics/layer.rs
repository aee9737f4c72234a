use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::series::{Direction, Metrics, Outcome, Series};
use crate::body::{grpc, End, Observed, OnEnd};
use crate::error::{BoxError, MeshError};
use crate::route::RouteDecision;

/// Records golden signals for each request (see the [module](super)).
#[derive(Clone, Debug)]
pub struct MetricsLayer {
    metrics: Metrics,
    direction: Direction,
    service: Arc<str>,
    access_log: Option<AccessLog>,
    cache: Arc<SeriesCache>,
}

/// The series this layer used last, by the key it was found for, so that recording does not
/// look labels up in the metrics' maps (hashing and comparing every label) on each request.
/// Direct-mapped: a miss only costs the lookup it saves. A route key holds its route
/// configuration, so the address it is known by cannot be reused while the slot names it.
#[derive(Debug, Default)]
struct SeriesCache {
    slots: [arc_swap::ArcSwapOption<Slot>; 8],
}

#[derive(Debug)]
struct Slot {
    key: Key,
    series: Arc<Series>,
}

#[derive(Debug)]
enum Key {
    Route {
        config: Arc<mesh_core::config::RouteConfig>,
        vh: usize,
        route: usize,
        target: usize,
    },
    Peer(Box<str>),
}

impl SeriesCache {
    fn get(
        &self,
        index: usize,
        hit: impl Fn(&Key) -> bool,
        key: impl FnOnce() -> Key,
        lookup: impl FnOnce() -> Arc<Series>,
    ) -> Arc<Series> {
        let slot = &self.slots[index % self.slots.len()];
        if let Some(s) = &*slot.load() {
            if hit(&s.key) {
                return s.series.clone();
            }
        }
        let series = lookup();
        slot.store(Some(Arc::new(Slot {
            key: key(),
            series: series.clone(),
        })));
        series
    }

    fn route(&self, d: &RouteDecision, lookup: impl FnOnce() -> Arc<Series>) -> Arc<Series> {
        let Some((config, vh, route, target)) = d.cache_key() else {
            return lookup();
        };
        let ptr = Arc::as_ptr(config) as usize;
        let index = (ptr >> 6) ^ vh.wrapping_mul(31) ^ route.wrapping_mul(17) ^ target;
        self.get(
            index,
            |k| {
                matches!(k, Key::Route { config: c, vh: v, route: r, target: t }
                    if Arc::as_ptr(c) as usize == ptr && *v == vh && *r == route && *t == target)
            },
            || Key::Route {
                config: config.clone(),
                vh,
                route,
                target,
            },
            lookup,
        )
    }

    fn peer(&self, peer: &str, lookup: impl FnOnce() -> Arc<Series>) -> Arc<Series> {
        let index = {
            use std::hash::{Hash, Hasher};
            let mut h = rustc_hash::FxHasher::default();
            peer.hash(&mut h);
            (h.finish() >> 32) as usize
        };
        self.get(
            index,
            |k| matches!(k, Key::Peer(p) if &**p == peer),
            || Key::Peer(peer.into()),
            lookup,
        )
    }
}

/// Access logging: one structured `tracing` event per request (target `mesh::access`, level
/// INFO; a JSON subscriber makes JSON lines). Off unless configured.
#[derive(Clone, Copy, Debug)]
pub struct AccessLog {
    /// Fraction of requests logged (0.0..=1.0).
    pub sample: f64,
    /// Log only failed requests (5xx, gRPC server errors, local errors).
    pub errors_only: bool,
}

impl MetricsLayer {
    /// Records into `metrics`. Outbound requests are labelled by their route decision;
    /// inbound ones by [`MetricsLayer::service`].
    pub fn new(metrics: Metrics, direction: Direction) -> Self {
        Self {
            metrics,
            direction,
            service: Arc::from(""),
            access_log: None,
            cache: Arc::default(),
        }
    }

    /// Logs requests (see [`AccessLog`]).
    pub fn access_log(mut self, config: AccessLog) -> Self {
        self.access_log = Some(config);
        self
    }

    /// The cluster label of inbound requests (the service's own name).
    pub fn service(mut self, name: &str) -> Self {
        self.service = Arc::from(name);
        // Inbound series are keyed by peer alone: a layer for another service has its own.
        self.cache = Arc::default();
        self
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> MetricsService<S> {
        MetricsService {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`MetricsLayer`].
#[derive(Clone, Debug)]
pub struct MetricsService<S> {
    inner: S,
    layer: MetricsLayer,
}

impl<S> MetricsService<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, with this layer taken off.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Decrements the in-flight gauge when the request is done (or dropped).
#[derive(Debug)]
struct InFlight(Arc<Series>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What an access log line needs from the request, captured only when it will be logged.
#[derive(Debug)]
struct LogEntry {
    direction: Direction,
    method: http::Method,
    authority: String,
    path: String,
    route: String,
    cluster: String,
    peer: Option<String>,
    trace_id: Option<String>,
    endpoint: Option<std::net::SocketAddr>,
    errors_only: bool,
}

/// A request not yet recorded: recorded once its outcome is known (at the response head, or
/// for a gRPC response without a status in its head, at the end of its body). Dropped
/// before that, the caller gave up: CANCELLED for gRPC, 499 for HTTP.
#[derive(Debug)]
pub struct Pending {
    in_flight: Option<InFlight>,
    start: Instant,
    log: Option<Box<LogEntry>>,
    grpc: bool,
    istio: Option<Box<super::istio::Call>>,
}

impl Pending {
    fn finish(&mut self, outcome: Outcome, error: Option<&dyn std::fmt::Display>) {
        let Some(in_flight) = self.in_flight.take() else {
            return;
        };
        let elapsed = self.start.elapsed();
        in_flight.0.record(outcome, elapsed);
        drop(in_flight);
        if let Some(call) = self.istio.take() {
            let (code, grpc) = match outcome {
                Outcome::Http(s) => (Some(s), None),
                Outcome::Grpc(c) => (Some(200), Some(c)),
                Outcome::Error => (None, None),
            };
            call.finish(code, grpc, elapsed.as_secs_f64() * 1000.0);
        }
        let Some(e) = self.log.take() else { return };
        if e.errors_only && outcome.is_success() {
            return;
        }
        let (status, grpc_status) = match outcome {
            Outcome::Http(s) => (Some(s), None),
            Outcome::Grpc(c) => (Some(200), Some(c)),
            Outcome::Error => (None, None),
        };
        tracing::info!(
            target: "mesh::access",
            direction = e.direction.as_str(),
            method = %e.method,
            authority = %e.authority,
            path = %e.path,
            status,
            grpc_status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            route = %e.route,
            cluster = %e.cluster,
            endpoint = e.endpoint.map(tracing::field::display),
            peer = e.peer.as_deref(),
            trace_id = e.trace_id.as_deref(),
            error = error.map(tracing::field::display),
            "access"
        );
    }

    /// The outcome of a request that failed locally: for gRPC, the status the caller gets.
    fn failed(&self, e: &BoxError) -> Outcome {
        if !self.grpc {
            return Outcome::Error;
        }
        Outcome::Grpc(match e.downcast_ref::<MeshError>() {
            Some(MeshError::Timeout { .. }) | Some(MeshError::PerTryTimeout { .. }) => 4,
            Some(MeshError::NoRoute { .. }) => 12,
            _ => 14,
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.in_flight.is_some() {
            if let Some(call) = self.istio.as_mut() {
                call.cancelled();
            }
            let outcome = if self.grpc {
                Outcome::Grpc(1)
            } else {
                Outcome::Http(499)
            };
            self.finish(outcome, Some(&"cancelled by the caller"));
        }
    }
}

impl OnEnd for Pending {
    fn on_end(mut self, end: End<'_>) {
        let code = grpc::status_at_end(&end);
        match end {
            End::Failed(e) => self.finish(Outcome::Grpc(code), Some(e)),
            _ => self.finish(Outcome::Grpc(code), None),
        }
    }
}

pin_project! {
    /// The future of [`MetricsService`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        fut: F,
        pending: Option<Pending>,
        metrics: Metrics,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: http_body::Body,
{
    type Output = Result<Response<Observed<B, Option<Pending>>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = futures::ready!(this.fut.poll(cx)).map_err(Into::into);
        // Correctness: taken only here, when the future completes.
        let mut pending = this.pending.take().expect("polled after completion");
        match out {
            Ok(mut resp) => {
                if let Some(call) = pending.istio.as_mut() {
                    call.respond(&mut resp);
                }
                if let Some(log) = pending.log.as_mut() {
                    log.endpoint = resp.extensions().get::<crate::ext::ServedBy>().map(|s| s.0);
                }
                let head = match grpc::status(resp.headers()) {
                    // A trailers-only gRPC response carries its status in the headers.
                    Some(code) => Some(Outcome::Grpc(code)),
                    // Other gRPC responses carry it in the trailers.
                    None if grpc::is_grpc(resp.headers()) => None,
                    None => Some(Outcome::Http(resp.status().as_u16())),
                };
                let deferred = match head {
                    Some(outcome) => {
                        pending.finish(outcome, None);
                        None
                    }
                    None => Some(pending),
                };
                Poll::Ready(Ok(resp.map(|b| Observed::new(b, deferred))))
            }
            Err(e) => {
                if matches!(
                    e.downcast_ref::<MeshError>(),
                    Some(MeshError::Overloaded { .. })
                ) {
                    this.metrics
                        .counters()
                        .overflows
                        .fetch_add(1, Ordering::Relaxed);
                }
                if let Some(call) = pending.istio.as_mut() {
                    call.local_reply(&e);
                }
                let outcome = pending.failed(&e);
                pending.finish(outcome, Some(&e));
                Poll::Ready(Err(e))
            }
        }
    }
}

impl<S, B, ResB> Service<Request<B>> for MetricsService<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    B: http_body::Body,
    ResB: http_body::Body,
{
    type Response = Response<Observed<ResB, Option<Pending>>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let is_grpc = grpc::is_grpc(req.headers());
        let (metrics, direction) = (&self.layer.metrics, self.layer.direction);
        let series = match req.extensions().get::<RouteDecision>() {
            Some(d) => self
                .layer
                .cache
                .route(d, || metrics.series(direction, d.route_name(), d.cluster())),
            None => {
                let peer = req
                    .extensions()
                    .get::<crate::ext::PeerIdentity>()
                    .and_then(|p| p.0.as_ref())
                    .map_or("", |id| id.as_str());
                let service = &self.layer.service;
                self.layer.cache.peer(peer, || {
                    metrics.series_with_peer(direction, "", service, peer)
                })
            }
        };
        series.in_flight.fetch_add(1, Ordering::Relaxed);
        let log = self
            .layer
            .access_log
            .filter(|a| a.sample >= 1.0 || fastrand::f64() < a.sample)
            .map(|a| {
                let decision = req.extensions().get::<RouteDecision>();
                Box::new(LogEntry {
                    direction: self.layer.direction,
                    method: req.method().clone(),
                    authority: req
                        .uri()
                        .authority()
                        .map(|a| a.to_string())
                        .or_else(|| {
                            req.headers()
                                .get(http::header::HOST)
                                .and_then(|h| h.to_str().ok())
                                .map(str::to_owned)
                        })
                        .unwrap_or_default(),
                    path: req.uri().path().to_owned(),
                    route: decision
                        .map(|d| d.route_name().to_owned())
                        .unwrap_or_default(),
                    cluster: decision.map_or_else(
                        || self.layer.service.to_string(),
                        |d| d.cluster().to_owned(),
                    ),
                    peer: req
                        .extensions()
                        .get::<crate::ext::PeerIdentity>()
                        .and_then(|p| p.0.as_ref())
                        .map(|p| p.to_string()),
                    trace_id: crate::trace::trace_id(&req).map(|t| t.to_string()),
                    endpoint: None,
                    errors_only: a.errors_only,
                })
            });
        let istio = self.layer.metrics.istio_state().map(|istio| {
            let outbound = direction == Direction::Outbound;
            let cluster = match req.extensions().get::<RouteDecision>() {
                Some(d) => d.cluster().to_owned(),
                None => self.layer.service.to_string(),
            };
            Box::new(super::istio::Call::start(
                istio, outbound, &mut req, &cluster,
            ))
        });
        ResponseFuture {
            fut: self.inner.call(req),
            pending: Some(Pending {
                in_flight: Some(InFlight(series)),
                start: Instant::now(),
                log,
                grpc: is_grpc,
                istio,
            }),
            metrics: self.layer.metrics.clone(),
        }
    }
}
