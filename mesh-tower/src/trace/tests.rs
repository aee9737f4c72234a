use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use opentelemetry::trace::{SpanId, SpanKind, Status, TraceContextExt, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, Sampler, SdkTracerProvider, SpanData};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

use super::*;

const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const S: &str = "00f067aa0ba902b7";

/// tracing-core treats a lone live dispatcher as the global one: while this thread's is the
/// only one, a callsite first reached on another test's thread (which has none) would be
/// cached as never enabled, for this thread too. A second, idle dispatcher kept alive for
/// the whole binary makes it ask every live dispatcher instead.
fn keep_two_dispatchers() {
    static IDLE: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    IDLE.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
}

/// A `tracing-opentelemetry` pipeline on this thread, exporting to memory.
fn provider(sampler: Sampler) -> (tracing::subscriber::DefaultGuard, InMemorySpanExporter) {
    use tracing_subscriber::layer::SubscriberExt;
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .with_sampler(sampler)
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer(SCOPE)));
    keep_two_dispatchers();
    (tracing::subscriber::set_default(subscriber), exporter)
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn spans(e: &InMemorySpanExporter) -> Vec<SpanData> {
    e.get_finished_spans().unwrap()
}

/// A server whose handler calls a downstream through a client trace layer: the downstream
/// sees the headers the client wrote.
#[tokio::test]
async fn server_span_parents_the_client_span_made_in_its_handler() {
    let (_p, exporter) = provider(Sampler::AlwaysOn);
    let downstream = service_fn(|req: Request<String>| async move {
        let tp = req.headers()["traceparent"].to_str().unwrap().to_owned();
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(tp))))
    });
    let client = ServiceBuilder::new()
        .layer(TraceLayer::client())
        .service(downstream);
    let handler = service_fn(move |req: Request<String>| {
        let client = client.clone();
        async move {
            // The handler's current context is the server span.
            let current = opentelemetry::Context::current()
                .span()
                .span_context()
                .clone();
            assert_eq!(Some(&current), req.extensions().get::<SpanContext>());
            let resp = client
                .oneshot(
                    Request::get("http://backend.local/x")
                        .body(String::new())
                        .unwrap(),
                )
                .await
                .unwrap();
            Ok::<_, Infallible>(resp)
        }
    });
    let server = ServiceBuilder::new()
        .layer(TraceLayer::server())
        .service(handler);
    let req = Request::get("http://front.local/api?q=1")
        .header("traceparent", format!("00-{T}-{S}-01"))
        .body(String::new())
        .unwrap();
    let resp = server.oneshot(req).await.unwrap();
    let sent = resp.into_body().collect().await.unwrap().to_bytes();
    let sent = std::str::from_utf8(&sent).unwrap().to_owned();
    let got = spans(&exporter);
    assert_eq!(got.len(), 2, "{got:#?}");
    let client_span = got
        .iter()
        .find(|s| s.span_kind == SpanKind::Client)
        .unwrap();
    let server_span = got
        .iter()
        .find(|s| s.span_kind == SpanKind::Server)
        .unwrap();
    assert_eq!(server_span.span_context.trace_id().to_string(), T);
    assert_eq!(server_span.parent_span_id, SpanId::from_hex(S).unwrap());
    assert!(server_span.parent_span_is_remote);
    assert_eq!(client_span.span_context.trace_id().to_string(), T);
    assert_eq!(
        client_span.parent_span_id,
        server_span.span_context.span_id()
    );
    assert_eq!(
        sent,
        format!("00-{T}-{}-01", client_span.span_context.span_id())
    );
    assert_eq!(server_span.name, "GET");
    assert_eq!(attr(server_span, "url.path").unwrap().as_str(), "/api");
    assert_eq!(attr(server_span, "url.query").unwrap().as_str(), "q=1");
    assert_eq!(
        attr(server_span, "server.address").unwrap().as_str(),
        "front.local"
    );
    assert_eq!(
        attr(client_span, "http.response.status_code"),
        Some(&Value::I64(200))
    );
    assert_eq!(
        attr(client_span, "mesh.direction").unwrap().as_str(),
        "outbound"
    );
}

#[tokio::test]
async fn b3_parents_are_honoured_and_b3_can_be_written() {
    let (_p, exporter) = provider(Sampler::AlwaysOn);
    let echo = service_fn(|req: Request<String>| async move {
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.headers_mut() = req.headers().clone();
        Ok::<_, Infallible>(resp)
    });
    let server = ServiceBuilder::new()
        .layer(TraceLayer::server())
        .service(echo);
    for req in [
        Request::get("/").header("b3", format!("{T}-{S}-1")),
        Request::get("/")
            .header("x-b3-traceid", T)
            .header("x-b3-spanid", S)
            .header("x-b3-sampled", "1"),
    ] {
        let resp = server
            .clone()
            .oneshot(req.body(String::new()).unwrap())
            .await
            .unwrap();
        drop(resp);
    }
    let got = spans(&exporter);
    assert_eq!(got.len(), 2);
    for s in &got {
        assert_eq!(s.span_context.trace_id().to_string(), T);
        assert_eq!(s.parent_span_id.to_string(), S);
    }
    // Extraction limited to W3C ignores B3.
    let strict = ServiceBuilder::new()
        .layer(TraceLayer::server().propagation(Propagation {
            extract: Formats::W3C,
            inject: Formats::W3C,
        }))
        .service(echo);
    let req = Request::get("/").header("b3", format!("{T}-{S}-1"));
    drop(
        strict
            .oneshot(req.body(String::new()).unwrap())
            .await
            .unwrap(),
    );
    assert_ne!(spans(&exporter)[2].span_context.trace_id().to_string(), T);
    // A client writing B3 multi and W3C.
    let client = ServiceBuilder::new()
        .layer(TraceLayer::client().propagation(Propagation {
            extract: Formats::ALL,
            inject: Formats {
                w3c: true,
                b3_single: false,
                b3_multi: true,
            },
        }))
        .service(echo);
    let resp = client
        .oneshot(Request::get("http://x/").body(String::new()).unwrap())
        .await
        .unwrap();
    let h = resp.headers().clone();
    drop(resp);
    let span = spans(&exporter).pop().unwrap();
    assert_eq!(
        h["x-b3-traceid"],
        span.span_context.trace_id().to_string().as_str()
    );
    assert_eq!(
        h["x-b3-spanid"],
        span.span_context.span_id().to_string().as_str()
    );
    assert!(h.contains_key("traceparent"));
}

#[tokio::test]
async fn a_grpc_span_ends_with_the_status_in_the_trailers() {
    let (_p, exporter) = provider(Sampler::AlwaysOn);
    let grpc = service_fn(|_req: Request<String>| async move {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "14".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
            Ok(Frame::trailers(trailers)),
        ];
        let mut resp = Response::new(StreamBody::new(futures::stream::iter(frames)));
        resp.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        Ok::<_, Infallible>(resp)
    });
    let mut client = ServiceBuilder::new()
        .layer(TraceLayer::client())
        .service(grpc);
    let req = Request::post("http://greeter:50051/helloworld.Greeter/SayHello")
        .header("content-type", "application/grpc")
        .body(String::new())
        .unwrap();
    let resp = client.ready().await.unwrap().call(req).await.unwrap();
    assert!(
        spans(&exporter).is_empty(),
        "the span lasts until the body ends"
    );
    resp.into_body().collect().await.unwrap();
    let got = spans(&exporter);
    assert_eq!(got.len(), 1);
    let span = &got[0];
    assert_eq!(span.name, "helloworld.Greeter/SayHello");
    assert_eq!(attr(span, "rpc.system").unwrap().as_str(), "grpc");
    assert_eq!(
        attr(span, "rpc.service").unwrap().as_str(),
        "helloworld.Greeter"
    );
    assert_eq!(attr(span, "rpc.method").unwrap().as_str(), "SayHello");
    assert_eq!(attr(span, "rpc.grpc.status_code"), Some(&Value::I64(14)));
    assert!(matches!(span.status, Status::Error { .. }));
}

#[tokio::test]
async fn unsampled_requests_propagate_without_recording() {
    let (_p, exporter) = provider(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)));
    let echo = service_fn(|req: Request<String>| async move {
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.headers_mut() = req.headers().clone();
        Ok::<_, Infallible>(resp)
    });
    let client = ServiceBuilder::new()
        .layer(TraceLayer::client())
        .service(echo);
    // The application forwarded an unsampled parent on the request itself.
    let req = Request::get("http://x/")
        .header("traceparent", format!("00-{T}-{S}-00"))
        .body(String::new())
        .unwrap();
    let resp = client.oneshot(req).await.unwrap();
    let tp = resp.headers()["traceparent"].to_str().unwrap().to_owned();
    drop(resp);
    assert!(
        tp.starts_with(&format!("00-{T}-")) && tp.ends_with("-00"),
        "{tp}"
    );
    assert!(!tp.contains(S), "a new span id is written: {tp}");
    assert!(spans(&exporter).is_empty());
}

#[tokio::test]
async fn errors_end_the_span_with_their_kind() {
    let (_p, exporter) = provider(Sampler::AlwaysOn);
    let failing = service_fn(|_req: Request<String>| async move {
        Err::<Response<Full<Bytes>>, _>(crate::MeshError::NoRouteConfig {
            listener: "l".into(),
        })
    });
    let client = ServiceBuilder::new()
        .layer(TraceLayer::client())
        .service(failing);
    let err = client
        .oneshot(Request::get("http://x/").body(String::new()).unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no route configuration"), "{err}");
    let span = spans(&exporter).pop().unwrap();
    assert_eq!(
        attr(&span, "error.type").unwrap().as_str(),
        "no_route_config"
    );
    assert!(matches!(span.status, Status::Error { .. }));
}

/// The application's own span sits between the server span and the client span: server >
/// app (`#[instrument]`-style) > client, asserted by parent ids; and the layers were built
/// before the subscriber was installed (nothing is captured at construction).
#[tokio::test]
async fn an_app_span_between_server_and_client_and_setup_in_either_order() {
    use tracing::Instrument;
    // Built first: no subscriber exists yet.
    let client = ServiceBuilder::new()
        .layer(TraceLayer::client())
        .service(service_fn(|req: Request<String>| async move {
            let tp = req.headers()["traceparent"].to_str().unwrap().to_owned();
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(tp))))
        }));
    let handler = service_fn(move |_req: Request<String>| {
        let client = client.clone();
        async move {
            let resp = client
                .oneshot(
                    Request::get("http://backend/x")
                        .body(String::new())
                        .unwrap(),
                )
                .await
                .unwrap();
            Ok::<_, Infallible>(resp)
        }
        .instrument(tracing::info_span!("app.handler"))
    });
    let server = ServiceBuilder::new()
        .layer(TraceLayer::server())
        .service(handler);
    // Installed after the layers were built.
    let (_p, exporter) = provider(Sampler::AlwaysOn);
    let req = Request::get("http://front/")
        .header("traceparent", format!("00-{T}-{S}-01"))
        .body(String::new())
        .unwrap();
    let resp = server.oneshot(req).await.unwrap();
    let sent = resp.into_body().collect().await.unwrap().to_bytes();
    let got = spans(&exporter);
    let find = |name: &str| got.iter().find(|s| s.name == name).unwrap().clone();
    let server_span = got
        .iter()
        .find(|s| s.span_kind == SpanKind::Server)
        .unwrap();
    let app = find("app.handler");
    let client_span = got
        .iter()
        .find(|s| s.span_kind == SpanKind::Client)
        .unwrap();
    assert_eq!(got.len(), 3, "{got:#?}");
    assert_eq!(server_span.name, "GET");
    assert_eq!(server_span.parent_span_id.to_string(), S);
    assert_eq!(app.parent_span_id, server_span.span_context.span_id());
    assert_eq!(client_span.parent_span_id, app.span_context.span_id());
    for s in &got {
        assert_eq!(s.span_context.trace_id().to_string(), T);
    }
    assert_eq!(
        std::str::from_utf8(&sent).unwrap(),
        format!("00-{T}-{}-01", client_span.span_context.span_id())
    );
}

/// With no subscriber at all, nothing is recorded, yet the trace a request brought in is
/// passed on to the calls its handler makes.
#[tokio::test]
async fn with_no_subscriber_the_incoming_trace_is_passed_on() {
    let client = ServiceBuilder::new()
        .layer(TraceLayer::client())
        .service(service_fn(|req: Request<String>| async move {
            let tp = req
                .headers()
                .get("traceparent")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(tp))))
        }));
    let handler = service_fn(move |_req: Request<String>| {
        let client = client.clone();
        async move {
            Ok::<_, Infallible>(
                client
                    .oneshot(
                        Request::get("http://backend/x")
                            .body(String::new())
                            .unwrap(),
                    )
                    .await
                    .unwrap(),
            )
        }
    });
    let server = ServiceBuilder::new()
        .layer(TraceLayer::server())
        .service(handler);
    let req = Request::get("http://front/")
        .header("traceparent", format!("00-{T}-{S}-01"))
        .body(String::new())
        .unwrap();
    let resp = server.clone().oneshot(req).await.unwrap();
    let sent = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        std::str::from_utf8(&sent).unwrap(),
        format!("00-{T}-{S}-01")
    );
    // And no trace in: none out.
    let resp = server
        .oneshot(Request::get("http://front/").body(String::new()).unwrap())
        .await
        .unwrap();
    let sent = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(sent.is_empty());
}
