use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use mesh_core::config::RetryPolicy;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::Service;

use super::{classify, Attempt, PrefixedBody, ServedBy};
use crate::cluster::{ClusterRegistry, ClusterRuntime, MeshBody, RetryGuard};
use crate::error::{BoxError, MeshError};
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

    /// Unwraps.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

struct Ctx<S> {
    svc: S,
    parts: http::request::Parts,
    /// The body so far (all of it once buffering is done).
    buffered: BytesMut,
    /// The unread body while buffering.
    pending: Option<MeshBody>,
    max_buffer: usize,
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
        Buffering,
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
        let body = http_body_util::Full::new(self.buffered.clone().freeze())
            .map_err(|never| match never {})
            .boxed_unsync();
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
                StateProj::Buffering => {
                    let body = ctx.pending.as_mut().expect("buffering has a body");
                    match futures::ready!(Pin::new(body).poll_frame(cx)) {
                        Some(Ok(frame)) => {
                            if let Ok(data) = frame.into_data() {
                                ctx.buffered.extend_from_slice(&data);
                            }
                            if ctx.buffered.len() > ctx.max_buffer {
                                // Too large to replay: send what we read plus the rest, once.
                                let rest = ctx.pending.take().expect("body present");
                                let body = PrefixedBody::new(
                                    std::mem::take(&mut ctx.buffered).freeze(),
                                    rest,
                                )
                                .boxed_unsync();
                                let req = Request::from_parts(ctx.parts.clone(), body);
                                ctx.policy.num_retries = 0;
                                let fut = ctx.svc.call(req);
                                let deadline = ctx
                                    .policy
                                    .per_try_timeout
                                    .map(|d| Box::pin(tokio::time::sleep(d)));
                                this.state.set(State::Calling { fut, deadline });
                            }
                        }
                        Some(Err(e)) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(e));
                        }
                        None => {
                            ctx.pending = None;
                            ctx.mirror();
                            let (fut, deadline) = ctx.call();
                            this.state.set(State::Calling { fut, deadline });
                        }
                    }
                }
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
                    let may_retry = reason.is_some() && ctx.attempt.number < ctx.policy.num_retries;
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
                            this.ctx.take();
                            return Poll::Ready(result.map(|mut resp| {
                                resp.extensions_mut().insert(super::Retries(retries));
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
            None if mirrored => RetryPolicy {
                retry_on: Default::default(),
                num_retries: 0,
                per_try_timeout: None,
                backoff: Default::default(),
                retriable_status_codes: Vec::new(),
                previous_hosts: false,
                host_selection_max_attempts: 1,
            },
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
                        buffered: BytesMut::new(),
                        pending: None,
                        max_buffer: 0,
                        policy: RetryPolicy {
                            retry_on: Default::default(),
                            num_retries: 0,
                            per_try_timeout: None,
                            backoff: Default::default(),
                            retriable_status_codes: Vec::new(),
                            previous_hosts: false,
                            host_selection_max_attempts: 1,
                        },
                        attempt: Attempt::default(),
                        cluster: None,
                        retry_guard: None,
                        metrics: None,
                    })),
                };
            }
        };
        let (parts, body) = req.into_parts();
        // Decide retryability up front: a body that says it is larger than the cap is sent
        // once; others are buffered (and fall back to one attempt if they grow past it).
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
            buffered: BytesMut::new(),
            pending: Some(body),
            max_buffer: self.max_buffer,
            policy,
            attempt,
            cluster,
            retry_guard: None,
            metrics: self.metrics.clone(),
        });
        let state = if too_large {
            ctx.policy.num_retries = 0;
            let body = ctx.pending.take().expect("body present");
            let req = Request::from_parts(ctx.parts.clone(), body);
            let deadline = ctx
                .policy
                .per_try_timeout
                .map(|d| Box::pin(tokio::time::sleep(d)));
            State::Calling {
                fut: ctx.svc.call(req),
                deadline,
            }
        } else {
            State::Buffering
        };
        ResponseFuture {
            state,
            ctx: Some(ctx),
        }
    }
}
