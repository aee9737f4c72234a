use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tower::Service;

use super::balance::{ByConfig, PickEndpoint};
use super::{ClusterRegistry, ClusterRuntime, EndpointRuntime, Outcome, RequestGuard};
use crate::body::{grpc, End, Observed, OnEnd};
use crate::error::{BoxError, MeshError};
use crate::route::RouteDecision;

pub use crate::body::MeshBody;

/// The terminal service: breaker, endpoint choice and the pooled upstream request.
#[derive(Clone, Debug)]
pub struct ClusterService<P = ByConfig> {
    registry: Arc<ClusterRegistry>,
    picker: P,
}

impl ClusterService {
    /// Sends requests to the clusters of `registry`, choosing endpoints by each cluster's
    /// configured policy.
    pub fn new(registry: Arc<ClusterRegistry>) -> Self {
        Self {
            registry,
            picker: ByConfig::default(),
        }
    }
}

impl<P> ClusterService<P> {
    /// Chooses endpoints with `picker` instead.
    pub fn with_picker<Q: PickEndpoint>(self, picker: Q) -> ClusterService<Q> {
        ClusterService {
            registry: self.registry,
            picker,
        }
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<ClusterRegistry> {
        &self.registry
    }
}

pin_project! {
    /// The upstream request; holds the breaker permit and the endpoint's in-flight count
    /// until the response headers arrive.
    pub struct ResponseFuture {
        #[pin]
        state: State,
    }
}

/// The body of a cluster's responses: a gRPC response is judged by its trailers.
pub type ClusterBody = Observed<Incoming, Option<GrpcEnd>>;

/// Records a gRPC response's status for outlier detection when its body ends.
#[derive(Debug)]
pub struct GrpcEnd {
    runtime: Arc<ClusterRuntime>,
    ep: Arc<EndpointRuntime>,
}

impl OnEnd for GrpcEnd {
    fn on_end(self, end: End<'_>) {
        let outcome = match end {
            End::Complete(_) => Outcome::Status(grpc_as_http(grpc::status_at_end(&end))),
            End::Failed(_) => Outcome::LocalFailure,
            // The caller stopped reading: nothing to say about the endpoint.
            End::Dropped => return,
        };
        self.runtime
            .record(&self.ep, outcome, tokio::time::Instant::now());
    }
}

/// The HTTP status Envoy maps a gRPC status to (for outlier detection).
fn grpc_as_http(code: u32) -> u16 {
    match code {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        _ => 500,
    }
}

/// Counts an attempt abandoned after the route's per-try timeout against its endpoint: a
/// hung endpoint never answers, so without this outlier detection would never see it fail.
struct Overdue {
    runtime: Arc<ClusterRuntime>,
    ep: Arc<EndpointRuntime>,
    deadline: tokio::time::Instant,
    /// Cleared when the attempt is answered: the answer is judged, not the clock.
    armed: bool,
}

impl Drop for Overdue {
    fn drop(&mut self) {
        let now = tokio::time::Instant::now();
        if self.armed && now >= self.deadline {
            self.runtime.record(&self.ep, Outcome::LocalFailure, now);
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Sending {
            #[pin] fut: hyper_util::client::legacy::ResponseFuture,
            guard: Option<RequestGuard>,
            cluster: Arc<str>,
            runtime: Arc<ClusterRuntime>,
            ep: Arc<EndpointRuntime>,
            started: tokio::time::Instant,
            overdue: Option<Overdue>,
        },
        Failed { error: Option<MeshError> },
    }
}

impl ResponseFuture {
    fn failed(error: MeshError) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
        }
    }
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cluster::ResponseFuture")
    }
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<ClusterBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Sending {
                fut,
                guard,
                cluster,
                runtime,
                ep,
                started,
                overdue,
            } => {
                let out = futures::ready!(fut.poll(cx));
                drop(guard.take());
                if let Some(o) = overdue.as_mut() {
                    o.armed = false;
                }
                if out.is_ok() {
                    ep.stats.observe_latency(started.elapsed());
                }
                let endpoint = &ep.address;
                if let Err(e) = &out {
                    // A connection refused by max_connections / max_pending_requests is the breaker, not
                    // the endpoint.
                    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
                    while let Some(err) = source {
                        if let Some(limit) =
                            err.downcast_ref::<crate::tls::ConnectionLimitReached>()
                        {
                            runtime.count_overflow();
                            return Poll::Ready(Err(MeshError::Overloaded {
                                cluster: cluster.to_string(),
                                limit: limit.limit,
                                max: limit.max,
                            }
                            .into()));
                        }
                        source = err.source();
                    }
                }
                // gRPC answers carry their status in the trailers (or, trailers-only, in the
                // head); outlier detection judges them by it, as Envoy does.
                let mut deferred = None;
                let now = tokio::time::Instant::now();
                match &out {
                    Ok(resp) => match grpc::status(resp.headers()) {
                        Some(code) => {
                            runtime.record(ep, Outcome::Status(grpc_as_http(code)), now);
                        }
                        None if grpc::is_grpc(resp.headers()) => {
                            deferred = Some(GrpcEnd {
                                runtime: runtime.clone(),
                                ep: ep.clone(),
                            });
                        }
                        None => {
                            runtime.record(ep, Outcome::Status(resp.status().as_u16()), now);
                        }
                    },
                    Err(_) => {
                        runtime.record(ep, Outcome::LocalFailure, now);
                    }
                }
                Poll::Ready(
                    out.map(|mut resp| {
                        resp.extensions_mut()
                            .insert(crate::ext::ServedBy(*endpoint));
                        resp.map(|b| Observed::new(b, deferred))
                    })
                    .map_err(|e| {
                        MeshError::Upstream {
                            cluster: cluster.to_string(),
                            endpoint: *endpoint,
                            connect: e.is_connect(),
                            source: Box::new(e),
                        }
                        .into()
                    }),
                )
            }
            StateProj::Failed { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion").into()))
            }
        }
    }
}

impl<P: PickEndpoint> Service<Request<MeshBody>> for ClusterService<P> {
    type Response = http::Response<ClusterBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Correctness: limits are enforced per request in `call` (fail fast, never queue),
        // so the service is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<MeshBody>) -> Self::Future {
        let fail = ResponseFuture::failed;
        let cluster = {
            let Some(decision) = req.extensions().get::<RouteDecision>() else {
                return fail(MeshError::MissingDecision);
            };
            match self.registry.get_routed(decision.cluster()) {
                Some(c) => c,
                None => {
                    return fail(MeshError::UnknownCluster {
                        cluster: decision.cluster().to_owned(),
                    })
                }
            }
        };
        let cluster = match self.registry.pick_aggregate(cluster) {
            Ok(c) => c,
            Err(e) => return fail(e),
        };
        let cluster_name = cluster.name();
        if let Some(reason) = cluster.tls_error() {
            return fail(MeshError::Tls {
                cluster: cluster_name.to_owned(),
                reason: reason.to_owned(),
            });
        }
        let mut guard = match cluster.try_acquire() {
            Ok(g) => g,
            Err(e) => return fail(e),
        };
        let now = tokio::time::Instant::now();
        let ext = req.extensions();
        let chosen = super::balance::balance(
            &cluster,
            &self.picker,
            ext.get::<crate::ext::RequestHash>(),
            ext.get::<crate::ext::Attempt>(),
            now,
        );
        let Some(endpoint) = chosen else {
            return fail(MeshError::NoHealthyEndpoint {
                cluster: cluster_name.to_owned(),
            });
        };
        let endpoint = &endpoint;
        guard.set_endpoint(endpoint.stats.clone());
        let address = endpoint.address;
        if let Err(e) = aim(&mut req, address) {
            return fail(MeshError::Upstream {
                cluster: cluster_name.to_owned(),
                endpoint: address,
                connect: true,
                source: Box::new(e),
            });
        }
        let overdue = req
            .extensions()
            .get::<crate::ext::Attempt>()
            .and_then(|a| a.per_try_timeout)
            .map(|t| Overdue {
                runtime: cluster.clone(),
                ep: endpoint.clone(),
                deadline: now + t,
                armed: true,
            });
        let cluster_name = cluster.shared_name();
        let fut = cluster.client().request(req);
        ResponseFuture {
            state: State::Sending {
                fut,
                guard: Some(guard),
                cluster: cluster_name,
                runtime: cluster.clone(),
                ep: endpoint.clone(),
                started: now,
                overdue,
            },
        }
    }
}

/// Points a request at an endpoint: the URI dials `address`, and the Host header keeps the
/// authority the application used.
fn aim(
    req: &mut Request<MeshBody>,
    address: std::net::SocketAddr,
) -> Result<(), http::uri::InvalidUri> {
    if !req.headers().contains_key(http::header::HOST) {
        if let Some(a) = req.uri().authority() {
            if let Ok(v) = http::HeaderValue::from_str(a.as_str()) {
                req.headers_mut().insert(http::header::HOST, v);
            }
        }
    }
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    *req.uri_mut() = format!("http://{address}{path}").parse()?;
    Ok(())
}
