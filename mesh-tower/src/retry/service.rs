use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use mesh_core::config::RetryPolicy;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::Service;

use super::{classify, ReplayBody};
use crate::body::MeshBody;
use crate::cluster::{ClusterRegistry, ClusterRuntime, RetryGuard};
use crate::error::{BoxError, MeshError};
use crate::ext::{Attempt, ServedBy};
use crate::route::RouteDecision;

/// Retries requests by their route's policy.
#[derive(Clone, Debug)]
pub struct Retry<S> {
    pub(super) inner: S,
    pub(super) registry: Arc<ClusterRegistry>,
    pub(super) max_buffer: usize,
    pub(super) metrics: Option<crate::metrics::Metrics>,
}

impl<S> Retry<S> {
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

struct Ctx<S> {
    svc: S,
    parts: http::request::Parts,
    /// The body every attempt reads a clone of (`None`: sent once, as it came).
    body: Option<ReplayBody>,
    /// Mirrors were sent, reading their own clones of `body`.
    mirrored: bool,
    policy: RetryPolicy,
    attempt: Attempt,
    cluster: Option<Arc<ClusterRuntime>>,
    retry_guard: Option<RetryGuard>,
    metrics: Option<crate::metrics::Metrics>,
}

pin_project! {
    /// The future of [`Retry`].
    pub struct ResponseFuture<S, F> {
        #[pin]
        state: State<F>,
        ctx: Option<Box<Ctx<S>>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Calling { #[pin] fut: F, deadline: Option<Pin<Box<Sleep>>> },
        Backoff { sleep: Pin<Box<Sleep>> },
        Readying,
        Done,
    }
}

impl<S, F> std::fmt::Debug for ResponseFuture<S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("retry::ResponseFuture")
    }
}

fn log_mirror<T>(result: Result<Response<T>, BoxError>) {
    match result {
        Ok(resp) => tracing::debug!(status = %resp.status(), "mirror answered"),
        Err(e) => tracing::debug!("mirror request failed: {e}"),
    }
}

fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
    // Full jitter: uniform in [0, min(max, base * 2^retry)].
    let cap = policy
        .backoff
        .base
        .saturating_mul(1u32.checked_shl(retry.min(16)).unwrap_or(u32::MAX))
        .min(policy.backoff.max);
    cap.mul_f64(fastrand::f64())
}

impl<S, ResB: Send + 'static> Ctx<S>
where
    S: Service<Request<MeshBody>, Response = Response<ResB>, Error = BoxError>,
{
    fn request(&mut self) -> Request<MeshBody> {
        let body = match &self.body {
            Some(b) => b.clone().boxed_unsync(),
            None => http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
        };
        let mut req = Request::from_parts(self.parts.clone(), body);
        req.extensions_mut().insert(self.attempt.clone());
        req
    }

    /// Sends fire-and-forget copies to the route's mirrors (at their percentages). A copy's
    /// outcome never touches the primary request.
    fn mirror(&mut self)
    where
        S: Clone + Send + 'static,
        S::Future: Send,
    {
        let Some(decision) = self.parts.extensions.get::<RouteDecision>().cloned() else {
            return;
        };
        if decision.is_mirror() {
            return;
        }
        for (i, m) in decision.forward().mirrors.iter().enumerate() {
            if !m.fraction.hit(fastrand::u64(..)) {
                continue;
            }
            let mut req = self.request();
            req.extensions_mut().insert(decision.mirror(i));
            req.extensions_mut().remove::<Attempt>();
            // Envoy's convention: the mirror sees the authority with a `-shadow` suffix,
            // unless the policy says `disable_shadow_host_suffix_append`.
            if let Some(host) = m
                .shadow_suffix
                .then(|| {
                    req.headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                })
                .flatten()
            {
                if let Ok(v) = http::HeaderValue::from_str(&format!("{host}-shadow")) {
                    req.headers_mut().insert(http::header::HOST, v);
                }
            }
            self.mirrored = true;
            let copy = tower::ServiceExt::oneshot(self.svc.clone(), req);
            // A combinator rather than an async block: auto-trait inference for async blocks
            // over `Box<dyn Error>` trips on lifetimes here.
            tokio::spawn(futures::FutureExt::map(copy, log_mirror::<ResB>));
        }
    }

    fn call(&mut self) -> (S::Future, Option<Pin<Box<Sleep>>>) {
        let req = self.request();
        let deadline = self
            .policy
            .per_try_timeout
            .map(|d| Box::pin(tokio::time::sleep(d)));
        (self.svc.call(req), deadline)
    }
}

impl<S, ResB: Send + 'static> Future for ResponseFuture<S, S::Future>
where
    S: Service<Request<MeshBody>, Response = Response<ResB>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Output = Result<Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let ctx = this.ctx.as_mut().expect("polled after completion");
            match this.state.as_mut().project() {
                StateProj::Calling { fut, deadline } => {
                    let result = match fut.poll(cx) {
                        Poll::Ready(r) => r,
                        Poll::Pending => match deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
                            Some(Poll::Ready(())) => Err(MeshError::PerTryTimeout {
                                cluster: ctx
                                    .cluster
                                    .as_ref()
                                    .map(|c| c.name().to_owned())
                                    .unwrap_or_default(),
                                after: ctx.policy.per_try_timeout.unwrap_or_default(),
                            }
                            .into()),
                            _ => return Poll::Pending,
                        },
                    };
                    ctx.retry_guard = None;
                    let served_by = match &result {
                        Ok(resp) => resp.extensions().get::<ServedBy>().map(|s| s.0),
                        Err(e) => match e.downcast_ref::<MeshError>() {
                            Some(MeshError::Upstream { endpoint, .. }) => Some(*endpoint),
                            _ => None,
                        },
                    };
                    if let Some(ep) = served_by {
                        ctx.attempt.tried.push(ep);
                    }
                    let reason = classify(&ctx.policy, &result);
                    // A retry needs the whole body so far: past the cap it is sent once.
                    let may_retry = reason.is_some()
                        && ctx.attempt.number < ctx.policy.num_retries
                        && ctx.body.as_ref().is_some_and(ReplayBody::is_replayable);
                    let guard = if may_retry {
                        ctx.cluster.as_ref().and_then(|c| c.try_acquire_retry())
                    } else {
                        None
                    };
                    match guard {
                        Some(g) => {
                            tracing::debug!(attempt = ctx.attempt.number + 1, ?reason, "retrying");
                            ctx.retry_guard = Some(g);
                            if let Some(m) = &ctx.metrics {
                                m.counters()
                                    .retries
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            ctx.attempt.number += 1;
                            let wait = backoff(&ctx.policy, ctx.attempt.number - 1);
                            this.state.set(State::Backoff {
                                sleep: Box::pin(tokio::time::sleep(wait)),
                            });
                        }
                        None => {
                            this.state.set(State::Done);
                            let retries = ctx.attempt.number;
                            if let Some(body) = ctx.body.as_ref().filter(|_| !ctx.mirrored) {
                                // The attempt that answered may still be streaming its body:
                                // it goes on without a copy kept (mirrors still read theirs).
                                body.stop_replaying();
                            }
                            this.ctx.take();
                            return Poll::Ready(result.map(|mut resp| {
                                resp.extensions_mut().insert(crate::ext::Retries(retries));
                                resp
                            }));
                        }
                    }
                }
                StateProj::Backoff { sleep } => {
                    futures::ready!(sleep.as_mut().poll(cx));
                    this.state.set(State::Readying);
                }
                StateProj::Readying => {
                    // Correctness: each attempt waits for the inner service's readiness.
                    if let Err(e) = futures::ready!(ctx.svc.poll_ready(cx)) {
                        this.state.set(State::Done);
                        this.ctx.take();
                        return Poll::Ready(Err(e));
                    }
                    let (fut, deadline) = ctx.call();
                    this.state.set(State::Calling { fut, deadline });
                }
                StateProj::Done => panic!("retry::ResponseFuture polled after completion"),
            }
        }
    }
}

impl<S, ResB: Send + 'static> Service<Request<MeshBody>> for Retry<S>
where
    S: Service<Request<MeshBody>, Response = Response<ResB>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<MeshBody>) -> Self::Future {
        let decision = req.extensions().get::<RouteDecision>();
        let policy = decision.and_then(|d| d.forward().retry_policy.clone());
        let cluster = decision.and_then(|d| self.registry.get(d.cluster()));
        // Correctness: take the service that was made ready; leave a clone in its place.
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        let mirrored = decision.is_some_and(|d| !d.is_mirror() && !d.forward().mirrors.is_empty());
        let policy = match policy {
            Some(p) if p.num_retries > 0 || p.per_try_timeout.is_some() || mirrored => p,
            // Mirrors need the body buffered too, even without retries.
            None if mirrored => RetryPolicy::none(),
            _ => {
                // No policy: one attempt, no buffering.
                let mut svc = svc;
                let fut = svc.call(req);
                return ResponseFuture {
                    state: State::Calling {
                        fut,
                        deadline: None,
                    },
                    ctx: Some(Box::new(Ctx {
                        svc,
                        parts: Request::new(()).into_parts().0,
                        body: None,
                        mirrored: false,
                        policy: RetryPolicy::none(),
                        attempt: Attempt::default(),
                        cluster: None,
                        retry_guard: None,
                        metrics: None,
                    })),
                };
            }
        };
        let (parts, body) = req.into_parts();
        // A body that says up front it is larger than the cap is sent once as it comes; any
        // other is read through a replay copy, sent at once and streamed as it arrives, and
        // stays retryable while the copy holds all of it.
        let too_large = body.size_hint().lower() > self.max_buffer as u64;
        let attempt = Attempt {
            number: 0,
            tried: Vec::new(),
            avoid_tried: policy.previous_hosts,
            host_selection_max_attempts: policy.host_selection_max_attempts,
            per_try_timeout: policy.per_try_timeout,
        };
        let mut ctx = Box::new(Ctx {
            svc,
            parts,
            body: None,
            mirrored: false,
            policy,
            attempt,
            cluster,
            retry_guard: None,
            metrics: self.metrics.clone(),
        });
        let state = if too_large {
            ctx.policy.num_retries = 0;
            let mut req = Request::from_parts(ctx.parts.clone(), body);
            req.extensions_mut().insert(ctx.attempt.clone());
            let deadline = ctx
                .policy
                .per_try_timeout
                .map(|d| Box::pin(tokio::time::sleep(d)));
            State::Calling {
                fut: ctx.svc.call(req),
                deadline,
            }
        } else {
            ctx.body = Some(ReplayBody::new(body, self.max_buffer));
            ctx.mirror();
            let (fut, deadline) = ctx.call();
            State::Calling { fut, deadline }
        };
        ResponseFuture {
            state,
            ctx: Some(ctx),
        }
    }
}
