use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use mesh_core::ConfigStore;
use pin_project_lite::pin_project;
use tower::Service;

use super::decide;
use crate::error::{BoxError, MeshError};

/// Routes each request and records the [`RouteDecision`](super::RouteDecision) in its
/// extensions.
#[derive(Clone, Debug)]
pub struct Route<S> {
    inner: S,
    store: ConfigStore,
    listener: Arc<str>,
}

impl<S> Route<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, store: ConfigStore, listener: Arc<str>) -> Self {
        Self {
            inner,
            store,
            listener,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, with this layer taken off.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

pin_project! {
    /// The future of [`Route`]: the inner call, or the routing error.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        Inner { #[pin] fut: F, decision: Option<super::RouteDecision> },
        Failed { error: Option<MeshError> },
    }
}

impl<F> ResponseFuture<F> {
    fn failed(error: MeshError) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<http::Response<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner { fut, decision } => {
                let mut resp = futures::ready!(fut.poll(cx)).map_err(Into::into)?;
                if let Some(d) = decision.take() {
                    resp.extensions_mut().insert(d);
                }
                Poll::Ready(Ok(resp))
            }
            StateProj::Failed { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion").into()))
            }
        }
    }
}

impl<S, B, ResB> Service<Request<B>> for Route<S>
where
    S: Service<Request<B>, Response = http::Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // One load per request (or the snapshot the readiness layer found complete); the
        // decision keeps its route config alive.
        let snapshot = req
            .extensions_mut()
            .remove::<std::sync::Arc<mesh_core::config::Snapshot>>()
            .unwrap_or_else(|| self.store.load());
        let hcm = snapshot.listener(&self.listener).and_then(|l| l.api());
        let Some((hcm, config)) = hcm.and_then(|h| Some((h, snapshot.routes_for(h)?))) else {
            return ResponseFuture::failed(MeshError::NoRouteConfig {
                listener: self.listener.to_string(),
            });
        };
        // What routing sees is the path after the listener's normalization.
        if let Err(answer) = hcm.request.apply(&mut req) {
            return ResponseFuture::failed(MeshError::from_policy(answer, &req));
        }
        match decide(config, &self.listener, &mut req, fastrand::u64(..)) {
            // A cluster named by a request header must exist: the name is the caller's
            // input, and must not reach labels or pools unchecked.
            Ok(decision)
                if decision.cluster_from_header()
                    && snapshot.cluster(decision.cluster()).is_none() =>
            {
                ResponseFuture::failed(MeshError::UnknownCluster {
                    cluster: decision.cluster().to_owned(),
                })
            }
            Ok(decision) => {
                tracing::debug!(
                    route = decision.route_name(),
                    cluster = decision.cluster(),
                    "routed"
                );
                if let Some(h) = request_hash(&decision.forward().hash_policy, &req) {
                    req.extensions_mut().insert(h);
                }
                req.extensions_mut().insert(decision.clone());
                ResponseFuture {
                    state: State::Inner {
                        fut: self.inner.call(req),
                        decision: Some(decision),
                    },
                }
            }
            Err(error) => ResponseFuture::failed(error),
        }
    }
}

/// The request's hash under the route's hash policies (Envoy's combination: rotate and xor),
/// or `None` when no policy produced one (the balancer then picks at random).
fn request_hash<B>(
    policies: &[mesh_core::config::HashPolicy],
    req: &Request<B>,
) -> Option<crate::ext::RequestHash> {
    use crate::ext::hash_bytes;
    use mesh_core::config::HashPolicyKind;
    let mut out: Option<u64> = None;
    for p in policies {
        let h = match &p.kind {
            HashPolicyKind::Header(name) => {
                req.headers().get(name).map(|v| hash_bytes(v.as_bytes()))
            }
            HashPolicyKind::Cookie(name) => req
                .headers()
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| hash_bytes(v.as_bytes())),
            HashPolicyKind::QueryParameter(name) => req.uri().query().and_then(|q| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| hash_bytes(v.as_bytes()))
            }),
            // A client has no remote source address to hash.
            HashPolicyKind::SourceIp => None,
        };
        if let Some(h) = h {
            out = Some(out.map_or(h, |prev| prev.rotate_left(1) ^ h));
            if p.terminal {
                break;
            }
        }
    }
    out.map(crate::ext::RequestHash)
}
