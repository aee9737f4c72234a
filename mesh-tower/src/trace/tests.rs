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

fn provider(sampler: Sampler) -> (SdkTracerProvider, InMemorySpanExporter) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .with_sampler(sampler)
        .build();
    (provider, exporter)
}

fn tracer(p: &SdkTracerProvider) -> BoxedTracer {
    BoxedTracer::new(Box::new(p.tracer(SCOPE)))
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
    let (p, exporter) = provider(Sampler::AlwaysOn);
    let downstream = service_fn(|req: Request<String>| async move {
        let tp = req.headers()["traceparent"].to_str().unwrap().to_owned();
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(tp))))
    });
    let client = ServiceBuilder::new()
        .layer(TraceLayer::client().tracer(tracer(&p)))
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
        .layer(TraceLayer::server().tracer(tracer(&p)))
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
    let (p, exporter) = provider(Sampler::AlwaysOn);
    let echo = service_fn(|req: Request<String>| async move {
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.headers_mut() = req.headers().clone();
        Ok::<_, Infallible>(resp)
    });
    let server = ServiceBuilder::new()
        .layer(TraceLayer::server().tracer(tracer(&p)))
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
        .layer(
            TraceLayer::server()
                .tracer(tracer(&p))
                .propagation(Propagation {
                    extract: Formats::W3C,
                    inject: Formats::W3C,
                }),
        )
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
        .layer(
            TraceLayer::client()
                .tracer(tracer(&p))
                .propagation(Propagation {
                    extract: Formats::ALL,
                    inject: Formats {
                        w3c: true,
                        b3_single: false,
                        b3_multi: true,
                    },
                }),
        )
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
    let (p, exporter) = provider(Sampler::AlwaysOn);
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
        .layer(TraceLayer::client().tracer(tracer(&p)))
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
    let (p, exporter) = provider(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)));
    let echo = service_fn(|req: Request<String>| async move {
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.headers_mut() = req.headers().clone();
        Ok::<_, Infallible>(resp)
    });
    let client = ServiceBuilder::new()
        .layer(TraceLayer::client().tracer(tracer(&p)))
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
    let (p, exporter) = provider(Sampler::AlwaysOn);
    let failing = service_fn(|_req: Request<String>| async move {
        Err::<Response<Full<Bytes>>, _>(crate::MeshError::NoRouteConfig {
            listener: "l".into(),
        })
    });
    let client = ServiceBuilder::new()
        .layer(TraceLayer::client().tracer(tracer(&p)))
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
