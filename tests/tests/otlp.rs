//! OTLP export to a real OTLP receiver running in the test (mock-collector), over gRPC and
//! HTTP. Traces: across two services through the mesh, a caller's B3 parent, the frontend's
//! server span, its client span to the backend and the backend's server span form one trace.
//! Metrics: the golden signals and event counters arrive with their labels and values.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use mesh_core::xds::{Bootstrap, XdsClient};
use mesh_tower::otlp::{Otlp, Protocol};
use mesh_tower::server::InboundLayer;
use mesh_tower::tls::{MeshAcceptor, TlsMode};
use mesh_tower::MeshClient;
use mock_collector::MockServer;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tower::{Layer, ServiceExt};
use tracing::Instrument;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer as _;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn backend_yaml(port: u16) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: backend, namespace: prod}}
spec:
  hosts: [backend.prod.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: backend, namespace: prod}}
spec:
  host: backend.prod.svc.cluster.local
  trafficPolicy: {{tls: {{mode: DISABLE}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: backend, namespace: prod}}
spec:
  hosts: [backend.prod.svc.cluster.local]
  http:
  - name: backend-route
    route: [{{destination: {{host: backend.prod.svc.cluster.local}}}}]
"#
    )
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string(attrs: &[KeyValue], key: &str) -> String {
    match attr(attrs, key) {
        Some(Value::StringValue(s)) => s.clone(),
        other => panic!("{key}: {other:?}"),
    }
}

/// tracing-core treats a lone live dispatcher as the global one: while one test's is the only
/// one, a callsite first reached on a thread with none would be cached as never enabled for
/// all. A second, idle dispatcher kept alive for the whole binary makes it ask each one.
fn keep_two_dispatchers() {
    static IDLE: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    IDLE.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn one_trace_across_two_services(collector: mock_collector::Protocol, protocol: Protocol) {
    let collector = MockServer::builder()
        .protocol(collector)
        .port(0)
        .start()
        .await
        .unwrap();
    let otlp = Otlp::default()
        .protocol(protocol)
        .endpoint(format!("http://{}", collector.addr()));

    // The backend, a process of its own: its thread, its runtime, its tracing pipeline.
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let backend_otlp = otlp.clone().service_name("backend");
    let backend_process = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (layer, guard) = backend_otlp.layer().unwrap();
            keep_two_dispatchers();
            let _subscriber = tracing::subscriber::set_default(
                tracing_subscriber::registry().with(layer.with_filter(LevelFilter::INFO)),
            );
            let app = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                    "items",
                ))))
            });
            let backend = InboundLayer::new("backend").layer(app);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            port_tx.send(listener.local_addr().unwrap().port()).unwrap();
            let acceptor = MeshAcceptor::new(TlsMode::Disable, None).unwrap();
            mesh_tower::server::serve(listener, acceptor, backend, async {
                let _ = stop_rx.await;
            })
            .await;
            // Flushing blocks: off the runtime's thread.
            tokio::task::spawn_blocking(move || drop(guard))
                .await
                .unwrap();
        });
    });
    let backend_port = port_rx.recv().unwrap();
    let acceptor = MeshAcceptor::new(TlsMode::Disable, None).unwrap();

    // The frontend's mesh client, configured over xDS.
    let (_, xds_addr) = support::control_plane(&backend_yaml(backend_port), "backend.yaml").await;
    let xds = XdsClient::builder(Bootstrap::new(xds_addr.to_string(), "frontend"))
        .build()
        .unwrap();
    let target = "xds:///backend.prod.svc.cluster.local:80";
    xds.listener(target, Duration::from_secs(15)).await.unwrap();
    xds.store()
        .wait_for(Duration::from_secs(15), |s| {
            s.endpoints_for_cluster("outbound|80||backend.prod.svc.cluster.local")
                .is_some()
        })
        .await
        .unwrap();
    // Built before the frontend's tracing pipeline exists: nothing is captured at
    // construction, so the order of setup does not matter.
    let client = MeshClient::builder(xds.store().clone(), target)
        .unwrap()
        .build();

    // The frontend: its handler, in a span of the application's own, calls the backend
    // through the mesh client.
    let app = tower::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
        let client = client.clone();
        async move {
            let req = http::Request::get("http://backend.prod.svc.cluster.local/items")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = client.oneshot(req).await?;
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, mesh_tower::BoxError>(http::Response::new(Full::new(body)))
        }
        .instrument(tracing::info_span!("list_items"))
    });
    let frontend = InboundLayer::new("frontend").layer(app);
    // Now the frontend's pipeline (this test's thread is the frontend's process).
    let (layer, frontend_guard) = otlp.service_name("frontend").layer().unwrap();
    keep_two_dispatchers();
    let _subscriber = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(layer.with_filter(LevelFilter::INFO)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let frontend_addr = listener.local_addr().unwrap();
    tokio::spawn(mesh_tower::server::serve(
        listener,
        acceptor,
        frontend,
        std::future::pending(),
    ));

    // A caller with a B3 parent.
    let req = http::Request::get(format!("http://{frontend_addr}/"))
        .header("host", "frontend")
        .header("b3", format!("{TRACE}-{PARENT}-1"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = support::client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        "items"
    );

    tokio::task::spawn_blocking(move || drop(frontend_guard))
        .await
        .unwrap();
    stop_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || backend_process.join().unwrap())
        .await
        .unwrap();
    collector
        .wait_for_spans(4, Duration::from_secs(15))
        .await
        .unwrap();
    let spans = collector.with_collector(|c| c.spans().to_vec()).await;
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let find = |service: &str, kind: SpanKind| {
        spans
            .iter()
            .find(|s| {
                string(s.resource_attrs(), "service.name") == service
                    && s.span().kind == kind as i32
            })
            .unwrap_or_else(|| panic!("no {kind:?} span of {service}: {spans:#?}"))
            .span()
    };
    let frontend_server = find("frontend", SpanKind::Server);
    let frontend_client = find("frontend", SpanKind::Client);
    let backend_server = find("backend", SpanKind::Server);
    let app_span = find("frontend", SpanKind::Internal);
    assert_eq!(app_span.name, "list_items");
    // The tree, for the record (`-- --nocapture`).
    for s in [frontend_server, app_span, frontend_client, backend_server] {
        println!(
            "trace {} span {} parent {} {:?} {}",
            hex(&s.trace_id),
            hex(&s.span_id),
            hex(&s.parent_span_id),
            SpanKind::try_from(s.kind).unwrap_or(SpanKind::Unspecified),
            s.name
        );
    }
    for s in [frontend_server, app_span, frontend_client, backend_server] {
        assert_eq!(hex(&s.trace_id), TRACE, "{}", s.name);
    }
    assert_eq!(
        hex(&frontend_server.parent_span_id),
        PARENT,
        "the B3 parent"
    );
    // frontend server > the application's span > mesh client > backend server.
    assert_eq!(app_span.parent_span_id, frontend_server.span_id);
    assert_eq!(frontend_client.parent_span_id, app_span.span_id);
    assert_eq!(backend_server.parent_span_id, frontend_client.span_id);

    assert_eq!(frontend_server.name, "GET");
    assert_eq!(
        string(&frontend_server.attributes, "mesh.direction"),
        "inbound"
    );
    assert_eq!(
        string(&frontend_server.attributes, "client.address"),
        "127.0.0.1"
    );
    let c = &frontend_client.attributes;
    assert_eq!(string(c, "http.request.method"), "GET");
    assert_eq!(
        string(c, "server.address"),
        "backend.prod.svc.cluster.local"
    );
    assert_eq!(string(c, "url.path"), "/items");
    assert_eq!(
        attr(c, "http.response.status_code"),
        Some(&Value::IntValue(200))
    );
    assert_eq!(string(c, "mesh.route"), "backend-route");
    assert_eq!(
        string(c, "mesh.cluster"),
        "outbound|80||backend.prod.svc.cluster.local"
    );
    assert_eq!(
        string(c, "mesh.endpoint"),
        format!("127.0.0.1:{backend_port}")
    );
    assert_eq!(attr(c, "mesh.retry.attempts"), Some(&Value::IntValue(1)));
    assert_eq!(string(&backend_server.attributes, "url.path"), "/items");
    assert!(frontend_client.start_time_unix_nano >= frontend_server.start_time_unix_nano);
    assert!(frontend_client.end_time_unix_nano <= frontend_server.end_time_unix_nano);
    collector.shutdown().await.unwrap();
}

#[tokio::test]
async fn one_trace_across_two_services_over_otlp_grpc() {
    one_trace_across_two_services(mock_collector::Protocol::Grpc, Protocol::Grpc).await;
}

#[tokio::test]
async fn one_trace_across_two_services_over_otlp_http() {
    one_trace_across_two_services(mock_collector::Protocol::HttpBinary, Protocol::HttpProtobuf)
        .await;
}

async fn golden_signals_over_otlp(collector: mock_collector::Protocol, protocol: Protocol) {
    use mesh_tower::metrics::{Direction, Metrics, Outcome};
    let collector = MockServer::builder()
        .protocol(collector)
        .port(0)
        .start()
        .await
        .unwrap();
    let metrics = Metrics::default();
    let s = metrics.series(
        Direction::Outbound,
        "reviews-route",
        "outbound|80|v2|reviews",
    );
    for _ in 0..3 {
        s.record(Outcome::Http(200), Duration::from_millis(4));
    }
    s.record(Outcome::Http(503), Duration::from_millis(40));
    let inbound = metrics.series_with_peer(
        Direction::Inbound,
        "",
        "reviews",
        "spiffe://cluster.local/ns/prod/sa/frontend",
    );
    inbound.record(Outcome::Grpc(14), Duration::from_millis(2));
    metrics
        .counters()
        .retries
        .fetch_add(2, std::sync::atomic::Ordering::Relaxed);
    let guard = Otlp::default()
        .protocol(protocol)
        .endpoint(format!("http://{}", collector.addr()))
        .service_name("reviews")
        .export_metrics(&metrics, Duration::from_secs(3600))
        .unwrap();
    let provider = guard.provider().clone();
    tokio::task::spawn_blocking(move || provider.force_flush().unwrap())
        .await
        .unwrap();
    collector
        .wait_for_metrics(1, Duration::from_secs(15))
        .await
        .unwrap();
    collector
        .with_collector(|c| {
            c.expect_metric_with_name("mesh.requests")
                .with_attributes([
                    ("direction", "outbound"),
                    ("route", "reviews-route"),
                    ("cluster", "outbound|80|v2|reviews"),
                    ("outcome", "2xx"),
                ])
                .with_resource_attributes([("service.name", "reviews")])
                .with_value_eq(3)
                .assert_exists();
            c.expect_metric_with_name("mesh.requests")
                .with_attributes([("cluster", "outbound|80|v2|reviews"), ("outcome", "5xx")])
                .with_value_eq(1)
                .assert_exists();
            c.expect_metric_with_name("mesh.requests")
                .with_attributes([
                    ("direction", "inbound"),
                    ("peer", "spiffe://cluster.local/ns/prod/sa/frontend"),
                    ("outcome", "UNAVAILABLE"),
                ])
                .with_value_eq(1)
                .assert_exists();
            c.expect_metric_with_name("mesh.request.duration.count")
                .with_attributes([("cluster", "outbound|80|v2|reviews")])
                .with_value_eq(4)
                .assert_exists();
            c.expect_metric_with_name("mesh.request.duration.sum")
                .with_attributes([("cluster", "outbound|80|v2|reviews")])
                .with_value_eq(0.052)
                .assert_exists();
            c.expect_metric_with_name("mesh.request.duration.p99")
                .with_attributes([("cluster", "outbound|80|v2|reviews")])
                .assert_exists();
            c.expect_metric_with_name("mesh.retries")
                .with_value_eq(2)
                .assert_exists();
            c.expect_metric_with_name("mesh.requests")
                .with_attributes([("outcome", "OK")])
                .assert_not_exists();
        })
        .await;
    drop(guard);
    collector.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_signals_over_otlp_grpc() {
    golden_signals_over_otlp(mock_collector::Protocol::Grpc, Protocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_signals_over_otlp_http() {
    golden_signals_over_otlp(mock_collector::Protocol::HttpBinary, Protocol::HttpProtobuf).await;
}
