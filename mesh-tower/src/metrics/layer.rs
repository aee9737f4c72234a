use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::{Direction, Metrics, Outcome, Series};
use crate::error::{BoxError, MeshError};
use crate::route::RouteDecision;

/// Records golden signals for each request (see the [module](super)).
#[derive(Clone, Debug)]
pub struct MetricsLayer {
    metrics: Metrics,
    direction: Direction,
    service: Arc<str>,
}

impl MetricsLayer {
    /// Records into `metrics`. Outbound requests are labelled by their route decision;
    /// inbound ones by [`MetricsLayer::service`].
    pub fn new(metrics: Metrics, direction: Direction) -> Self {
        Self {
            metrics,
            direction,
            service: Arc::from(""),
        }
    }

    /// The cluster label of inbound requests (the service's own name).
    pub fn service(mut self, name: &str) -> Self {
        self.service = Arc::from(name);
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

    /// Unwraps.
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

pin_project! {
    /// The future of [`MetricsService`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        fut: F,
        in_flight: Option<InFlight>,
        start: Instant,
        metrics: Metrics,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = futures::ready!(this.fut.poll(cx)).map_err(Into::into);
        let outcome = match &out {
            Ok(resp) => match resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
            {
                // A trailers-only gRPC response carries its status in the headers.
                Some(code) => Outcome::Grpc(code),
                None => Outcome::Http(resp.status().as_u16()),
            },
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
                Outcome::Error
            }
        };
        if let Some(g) = this.in_flight.take() {
            g.0.record(outcome, this.start.elapsed());
        }
        Poll::Ready(out)
    }
}

impl<S, B, ResB> Service<Request<B>> for MetricsService<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let series = match req.extensions().get::<RouteDecision>() {
            Some(d) => self
                .layer
                .metrics
                .series(self.layer.direction, d.route_name(), d.cluster()),
            None => self
                .layer
                .metrics
                .series(self.layer.direction, "", &self.layer.service),
        };
        series.in_flight.fetch_add(1, Ordering::Relaxed);
        ResponseFuture {
            fut: self.inner.call(req),
            in_flight: Some(InFlight(series)),
            start: Instant::now(),
            metrics: self.layer.metrics.clone(),
        }
    }
}
