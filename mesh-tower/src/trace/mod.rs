//! Distributed tracing: a client span per outbound request and a server span per inbound
//! request, OpenTelemetry semantic conventions, W3C / B3 propagation.
//!
//! [`TraceLayer::client`] starts a `CLIENT` span whose parent is, in order: an
//! [`opentelemetry::Context`] in the request's extensions, the current context (inside a
//! handler served through [`TraceLayer::server`], the server span), or trace headers the
//! application forwarded on the request. It writes the span's context into the request
//! (W3C `traceparent`/`tracestate` by default; B3 if configured), and records the route,
//! cluster, endpoint and retries the lower layers report on the response.
//!
//! [`TraceLayer::server`] extracts the remote parent from the request's headers (W3C, B3
//! single or B3 multi) *before* starting the `SERVER` span, puts the span's context in the
//! request's extensions (an [`opentelemetry::Context`] and its [`SpanContext`]) and runs the
//! handler with it as the current context, so outbound calls made from the handler join the
//! trace.
//!
//! Spans end when the response body ends, so streamed responses are timed whole and a gRPC
//! status in the trailers is recorded (`rpc.grpc.status_code`). Unsampled requests cost a
//! span-context and no attributes. Spans go to whatever tracer provider is installed;
//! `mesh_tower::otlp` (feature `otlp`) installs one exporting over OTLP.
//!
//! # Example
//!
//! ```
//! use mesh_tower::trace::{Propagation, TraceLayer};
//! use tower::{service_fn, ServiceBuilder};
//!
//! let app = service_fn(|_req: http::Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//! });
//! // Inbound: accept W3C and B3 parents.
//! let server = ServiceBuilder::new().layer(TraceLayer::server()).service(app.clone());
//! // Outbound: write both W3C and B3 single headers.
//! let mut propagation = Propagation::default();
//! propagation.inject.b3_single = true;
//! let client = ServiceBuilder::new()
//!     .layer(TraceLayer::client().propagation(propagation))
//!     .service(app);
//! # drop((server, client));
//! ```

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use opentelemetry::global::BoxedTracer;
use opentelemetry::trace::{SpanContext, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context as OtelContext, KeyValue};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::{grpc, End, Observed, OnEnd};
use crate::error::BoxError;

mod propagate;

pub use propagate::{extract, inject, parse_b3_single, parse_traceparent, Formats, Propagation};

/// The instrumentation scope name of the mesh's spans.
pub const SCOPE: &str = "mesh";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// Starts a span per request (see the [module](self)).
#[derive(Clone)]
pub struct TraceLayer {
    side: Side,
    tracer: Arc<BoxedTracer>,
    propagation: Propagation,
}

impl fmt::Debug for TraceLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceLayer")
            .field("side", &self.side)
            .field("propagation", &self.propagation)
            .finish_non_exhaustive()
    }
}

impl TraceLayer {
    /// Client spans for outbound requests, from the global tracer provider as it is now
    /// (install the provider first, e.g. with `mesh_tower::otlp`).
    pub fn client() -> Self {
        Self::new(Side::Client)
    }

    /// Server spans for inbound requests, from the global tracer provider as it is now.
    pub fn server() -> Self {
        Self::new(Side::Server)
    }

    fn new(side: Side) -> Self {
        Self {
            side,
            tracer: Arc::new(opentelemetry::global::tracer(SCOPE)),
            propagation: Propagation::default(),
        }
    }

    /// Uses `tracer` instead of the global one.
    pub fn tracer(mut self, tracer: BoxedTracer) -> Self {
        self.tracer = Arc::new(tracer);
        self
    }

    /// Which header formats are read and written.
    pub fn propagation(mut self, propagation: Propagation) -> Self {
        self.propagation = propagation;
        self
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`TraceLayer`].
#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
    layer: TraceLayer,
}

impl<S> Trace<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The span name: `package.Service/Method` for gRPC, the method otherwise.
fn span_name<B>(req: &Request<B>) -> Cow<'static, str> {
    if grpc::is_grpc(req.headers()) {
        Cow::Owned(req.uri().path().trim_start_matches('/').to_owned())
    } else {
        match req.method().as_str() {
            "GET" => Cow::Borrowed("GET"),
            "POST" => Cow::Borrowed("POST"),
            "PUT" => Cow::Borrowed("PUT"),
            "DELETE" => Cow::Borrowed("DELETE"),
            "PATCH" => Cow::Borrowed("PATCH"),
            "HEAD" => Cow::Borrowed("HEAD"),
            "OPTIONS" => Cow::Borrowed("OPTIONS"),
            _ => Cow::Borrowed("HTTP"),
        }
    }
}

fn request_attributes<B>(req: &Request<B>, side: Side) -> Vec<KeyValue> {
    let mut a = Vec::with_capacity(12);
    a.push(KeyValue::new(
        "http.request.method",
        req.method().as_str().to_owned(),
    ));
    let authority = req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    if let Some(auth) = authority {
        let (host, port) = match auth.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => (h, p.parse::<i64>().ok()),
            _ => (auth, None),
        };
        a.push(KeyValue::new("server.address", host.to_owned()));
        if let Some(p) = port {
            a.push(KeyValue::new("server.port", p));
        }
    }
    a.push(KeyValue::new("url.path", req.uri().path().to_owned()));
    if let Some(q) = req.uri().query() {
        a.push(KeyValue::new("url.query", q.to_owned()));
    }
    let version = match req.version() {
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_11 => "1.1",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "0.9",
    };
    a.push(KeyValue::new("network.protocol.version", version));
    if grpc::is_grpc(req.headers()) {
        a.push(KeyValue::new("rpc.system", "grpc"));
        let path = req.uri().path().trim_start_matches('/');
        if let Some((service, method)) = path.split_once('/') {
            a.push(KeyValue::new("rpc.service", service.to_owned()));
            a.push(KeyValue::new("rpc.method", method.to_owned()));
        }
    }
    match side {
        Side::Client => a.push(KeyValue::new("mesh.direction", "outbound")),
        Side::Server => {
            a.push(KeyValue::new("mesh.direction", "inbound"));
            if let Some(remote) = req.extensions().get::<crate::tls::RemoteAddr>() {
                a.push(KeyValue::new("client.address", remote.0.ip().to_string()));
                a.push(KeyValue::new("client.port", i64::from(remote.0.port())));
            }
            if let Some(id) = req
                .extensions()
                .get::<crate::tls::PeerIdentity>()
                .and_then(|p| p.0.as_ref())
            {
                a.push(KeyValue::new("mesh.peer.identity", id.to_string()));
            }
        }
    }
    a
}

impl<S, B, ResB> Service<Request<B>> for Trace<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<Observed<ResB, Option<SpanEnd>>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let side = self.layer.side;
        let extract = self.layer.propagation.extract;
        // The parent is settled before the span starts, so the sampler sees it.
        let parent = match side {
            Side::Server => match propagate::extract(req.headers(), extract) {
                Some(remote) => OtelContext::new().with_remote_span_context(remote),
                None => OtelContext::new(),
            },
            Side::Client => {
                let cx = req
                    .extensions()
                    .get::<OtelContext>()
                    .cloned()
                    .unwrap_or_else(OtelContext::current);
                if cx.has_active_span() {
                    cx
                } else {
                    match propagate::extract(req.headers(), extract) {
                        Some(remote) => cx.with_remote_span_context(remote),
                        None => cx,
                    }
                }
            }
        };
        let kind = match side {
            Side::Client => SpanKind::Client,
            Side::Server => SpanKind::Server,
        };
        let span = self
            .layer
            .tracer
            .span_builder(span_name(&req))
            .with_kind(kind)
            .start_with_context(self.layer.tracer.as_ref(), &parent);
        if !opentelemetry::trace::Span::span_context(&span).is_valid() {
            // No tracer provider and no incoming trace: nothing to record or propagate, so
            // nothing is put on the request and the response passes through (the common
            // case of a service that does not trace costs a span handle, no more).
            return ResponseFuture {
                fut: self.inner.call(req),
                span: None,
            };
        }
        let cx = parent.with_span(span);
        let span = cx.span();
        if span.is_recording() {
            span.set_attributes(request_attributes(&req, side));
        }
        let sc = span.span_context().clone();
        match side {
            Side::Client => {
                propagate::inject(&sc, req.headers_mut(), self.layer.propagation.inject);
            }
            Side::Server => {
                req.extensions_mut().insert(cx.clone());
            }
        }
        req.extensions_mut().insert(sc);
        let grpc = grpc::is_grpc(req.headers());
        let fut = match side {
            // The handler runs with the server span as its current context.
            Side::Server => {
                let _entered = cx.clone().attach();
                self.inner.call(req)
            }
            Side::Client => self.inner.call(req),
        };
        ResponseFuture {
            fut,
            span: Some(SpanEnd {
                cx,
                side,
                grpc,
                status: 0,
            }),
        }
    }
}

/// Ends a span when its response ends.
pub struct SpanEnd {
    cx: OtelContext,
    side: Side,
    grpc: bool,
    status: u16,
}

impl fmt::Debug for SpanEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpanEnd")
            .field("span", self.cx.span().span_context())
            .field("grpc", &self.grpc)
            .finish_non_exhaustive()
    }
}

/// The gRPC codes a server reports as its own error (OpenTelemetry RPC conventions).
fn grpc_server_error(code: u32) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

impl SpanEnd {
    fn fail(&self, description: String) {
        let span = self.cx.span();
        span.set_status(Status::Error {
            description: description.into(),
        });
    }

    fn grpc_status(&self, code: u32) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
        let error = match self.side {
            Side::Client => code != 0,
            Side::Server => grpc_server_error(code),
        };
        if error {
            self.fail(format!("grpc-status {code}"));
        }
    }
}

impl OnEnd for SpanEnd {
    fn on_end(self, end: End<'_>) {
        let span = self.cx.span();
        if span.is_recording() {
            if self.grpc {
                self.grpc_status(grpc::status_at_end(&end));
            } else if let End::Failed(e) = &end {
                self.fail(format!("response body: {e}"));
            } else if self.status >= 500 || (self.side == Side::Client && self.status >= 400) {
                self.fail(format!("HTTP {}", self.status));
            }
        }
        span.end();
    }
}

pin_project! {
    /// The future of [`Trace`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        fut: F,
        span: Option<SpanEnd>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<Observed<B, Option<SpanEnd>>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = match this.span.as_ref().filter(|s| s.side == Side::Server) {
            Some(s) => {
                let _entered = s.cx.clone().attach();
                futures::ready!(this.fut.poll(cx))
            }
            None => futures::ready!(this.fut.poll(cx)),
        };
        // The span is taken only here, when the future completes; none: not traced.
        let Some(mut end) = this.span.take() else {
            return Poll::Ready(
                out.map(|resp| resp.map(|b| Observed::new(b, None)))
                    .map_err(Into::into),
            );
        };
        match out {
            Ok(resp) => {
                let span = end.cx.span();
                end.status = resp.status().as_u16();
                if span.is_recording() {
                    record_response(&span, &resp);
                }
                // A trailers-only gRPC response has its status already.
                if let Some(code) = grpc::status(resp.headers()) {
                    if span.is_recording() {
                        end.grpc_status(code);
                    }
                    end.grpc = false;
                    end.status = 0;
                }
                Poll::Ready(Ok(resp.map(|b| Observed::new(b, Some(end)))))
            }
            Err(e) => {
                let e: BoxError = e.into();
                let span = end.cx.span();
                if span.is_recording() {
                    span.set_attribute(KeyValue::new("error.type", error_type(&e)));
                    end.fail(e.to_string());
                }
                span.end();
                Poll::Ready(Err(e))
            }
        }
    }
}

fn record_response<B>(span: &opentelemetry::trace::SpanRef<'_>, resp: &Response<B>) {
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(resp.status().as_u16()),
    ));
    if let Some(d) = resp.extensions().get::<crate::route::RouteDecision>() {
        span.set_attribute(KeyValue::new("mesh.route", d.route_name().to_owned()));
        span.set_attribute(KeyValue::new("mesh.cluster", d.cluster().to_owned()));
    }
    if let Some(ep) = resp.extensions().get::<crate::retry::ServedBy>() {
        span.set_attribute(KeyValue::new("mesh.endpoint", ep.0.to_string()));
        span.set_attribute(KeyValue::new("network.peer.address", ep.0.ip().to_string()));
        span.set_attribute(KeyValue::new("network.peer.port", i64::from(ep.0.port())));
    }
    if let Some(r) = resp.extensions().get::<crate::retry::Retries>() {
        span.set_attribute(KeyValue::new("mesh.retry.attempts", i64::from(r.0) + 1));
    }
}

/// A low-cardinality name for the error (OpenTelemetry `error.type`).
fn error_type(e: &BoxError) -> &'static str {
    use crate::error::MeshError;
    match e.downcast_ref::<MeshError>() {
        Some(m) => m.kind(),
        None => "_OTHER",
    }
}

/// The trace id of `req`'s span, if a [`TraceLayer`] above put one in its extensions.
pub fn trace_id<B>(req: &Request<B>) -> Option<opentelemetry::trace::TraceId> {
    req.extensions()
        .get::<SpanContext>()
        .filter(|sc| sc.is_valid())
        .map(|sc| sc.trace_id())
}

#[cfg(test)]
mod tests;
