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

    /// Unwraps.
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
        Inner { #[pin] fut: F },
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

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner { fut } => fut.poll(cx).map_err(Into::into),
            StateProj::Failed { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion").into()))
            }
        }
    }
}

impl<S, B> Service<Request<B>> for Route<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // One load per request; the decision keeps its route config alive.
        let snapshot = self.store.load();
        let Some(config) = snapshot.routes_for_listener(&self.listener) else {
            return ResponseFuture::failed(MeshError::NoRouteConfig {
                listener: self.listener.to_string(),
            });
        };
        match decide(config, &self.listener, &mut req, fastrand::u64(..)) {
            Ok(decision) => {
                tracing::debug!(
                    route = decision.route_name(),
                    cluster = decision.cluster(),
                    "routed"
                );
                req.extensions_mut().insert(decision);
                ResponseFuture {
                    state: State::Inner {
                        fut: self.inner.call(req),
                    },
                }
            }
            Err(error) => ResponseFuture::failed(error),
        }
    }
}
