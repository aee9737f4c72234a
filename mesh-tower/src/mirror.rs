//! Request mirroring by the route's `request_mirror_policies`: fire-and-forget copies of a
//! request to other clusters, at each policy's percentage, whose outcome never touches the
//! request itself. Sits above [`retry`](crate::retry): the copies go down the same stack
//! with a mirror [`RouteDecision`] (which retry passes straight through), and the primary
//! request goes on with the body's replay copy in its extensions
//! ([`crate::replay::Replaying`]), which retry reads instead of copying again.
//!
//! # Example
//!
//! ```no_run
//! use mesh_core::ConfigStore;
//! use mesh_tower::cluster::{ClusterRegistry, ClusterService};
//! use mesh_tower::mirror::MirrorLayer;
//! use mesh_tower::retry::RetryLayer;
//! use mesh_tower::route::RouteLayer;
//! use tower::ServiceBuilder;
//!
//! # async fn run() {
//! let store = ConfigStore::new();
//! let registry = ClusterRegistry::new(store.clone());
//! let client = ServiceBuilder::new()
//!     .layer(RouteLayer::new(store, "frontend:80"))
//!     .layer(MirrorLayer::new())
//!     .layer(RetryLayer::new(registry.clone()))
//!     .service(ClusterService::new(registry));
//! # drop(client); }
//! ```

use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tower::{Layer, Service};

use crate::body::MeshBody;
use crate::error::BoxError;
use crate::replay::{ReplayBody, Replaying};
use crate::route::RouteDecision;

/// Mirrors requests by their route's mirror policies (see the [module](self)).
#[derive(Clone, Debug)]
pub struct MirrorLayer {
    max_buffer: usize,
}

impl MirrorLayer {
    /// Mirrors bodies of up to 64 KiB (a larger body is sent once, without copies).
    pub fn new() -> Self {
        Self {
            max_buffer: 64 * 1024,
        }
    }

    /// The largest request body copied to mirrors (bodies that say up front they are larger
    /// are not mirrored; one that grows past it leaves the copies short, as Envoy's do).
    pub fn max_buffer(mut self, bytes: usize) -> Self {
        self.max_buffer = bytes;
        self
    }
}

impl Default for MirrorLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for MirrorLayer {
    type Service = Mirror<S>;

    fn layer(&self, inner: S) -> Mirror<S> {
        Mirror {
            inner,
            max_buffer: self.max_buffer,
        }
    }
}

/// The service of [`MirrorLayer`].
#[derive(Clone, Debug)]
pub struct Mirror<S> {
    inner: S,
    max_buffer: usize,
}

impl<S> Mirror<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, with this layer taken off.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ResB> Service<Request<MeshBody>> for Mirror<S>
where
    S: Service<Request<MeshBody>, Response = Response<ResB>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    ResB: Send + 'static,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<MeshBody>) -> S::Future {
        // The primary goes to the service made ready (its future owns what it needs); the
        // copies to clones, which `oneshot` makes ready themselves.
        let hits = match req.extensions().get::<RouteDecision>() {
            Some(d) if !d.is_mirror() => d
                .forward()
                .mirrors
                .iter()
                .enumerate()
                .filter(|(_, m)| m.fraction.hit(fastrand::u64(..)))
                .map(|(i, m)| (d.mirror(i), m.shadow_suffix))
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        if hits.is_empty() || req.body().size_hint().lower() > self.max_buffer as u64 {
            return self.inner.call(req);
        }
        let (mut parts, body) = req.into_parts();
        let body = match parts.extensions.get::<Replaying>() {
            Some(Replaying(r)) => r.clone(),
            None => ReplayBody::new(body, self.max_buffer),
        };
        for (decision, shadow_suffix) in hits {
            let mut copy = Request::from_parts(parts.clone(), body.clone().boxed_unsync());
            copy.extensions_mut().insert(decision);
            if shadow_suffix {
                shadow_host(&mut copy);
            }
            let sent = tower::ServiceExt::oneshot(self.inner.clone(), copy);
            // A combinator rather than an async block: auto-trait inference for async blocks
            // over `Box<dyn Error>` trips on lifetimes here.
            tokio::spawn(futures::FutureExt::map(sent, log_mirror::<ResB>));
        }
        parts.extensions.insert(Replaying(body.clone()));
        self.inner
            .call(Request::from_parts(parts, body.boxed_unsync()))
    }
}

/// Envoy's convention: the mirror sees the authority with a `-shadow` suffix (unless the
/// policy says `disable_shadow_host_suffix_append`).
fn shadow_host(req: &mut Request<MeshBody>) {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok());
    if let Some(v) = host.and_then(|h| http::HeaderValue::from_str(&format!("{h}-shadow")).ok()) {
        req.headers_mut().insert(http::header::HOST, v);
    }
}

fn log_mirror<T>(result: Result<Response<T>, BoxError>) {
    match result {
        Ok(resp) => tracing::debug!(status = %resp.status(), "mirror answered"),
        Err(e) => tracing::debug!("mirror request failed: {e}"),
    }
}
