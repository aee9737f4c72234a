use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use mesh_core::config::RetryPolicy;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::Service;

use super::backoff::{backoff, per_try};
use super::classify;
use crate::body::MeshBody;
use crate::cluster::{ClusterRegistry, ClusterRuntime, RetryGuard};
use crate::error::{BoxError, MeshError};
use crate::ext::{Attempt, ServedBy};
use crate::replay::{ReplayBody, Replaying};
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
    /// This layer made `body` (rather than the mirror layer above): it stops the copy when
    /// no further attempt will be made.
    owns_copy: bool,
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
        inner: Inner<S, F>,
    }
}

pin_project! {
    #[project = InnerProj]
    enum Inner<S, F> {
        /// No retry policy: the one attempt, as it goes.
        Passthrough { #[pin] fut: F },
        Retrying {
            #[pin]
            state: State<F>,
            ctx: Option<Box<Ctx<S>>>,
        },
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

    /// Sends the next attempt, with its per-try timer.
    fn call(&mut self) -> (S::Future, Option<Pin<Box<Sleep>>>) {
        let req = self.request();
        (self.svc.call(req), per_try(&self.policy))
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
        match self.project().inner.project() {
            InnerProj::Passthrough { fut } => fut.poll(cx).map(|r| {
                r.map(|mut resp| {
                    resp.extensions_mut().insert(crate::ext::Retries(0));
                    resp
                })
            }),
            InnerProj::Retrying { state, ctx } => poll_retrying(state, ctx, cx),
        }
    }
}

/// Drives the attempts of a request with a retry policy.
fn poll_retrying<S, ResB>(
    mut state: Pin<&mut State<S::Future>>,
    ctx_slot: &mut Option<Box<Ctx<S>>>,
    cx: &mut Context<'_>,
) -> Poll<Result<Response<ResB>, BoxError>>
where
    S: Service<Request<MeshBody>, Response = Response<ResB>, Error = BoxError>,
    ResB: Send + 'static,
{
    loop {
        let ctx = ctx_slot.as_mut().expect("polled after completion");
        match state.as_mut().project() {
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
                        state.set(State::Backoff {
                            sleep: Box::pin(tokio::time::sleep(wait)),
                        });
                    }
                    None => {
                        state.set(State::Done);
                        let retries = ctx.attempt.number;
                        if let Some(body) = ctx.body.as_ref().filter(|_| ctx.owns_copy) {
                            // The attempt that answered may still be streaming its body:
                            // it goes on without a copy kept (mirrors read the copy the
                            // mirror layer made, which it does not stop).
                            body.stop_replaying();
                        }
                        ctx_slot.take();
                        return Poll::Ready(result.map(|mut resp| {
                            resp.extensions_mut().insert(crate::ext::Retries(retries));
                            resp
                        }));
                    }
                }
            }
            StateProj::Backoff { sleep } => {
                futures::ready!(sleep.as_mut().poll(cx));
                state.set(State::Readying);
            }
            StateProj::Readying => {
                // Correctness: each attempt waits for the inner service's readiness.
                if let Err(e) = futures::ready!(ctx.svc.poll_ready(cx)) {
                    state.set(State::Done);
                    ctx_slot.take();
                    return Poll::Ready(Err(e));
                }
                let (fut, deadline) = ctx.call();
                state.set(State::Calling { fut, deadline });
            }
            StateProj::Done => panic!("retry::ResponseFuture polled after completion"),
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
        // Mirror copies are sent once; so is a request whose route sets no retries and no
        // per-try timeout.
        let policy = decision
            .filter(|d| !d.is_mirror())
            .and_then(|d| d.forward().retry_policy.clone())
            .filter(|p| p.num_retries > 0 || p.per_try_timeout.is_some());
        let Some(policy) = policy else {
            return ResponseFuture {
                inner: Inner::Passthrough {
                    fut: self.inner.call(req),
                },
            };
        };
        let cluster = decision.and_then(|d| self.registry.get(d.cluster()));
        // Correctness: the attempts need the service that was made ready; a clone stays.
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        let (mut parts, body) = req.into_parts();
        let attempt = Attempt {
            number: 0,
            tried: Vec::new(),
            avoid_tried: policy.previous_hosts,
            host_selection_max_attempts: policy.host_selection_max_attempts,
            per_try_timeout: policy.per_try_timeout,
        };
        // The mirror layer's copy when it made one. Otherwise a body that says up front it
        // is larger than the cap is sent once as it comes; any other is read through a
        // replay copy, sent at once and streamed as it arrives, and stays retryable while
        // the copy holds all of it.
        let (replay, owns_copy, sent_once) = match parts.extensions.remove::<Replaying>() {
            Some(Replaying(r)) => (Some(r), false, None),
            None if body.size_hint().lower() > self.max_buffer as u64 => (None, false, Some(body)),
            None => (Some(ReplayBody::new(body, self.max_buffer)), true, None),
        };
        let mut ctx = Box::new(Ctx {
            svc,
            parts,
            body: replay,
            owns_copy,
            policy,
            attempt,
            cluster,
            retry_guard: None,
            metrics: self.metrics.clone(),
        });
        let state = if let Some(body) = sent_once {
            ctx.policy.num_retries = 0;
            let mut req = Request::from_parts(ctx.parts.clone(), body);
            req.extensions_mut().insert(ctx.attempt.clone());
            State::Calling {
                fut: ctx.svc.call(req),
                deadline: per_try(&ctx.policy),
            }
        } else {
            let (fut, deadline) = ctx.call();
            State::Calling { fut, deadline }
        };
        ResponseFuture {
            inner: Inner::Retrying {
                state,
                ctx: Some(ctx),
            },
        }
    }
}
