//! Fault injection from the route's fault filter config: a delay and/or an abort (HTTP status,
//! or a gRPC status as a trailers-only response) for a percentage of requests, optionally
//! only for requests with matching headers, with a cap on faults active at once.
//!
//! # Example
//!
//! ```
//! use mesh_tower::fault::FaultLayer;
//! use tower::ServiceBuilder;
//!
//! let svc = ServiceBuilder::new()
//!     .layer(FaultLayer::new())
//!     .service_fn(|_req: http::Request<()>| async { Ok::<_, mesh_tower::BoxError>(http::Response::new(())) });
//! # drop(svc);
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use mesh_core::config::AbortKind;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use crate::error::{BoxError, MeshError};
use crate::route::RouteDecision;

/// Injects the faults of each request's route.
#[derive(Clone, Debug, Default)]
pub struct FaultLayer {
    active: Arc<AtomicU32>,
    metrics: Option<crate::metrics::Metrics>,
}

impl FaultLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts injected faults in `metrics` (`mesh_faults_injected_total`).
    pub fn metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = Fault<S>;

    fn layer(&self, inner: S) -> Fault<S> {
        Fault {
            inner,
            active: self.active.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// See the [module](self).
#[derive(Clone, Debug)]
pub struct Fault<S> {
    inner: S,
    active: Arc<AtomicU32>,
    metrics: Option<crate::metrics::Metrics>,
}

impl<S> Fault<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, with this layer taken off.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Counts a fault as active until dropped.
#[derive(Debug)]
struct Active(Arc<AtomicU32>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project! {
    /// The future of [`Fault`].
    pub struct ResponseFuture<S, B, F> {
        #[pin]
        state: State<S, B, F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, F> {
        Delaying { sleep: Pin<Box<Sleep>>, svc: Option<S>, req: Option<Request<B>>, active: Option<Active>, abort: Option<MeshError> },
        Inner { #[pin] fut: F, active: Option<Active> },
        Aborted { error: Option<MeshError>, active: Option<Active> },
    }
}

impl<S, B, F> std::fmt::Debug for ResponseFuture<S, B, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fault::ResponseFuture")
    }
}

impl<S, B, T> Future for ResponseFuture<S, B, S::Future>
where
    S: Service<Request<B>, Response = T>,
    S::Error: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Delaying {
                    sleep,
                    svc,
                    req,
                    active,
                    abort,
                } => {
                    futures::ready!(sleep.as_mut().poll(cx));
                    let active = active.take();
                    if let Some(error) = abort.take() {
                        this.state.set(State::Aborted {
                            error: Some(error),
                            active,
                        });
                        continue;
                    }
                    let mut svc = svc.take().expect("delay holds the service");
                    let fut = svc.call(req.take().expect("delay holds the request"));
                    this.state.set(State::Inner { fut, active });
                }
                StateProj::Inner { fut, active } => {
                    let out = futures::ready!(fut.poll(cx));
                    active.take();
                    return Poll::Ready(out.map_err(Into::into));
                }
                StateProj::Aborted { error, active } => {
                    active.take();
                    return Poll::Ready(Err(error.take().expect("polled after completion").into()));
                }
            }
        }
    }
}

impl<S, B> Service<Request<B>> for Fault<S>
where
    S: Service<Request<B>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let fault = req
            .extensions()
            .get::<RouteDecision>()
            .and_then(|d| d.fault())
            .filter(|f| {
                let method = req.method().as_str();
                let authority = req.uri().authority().map_or("", |a| a.as_str());
                f.headers
                    .iter()
                    .all(|h| h.matches(req.headers(), method, authority))
            });
        let Some(fault) = fault else {
            return ResponseFuture {
                state: State::Inner {
                    fut: self.inner.call(req),
                    active: None,
                },
            };
        };
        let delay = fault.delay.filter(|d| d.fraction.hit(fastrand::u64(..)));
        let abort = fault.abort.filter(|a| a.fraction.hit(fastrand::u64(..)));
        if delay.is_none() && abort.is_none() {
            return ResponseFuture {
                state: State::Inner {
                    fut: self.inner.call(req),
                    active: None,
                },
            };
        }
        // max_active_faults: over the cap, the request goes through untouched.
        let now = self.active.fetch_add(1, Ordering::AcqRel);
        let active = Active(self.active.clone());
        if fault.max_active_faults.is_some_and(|max| now >= max) {
            drop(active);
            return ResponseFuture {
                state: State::Inner {
                    fut: self.inner.call(req),
                    active: None,
                },
            };
        }
        let abort = abort.map(|a| match a.kind {
            AbortKind::Http(status) => MeshError::FaultAbort { status, grpc: None },
            AbortKind::Grpc(code) => MeshError::FaultAbort {
                status: 200,
                grpc: Some(code),
            },
        });
        tracing::debug!(delay = ?delay.map(|d| d.duration), abort = abort.is_some(), "fault injected");
        if let Some(m) = &self.metrics {
            m.counters().faults.fetch_add(1, Ordering::Relaxed);
        }
        match delay {
            Some(d) => {
                // Correctness: move the ready service into the future; a clone takes its place.
                let clone = self.inner.clone();
                let svc = std::mem::replace(&mut self.inner, clone);
                ResponseFuture {
                    state: State::Delaying {
                        sleep: Box::pin(tokio::time::sleep(d.duration)),
                        svc: Some(svc),
                        req: Some(req),
                        active: Some(active),
                        abort,
                    },
                }
            }
            None => ResponseFuture {
                state: State::Aborted {
                    error: abort,
                    active: Some(active),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use http::{Request, Response};
    use mesh_core::config::*;
    use tower::{Layer, Service, ServiceExt};

    use super::*;
    use crate::route::decide;

    fn config(fault: FaultConfig) -> Arc<RouteConfig> {
        Arc::new(RouteConfig {
            name: "rc".into(),
            virtual_hosts: vec![VirtualHost {
                name: "vh".into(),
                domains: vec![DomainMatcher::Any],
                routes: vec![mesh_core::config::Route {
                    name: "r".into(),
                    matcher: RouteMatch::prefix("/"),
                    action: RouteAction::Forward(ForwardAction::to_cluster("c")),
                    request_headers: HeaderMutation::default(),
                    response_headers: HeaderMutation::default(),
                    fault: Some(fault),
                    rbac: Vec::new(),
                }],
                retry_policy: None,
                request_headers: HeaderMutation::default(),
                response_headers: HeaderMutation::default(),
                fault: None,
                rbac: Vec::new(),
            }],
            ignore_port_in_host_matching: false,
            request_headers: HeaderMutation::default(),
            response_headers: HeaderMutation::default(),
        })
    }

    fn req(rc: &Arc<RouteConfig>, header: bool) -> Request<()> {
        let mut r = Request::get("http://svc/").body(()).unwrap();
        if header {
            r.headers_mut().insert("x-chaos", "1".parse().unwrap());
        }
        let d = decide(rc.clone(), "l", &mut r, 0).unwrap();
        r.extensions_mut().insert(d);
        r
    }

    fn abort(kind: AbortKind, pct: f64) -> FaultConfig {
        FaultConfig {
            delay: None,
            abort: Some(FaultAbort {
                kind,
                fraction: Fraction::percent(pct),
            }),
            max_active_faults: None,
            headers: vec![],
        }
    }

    #[tokio::test]
    async fn aborts_a_percentage_of_requests() {
        let rc = config(abort(AbortKind::Http(503), 25.0));
        let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<()>>();
        let metrics = crate::metrics::Metrics::default();
        let mut svc = FaultLayer::new().metrics(metrics.clone()).layer(mock);
        handle.allow(100_000);
        let answer = tokio::spawn(async move {
            while let Some((_, send)) = handle.next_request().await {
                send.send_response(Response::new(()));
            }
        });
        let mut aborted = 0;
        for _ in 0..4000 {
            match svc.ready().await.unwrap().call(req(&rc, false)).await {
                Ok(_) => {}
                Err(e) => {
                    assert!(matches!(
                        e.downcast_ref::<MeshError>(),
                        Some(MeshError::FaultAbort {
                            status: 503,
                            grpc: None
                        })
                    ));
                    aborted += 1;
                }
            }
        }
        // 25% of 4000, standard deviation 27.
        assert!((880..=1120).contains(&aborted), "{aborted}");
        assert_eq!(
            metrics.counters().faults.load(Ordering::Relaxed),
            aborted,
            "every injected fault counted"
        );
        drop(svc);
        answer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn delays_then_forwards_and_honours_header_matchers() {
        let mut f = FaultConfig {
            delay: Some(FaultDelay {
                duration: Duration::from_secs(2),
                fraction: Fraction::ALWAYS,
            }),
            abort: None,
            max_active_faults: None,
            headers: vec![HeaderMatcher {
                name: "x-chaos".into(),
                kind: HeaderMatch::Present(true),
                invert: false,
                treat_missing_as_empty: false,
            }],
        };
        let rc = config(f.clone());
        let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<()>>();
        let mut svc = FaultLayer::new().layer(mock);
        handle.allow(10);
        let start = tokio::time::Instant::now();
        let fut = tokio::spawn(svc.ready().await.unwrap().call(req(&rc, true)));
        let (_, send) = handle.next_request().await.unwrap();
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(2),
            "delayed by exactly the fault"
        );
        send.send_response(Response::new(()));
        fut.await.unwrap().unwrap();
        // Without the header, no fault.
        let start = tokio::time::Instant::now();
        let fut = tokio::spawn(svc.ready().await.unwrap().call(req(&rc, false)));
        let (_, send) = handle.next_request().await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO);
        send.send_response(Response::new(()));
        fut.await.unwrap().unwrap();
        // A gRPC abort after the delay.
        f.headers.clear();
        f.abort = Some(FaultAbort {
            kind: AbortKind::Grpc(14),
            fraction: Fraction::ALWAYS,
        });
        let rc = config(f);
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(req(&rc, false))
            .await
            .unwrap_err();
        assert!(matches!(
            err.downcast_ref::<MeshError>(),
            Some(MeshError::FaultAbort { grpc: Some(14), .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn max_active_faults_lets_the_rest_through() {
        let mut f = abort(AbortKind::Http(500), 100.0);
        f.delay = Some(FaultDelay {
            duration: Duration::from_secs(1),
            fraction: Fraction::ALWAYS,
        });
        f.max_active_faults = Some(1);
        let rc = config(f);
        let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<()>>();
        let mut svc = FaultLayer::new().layer(mock);
        handle.allow(10);
        let first = tokio::spawn(svc.ready().await.unwrap().call(req(&rc, false)));
        tokio::task::yield_now().await;
        // The second arrives while the first fault is active: it passes untouched.
        let second = tokio::spawn(svc.ready().await.unwrap().call(req(&rc, false)));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(()));
        assert!(second.await.unwrap().is_ok());
        assert!(first.await.unwrap().is_err());
    }
}
