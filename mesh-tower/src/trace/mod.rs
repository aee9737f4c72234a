//! Distributed tracing: a client span per outbound request and a server span per inbound
//! request, as [`tracing`] spans carrying the OpenTelemetry HTTP and RPC semantic-convention
//! fields, W3C / B3 propagation.
//!
//! The spans are ordinary `tracing` spans (target `mesh`, level `INFO`, name `request`;
//! `otel.name` and `otel.kind` say what OpenTelemetry calls them). A service that sets up
//! `tracing-subscriber` with a [`tracing-opentelemetry`](tracing_opentelemetry) layer exports
//! them with its own spans, in one trace, whatever the order in which the subscriber and the
//! mesh's clients and servers were built: nothing is captured at construction. The mesh's
//! OTLP helper (`mesh_tower::otlp`, feature `otlp`) installs exactly that pipeline.
//!
//! [`TraceLayer::server`] extracts the remote parent from the request's headers (W3C, B3
//! single or B3 multi) and makes it the parent of the `SERVER` span, then runs the handler
//! inside the span: the handler's own spans (`#[instrument]`) are its children, and the
//! span's context is in the request's extensions (an [`opentelemetry::Context`] and its
//! [`SpanContext`]).
//!
//! [`TraceLayer::client`] starts a `CLIENT` span as a child of the current span (or of an
//! [`opentelemetry::Context`] put in the request's extensions, or else of trace headers the
//! application forwarded on the request), writes its context into the request (W3C
//! `traceparent`/`tracestate` by default; B3 if configured), and records the route, cluster,
//! endpoint and retries the lower layers report on the response.
//!
//! Spans end when the response body ends, so streamed responses are timed whole and a gRPC
//! status in the trailers is recorded (`rpc.grpc.status_code`). When no subscriber wants the
//! spans, a request costs a disabled-span check, and an incoming trace context is still passed
//! on to the calls the handler makes (the mesh never breaks a trace it carries).
//!
//! # Example
//!
//! ```
//! use mesh_tower::trace::{Propagation, TraceLayer};
//! use tower::{service_fn, ServiceBuilder};
//! use tracing_subscriber::layer::SubscriberExt;
//!
//! // The application's own pipeline: any tracer provider, here the SDK's default.
//! let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
//! let subscriber = tracing_subscriber::registry().with(
//!     tracing_opentelemetry::layer()
//!         .with_tracer(opentelemetry::trace::TracerProvider::tracer(&provider, "app")),
//! );
//! let _guard = tracing::subscriber::set_default(subscriber);
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
use std::task::{Context, Poll};

use http::{Request, Response};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry::Context as OtelContext;
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::body::{grpc, End, Observed, OnEnd};
use crate::error::BoxError;

mod propagate;

pub use propagate::{extract, inject, parse_b3_single, parse_traceparent, Formats, Propagation};

/// The `tracing` target of the mesh's request spans (filter with `mesh=info`).
pub const SCOPE: &str = "mesh";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// Starts a span per request (see the [module](self)).
#[derive(Clone, Debug)]
pub struct TraceLayer {
    side: Side,
    propagation: Propagation,
}

impl TraceLayer {
    /// Client spans for outbound requests, children of the current span.
    pub fn client() -> Self {
        Self::new(Side::Client)
    }

    /// Server spans for inbound requests, children of the trace the request carries.
    pub fn server() -> Self {
        Self::new(Side::Server)
    }

    fn new(side: Side) -> Self {
        Self {
            side,
            propagation: Propagation::default(),
        }
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

    /// The inner service, with tracing taken off.
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

/// `server.address` and `server.port` from the URI's authority or the `Host` header.
fn server_address<B>(req: &Request<B>) -> (Option<&str>, Option<i64>) {
    let authority = req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    match authority {
        None => (None, None),
        Some(auth) => match auth.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => (Some(h), p.parse::<i64>().ok()),
            _ => (Some(auth), None),
        },
    }
}

fn protocol_version<B>(req: &Request<B>) -> &'static str {
    match req.version() {
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_11 => "1.1",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "0.9",
    }
}

/// The request's span, with every field it will ever record declared (`tracing` fixes a
/// span's fields when it is created); the field values are only computed when a subscriber
/// wants the span.
fn request_span<B>(req: &Request<B>, side: Side) -> tracing::Span {
    let is_grpc = grpc::is_grpc(req.headers());
    let rpc = || {
        is_grpc
            .then(|| req.uri().path().trim_start_matches('/').split_once('/'))
            .flatten()
    };
    let (kind, direction) = match side {
        Side::Client => ("client", "outbound"),
        Side::Server => ("server", "inbound"),
    };
    let remote = (side == Side::Server)
        .then(|| req.extensions().get::<crate::ext::RemoteAddr>())
        .flatten();
    let peer = (side == Side::Server)
        .then(|| {
            req.extensions()
                .get::<crate::ext::PeerIdentity>()
                .and_then(|p| p.0.as_ref())
        })
        .flatten();
    let (host, port) = server_address(req);
    tracing::info_span!(
        target: "mesh",
        "request",
        otel.name = %span_name(req),
        otel.kind = kind,
        otel.status_code = Empty,
        otel.status_description = Empty,
        http.request.method = req.method().as_str(),
        server.address = host,
        server.port = port,
        url.path = req.uri().path(),
        url.query = req.uri().query(),
        network.protocol.version = protocol_version(req),
        rpc.system = is_grpc.then_some("grpc"),
        rpc.service = rpc().map(|(s, _)| s),
        rpc.method = rpc().map(|(_, m)| m),
        mesh.direction = direction,
        client.address = remote.map(|r| tracing::field::display(r.0.ip())),
        client.port = remote.map(|r| i64::from(r.0.port())),
        mesh.peer.identity = peer.map(tracing::field::display),
        http.response.status_code = Empty,
        rpc.grpc.status_code = Empty,
        error.type = Empty,
        mesh.route = Empty,
        mesh.cluster = Empty,
        mesh.endpoint = Empty,
        network.peer.address = Empty,
        network.peer.port = Empty,
        mesh.retry.attempts = Empty,
    )
}

/// The context a client request continues when no subscriber exports spans: the one the
/// application put on the request, the current one (a server span's remote parent), or
/// trace headers the application forwarded.
fn ambient_parent<B>(req: &Request<B>, formats: Formats) -> Option<SpanContext> {
    if let Some(cx) = req.extensions().get::<OtelContext>() {
        if cx.has_active_span() {
            return Some(cx.span().span_context().clone());
        }
    }
    let current = OtelContext::current();
    if current.has_active_span() {
        return Some(current.span().span_context().clone());
    }
    propagate::extract(req.headers(), formats)
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
        let formats = self.layer.propagation.extract;
        let span = request_span(&req, side);
        // The parent is settled before the span is built, so the sampler sees it.
        let mut exported = None;
        if !span.is_disabled() {
            let parent = match side {
                Side::Server => propagate::extract(req.headers(), formats)
                    .map(|remote| OtelContext::new().with_remote_span_context(remote)),
                Side::Client => match req.extensions().get::<OtelContext>() {
                    Some(cx) if cx.has_active_span() => Some(cx.clone()),
                    _ if OtelContext::current().has_active_span()
                        || tracing::Span::current().context().has_active_span() =>
                    {
                        None
                    }
                    _ => propagate::extract(req.headers(), formats)
                        .map(|remote| OtelContext::new().with_remote_span_context(remote)),
                },
            };
            if let Some(parent) = parent {
                // Fails only when no OpenTelemetry layer is installed: then nothing exports.
                let _ = span.set_parent(parent);
            }
            let cx = span.context();
            if cx.span().span_context().is_valid() {
                exported = Some(cx);
            }
        }
        let exporting = exported.is_some();
        // Without an exporting subscriber, an incoming trace is passed on unchanged.
        let (sc, attach) = match (exported, side) {
            (Some(cx), _) => (cx.span().span_context().clone(), Some(cx)),
            (None, Side::Server) => match propagate::extract(req.headers(), formats) {
                Some(remote) => (
                    remote.clone(),
                    Some(OtelContext::new().with_remote_span_context(remote)),
                ),
                None => (SpanContext::empty_context(), None),
            },
            (None, Side::Client) => (
                ambient_parent(&req, formats).unwrap_or_else(SpanContext::empty_context),
                None,
            ),
        };
        if !sc.is_valid() && span.is_disabled() {
            // Nothing to record or propagate: the response passes through.
            return ResponseFuture {
                fut: self.inner.call(req),
                span: None,
            };
        }
        match side {
            Side::Client if sc.is_valid() => {
                propagate::inject(&sc, req.headers_mut(), self.layer.propagation.inject);
            }
            Side::Client => {}
            Side::Server => {
                if let Some(cx) = &attach {
                    req.extensions_mut().insert(cx.clone());
                }
            }
        }
        if sc.is_valid() {
            req.extensions_mut().insert(sc);
        }
        let grpc = grpc::is_grpc(req.headers());
        // The server's handler runs inside the span; with no exporting subscriber, the
        // remote parent is its current OpenTelemetry context (so its calls pass it on).
        let attach = if side == Side::Server && !exporting {
            attach
        } else {
            None
        };
        let fut = {
            let _entered = span.enter();
            let _attached = attach.clone().map(OtelContext::attach);
            self.inner.call(req)
        };
        ResponseFuture {
            fut,
            span: Some(SpanEnd {
                span,
                attach,
                side,
                grpc,
                status: 0,
            }),
        }
    }
}

/// Ends a span when its response ends.
pub struct SpanEnd {
    span: tracing::Span,
    attach: Option<OtelContext>,
    side: Side,
    grpc: bool,
    status: u16,
}

impl fmt::Debug for SpanEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpanEnd")
            .field("span", &self.span)
            .field("grpc", &self.grpc)
            .finish_non_exhaustive()
    }
}

/// The gRPC codes a server reports as its own error (OpenTelemetry RPC conventions).
fn grpc_server_error(code: u32) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

impl SpanEnd {
    fn fail(&self, description: &str) {
        self.span.record("otel.status_description", description);
    }

    fn grpc_status(&self, code: u32) {
        self.span.record("rpc.grpc.status_code", i64::from(code));
        let error = match self.side {
            Side::Client => code != 0,
            Side::Server => grpc_server_error(code),
        };
        if error {
            self.fail(&format!("grpc-status {code}"));
        }
    }
}

impl OnEnd for SpanEnd {
    fn on_end(self, end: End<'_>) {
        if !self.span.is_disabled() {
            if self.grpc {
                self.grpc_status(grpc::status_at_end(&end));
            } else if let End::Failed(e) = &end {
                self.fail(&format!("response body: {e}"));
            } else if self.status >= 500 || (self.side == Side::Client && self.status >= 400) {
                self.fail(&format!("HTTP {}", self.status));
            }
        }
        // Dropping the span closes it (once the handler's own spans are closed too).
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
        let out = match this.span.as_ref() {
            Some(s) => {
                let _entered = s.span.enter();
                let _attached = s.attach.clone().map(OtelContext::attach);
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
                end.status = resp.status().as_u16();
                if !end.span.is_disabled() {
                    record_response(&end.span, &resp);
                }
                // A trailers-only gRPC response has its status already.
                if let Some(code) = grpc::status(resp.headers()) {
                    if !end.span.is_disabled() {
                        end.grpc_status(code);
                    }
                    end.grpc = false;
                    end.status = 0;
                }
                Poll::Ready(Ok(resp.map(|b| Observed::new(b, Some(end)))))
            }
            Err(e) => {
                let e: BoxError = e.into();
                if !end.span.is_disabled() {
                    end.span.record("error.type", error_type(&e));
                    end.fail(&e.to_string());
                }
                Poll::Ready(Err(e))
            }
        }
    }
}

fn record_response<B>(span: &tracing::Span, resp: &Response<B>) {
    span.record(
        "http.response.status_code",
        i64::from(resp.status().as_u16()),
    );
    if let Some(d) = resp.extensions().get::<crate::route::RouteDecision>() {
        span.record("mesh.route", d.route_name());
        span.record("mesh.cluster", d.cluster());
    }
    if let Some(ep) = resp.extensions().get::<crate::ext::ServedBy>() {
        span.record("mesh.endpoint", tracing::field::display(ep.0));
        span.record("network.peer.address", tracing::field::display(ep.0.ip()));
        span.record("network.peer.port", i64::from(ep.0.port()));
    }
    if let Some(r) = resp.extensions().get::<crate::ext::Retries>() {
        span.record("mesh.retry.attempts", i64::from(r.0) + 1);
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
