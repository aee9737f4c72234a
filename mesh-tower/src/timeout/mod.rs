//! The route's overall timeout, across all attempts (`RouteAction.timeout`; per-try timeouts
//! are the retry layer's). A gRPC request's own deadline (`grpc-timeout`) bounds it too:
//! the shorter one applies, and the header goes on to the server unchanged.
//!
//! # Example
//!
//! ```
//! use mesh_tower::timeout::TimeoutLayer;
//! use tower::ServiceBuilder;
//!
//! let svc = ServiceBuilder::new()
//!     .layer(TimeoutLayer::new())
//!     .service_fn(|_req: http::Request<()>| async { Ok::<_, mesh_tower::BoxError>(http::Response::new(())) });
//! # drop(svc);
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use crate::error::{BoxError, MeshError};
use crate::route::RouteDecision;

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    // Bytes, not `str` slicing: the last character may be more than one byte (found by the
    // `headers` fuzz target).
    let (unit, digits) = v.as_bytes().split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Applies each request's route timeout.
#[derive(Clone, Copy, Debug, Default)]
pub struct TimeoutLayer {
    _priv: (),
}

impl TimeoutLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout { inner }
    }
}

/// Fails a request with [`MeshError::Timeout`] when its route's timeout expires.
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
}

impl<S> Timeout<S> {
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
    /// The future of [`Timeout`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        fut: F,
        // Inline, not boxed: no allocation per request.
        #[pin]
        sleep: Option<Sleep>,
        // The route is named only when the timeout fires.
        deadline: Option<(Duration, RouteDecision)>,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(r) = this.fut.poll(cx) {
            return Poll::Ready(r.map_err(Into::into));
        }
        if let (Some(sleep), Some((after, decision))) = (this.sleep.as_pin_mut(), this.deadline) {
            if sleep.poll(cx).is_ready() {
                return Poll::Ready(Err(MeshError::Timeout {
                    route: decision.route_name().to_owned(),
                    after: *after,
                }
                .into()));
            }
        }
        Poll::Pending
    }
}

impl<S, B> Service<Request<B>> for Timeout<S>
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

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let grpc = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let deadline = req.extensions().get::<RouteDecision>().and_then(|d| {
            let t = match (d.forward().timeout, grpc) {
                (Some(r), Some(g)) => r.min(g),
                (r, g) => r.or(g)?,
            };
            Some((t, d.clone()))
        });
        ResponseFuture {
            fut: self.inner.call(req),
            sleep: deadline.as_ref().map(|(t, _)| tokio::time::sleep(*t)),
            deadline,
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

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "100", "123456789m", "1x", "-1S", "1 S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    /// Regression (fuzz target `headers`, crash-aa248ad0): a multi-byte last character
    /// made the parser slice inside it and panic.
    #[test]
    fn grpc_timeout_with_a_multibyte_unit_is_rejected_not_a_panic() {
        assert_eq!(parse_grpc_timeout("\u{5b5}"), None);
        assert_eq!(parse_grpc_timeout("1\u{5b5}"), None);
        assert_eq!(parse_grpc_timeout("10é"), None);
    }
    use crate::route::decide;

    fn req(timeout: Option<Duration>) -> Request<()> {
        let mut fwd = ForwardAction::to_cluster("c");
        fwd.timeout = timeout;
        let rc = Arc::new(RouteConfig {
            name: "rc".into(),
            virtual_hosts: vec![VirtualHost {
                name: "vh".into(),
                domains: vec![DomainMatcher::Any],
                routes: vec![mesh_core::config::Route {
                    name: "slow-route".into(),
                    matcher: RouteMatch::prefix("/"),
                    action: RouteAction::Forward(fwd),
                    request_headers: HeaderMutation::default(),
                    response_headers: HeaderMutation::default(),
                    fault: None,
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
        });
        let mut r = Request::get("http://svc/").body(()).unwrap();
        let d = decide(rc, "l", &mut r, 0).unwrap();
        r.extensions_mut().insert(d);
        r
    }

    #[tokio::test(start_paused = true)]
    async fn route_timeout_expires_exactly() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<()>>();
        let mut svc = TimeoutLayer::new().layer(mock);
        handle.allow(10);
        let start = tokio::time::Instant::now();
        let fut = svc
            .ready()
            .await
            .unwrap()
            .call(req(Some(Duration::from_secs(3))));
        let (_, _pending) = handle.next_request().await.unwrap();
        let err = fut.await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert_eq!(err.to_string(), "route \"slow-route\" timed out after 3s");
        // In time: the response passes.
        let fut = svc
            .ready()
            .await
            .unwrap()
            .call(req(Some(Duration::from_secs(3))));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(()));
        assert!(fut.await.is_ok());
        // No timeout (0s in xDS): waits as long as it takes.
        let fut = tokio::spawn(svc.ready().await.unwrap().call(req(None)));
        let (_, send) = handle.next_request().await.unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        send.send_response(Response::new(()));
        assert!(fut.await.unwrap().is_ok());
    }
}
