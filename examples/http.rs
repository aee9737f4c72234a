//! # http: hyper services with the mesh layers, no tonic
//!
//! `cargo run -p mesh-examples --bin http -- [--requests N]`
//!
//! One process, three parts, all on 127.0.0.1:
//! - a control plane (`mesh-control`, in-process) serving Istio-style YAML for `backend`;
//! - `backend`: a hyper server behind the inbound stack (`InboundLayer`: server span,
//!   metrics, authorization) served by `mesh_tower::server::serve`;
//! - `frontend`: the same inbound stack; its handler calls `backend` through a `MeshClient`
//!   configured over xDS (route, retries, balancing, metrics, client span).
//!
//! The example sends N requests to `frontend` (default 20), prints what each returned, the
//! golden signals from the admin endpoint, and exits.
//!
//! Traces: set `OTEL_EXPORTER_OTLP_ENDPOINT` (e.g. `http://localhost:4318`, with
//! `OTEL_EXPORTER_OTLP_PROTOCOL` `http/protobuf` or `grpc`) and each request becomes one
//! trace (service `http-example`): frontend server span > client span > backend server span (see `examples/compose.yaml` for Jaeger).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use mesh_control::ads::{AdsServer, ResourceCache};
use mesh_control::istio::{self, Options};
use mesh_core::xds::{Bootstrap, XdsClient};
use mesh_tower::metrics::Metrics;
use mesh_tower::otlp::Otlp;
use mesh_tower::server::InboundLayer;
use mesh_tower::tls::{MeshAcceptor, TlsMode};
use mesh_tower::trace::TraceLayer;
use mesh_tower::MeshClient;
use tower::{Layer, ServiceExt};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const TARGET: &str = "xds:///backend.prod.svc.cluster.local:80";

fn config(backend_port: u16) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: backend, namespace: prod}}
spec:
  hosts: [backend.prod.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {backend_port}}}}}]
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
    retries: {{attempts: 2, retryOn: 5xx}}
    route: [{{destination: {{host: backend.prod.svc.cluster.local}}}}]
"#
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut requests = 20u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--requests" => {
                requests = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or("--requests needs a number")?;
            }
            other => return Err(format!("unknown argument {other:?}; try --requests N").into()),
        }
    }

    // Traces go to OTLP only when a collector is configured: one pipeline for the process
    // (the mesh's spans are `tracing` spans, exported by tracing-opentelemetry).
    let _traces = match std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Some(_) => {
            let guard = Otlp::try_from_env()?
                .service_name("http-example")
                .install()?;
            println!(
                "exporting traces to {:?}",
                std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")?
            );
            Some(guard)
        }
        None => None,
    };

    // backend: answers with the version it runs, behind the inbound stack.
    let backend_metrics = Metrics::default();
    let app = tower::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
        let body = format!("backend v1 served {}\n", req.uri().path());
        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
    });
    let backend = InboundLayer::new("backend")
        .metrics(backend_metrics.clone())
        .trace(TraceLayer::server())
        .layer(app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let backend_port = listener.local_addr()?.port();
    let plaintext = MeshAcceptor::new(TlsMode::Disable, None)?;
    tokio::spawn(mesh_tower::server::serve(
        listener,
        plaintext.clone(),
        backend,
        std::future::pending(),
    ));

    // The control plane, loaded with Istio-style YAML.
    let show = |errors: Vec<istio::ConfigError>| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let parsed = istio::parse(&config(backend_port), "http-example.yaml").map_err(show)?;
    let generated = istio::generate(&parsed, &Options::default()).map_err(show)?;
    let cache = ResourceCache::new();
    cache.set_resources(generated.resources);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let xds_addr = listener.local_addr()?;
    tokio::spawn(AdsServer::new(cache).serve(listener, std::future::pending()));

    // frontend: its mesh client gets its configuration over xDS.
    let xds = XdsClient::builder(Bootstrap::new(xds_addr.to_string(), "frontend")).build()?;
    xds.listener(TARGET, Duration::from_secs(10)).await?;
    xds.store()
        .wait_for(Duration::from_secs(10), |s| {
            s.endpoints_for_cluster("outbound|80||backend.prod.svc.cluster.local")
                .is_some()
        })
        .await
        .map_err(|_| "the backend's endpoints did not arrive")?;
    let frontend_metrics = Metrics::default();
    let client = MeshClient::builder(xds.store().clone(), TARGET)?
        .metrics(frontend_metrics.clone())
        .trace(TraceLayer::client())
        .build();
    let app = tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let client = client.clone();
        async move {
            let call = http::Request::get(format!(
                "http://backend.prod.svc.cluster.local{}",
                req.uri().path()
            ))
            .body(Empty::<Bytes>::new())?;
            let resp = client.oneshot(call).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            let mut out = http::Response::new(Full::new(body));
            *out.status_mut() = status;
            Ok::<_, mesh_tower::BoxError>(out)
        }
    });
    let frontend = InboundLayer::new("frontend")
        .metrics(frontend_metrics.clone())
        .trace(TraceLayer::server())
        .layer(app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let frontend_addr = listener.local_addr()?;
    tokio::spawn(mesh_tower::server::serve(
        listener,
        plaintext,
        frontend,
        std::future::pending(),
    ));
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let admin_addr = admin.local_addr()?;
    tokio::spawn(mesh_tower::admin::serve(
        admin,
        frontend_metrics.clone(),
        xds.store().clone(),
        std::future::pending(),
    ));
    println!("frontend on {frontend_addr}, its admin endpoint on http://{admin_addr}/ (/metrics, /stats, /config_dump)");

    // A plain HTTP client calls the frontend.
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let mut ok = 0;
    for i in 0..requests {
        let req =
            http::Request::get(format!("http://{frontend_addr}/items/{i}")).body(Empty::new())?;
        let resp = http.request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if status.is_success() {
            ok += 1;
        }
        print!("{status} {}", String::from_utf8_lossy(&body));
    }
    println!("\n{ok}/{requests} succeeded");

    println!(
        "\n{:<9} {:<9} {:<44} {:>8} {:>8} {:>8}",
        "SERVICE", "DIRECTION", "CLUSTER", "REQUESTS", "SUCCESS", "P99_MS"
    );
    for (service, metrics) in [
        ("frontend", &frontend_metrics),
        ("backend", &backend_metrics),
    ] {
        let stats = mesh_tower::admin::stats_json(metrics);
        for s in stats["series"].as_array().into_iter().flatten() {
            println!(
                "{service:<9} {:<9} {:<44} {:>8} {:>8} {:>8}",
                s["direction"].as_str().unwrap_or_default(),
                s["cluster"].as_str().unwrap_or_default(),
                s["requests"].as_u64().unwrap_or(0),
                s["success_rate"]
                    .as_f64()
                    .map_or("-".into(), |r| format!("{:.0}%", r * 100.0)),
                s["latency_ms"]["p99"]
                    .as_f64()
                    .map_or("-".into(), |v| format!("{v:.1}")),
            );
        }
    }
    if let Some(guard) = _traces {
        // Flushing blocks: off the runtime's thread.
        tokio::task::spawn_blocking(move || drop(guard)).await?;
    }
    if ok != requests {
        return Err(format!("{} requests failed", requests - ok).into());
    }
    Ok(())
}
