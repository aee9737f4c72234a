//! The admin endpoint a service starts on a local port: `/metrics` (Prometheus/OpenMetrics
//! text), `/stats` (golden signals as JSON), `/config_dump` (every xDS resource held, with
//! version, ACKED / NACKED / DOES_NOT_EXIST status and last error), `/ready` (200 once the
//! first configuration has arrived), and over gRPC on the same port the xDS Client Status
//! Discovery Service ([`Csds`], `envoy.service.status.v3.ClientStatusDiscoveryService`).
//!
//! ```no_run
//! # async fn run(client: mesh_tower::MeshClient, store: mesh_core::ConfigStore) -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9901").await?;
//! mesh_tower::admin::serve(listener, client.metrics().clone(), store, std::future::pending()).await;
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::future::Future;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use mesh_core::ConfigStore;
use serde_json::json;

use crate::error::BoxError;
use crate::metrics::{Direction, Metrics};

mod csds;

pub use csds::Csds;

type AdminBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
use crate::tls::{MeshAcceptor, TlsMode};

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// The golden signals as JSON: per direction, cluster, route and peer: requests, successes,
/// success rate, in flight, p50 / p95 / p99 latency in milliseconds.
pub fn stats_json(metrics: &Metrics) -> serde_json::Value {
    let mut out = Vec::new();
    for d in [Direction::Outbound, Direction::Inbound] {
        for l in metrics.all(d) {
            let s = &l.series;
            let total = s.total();
            let ms = |q: f64| s.quantile(q).map(|d| d.as_secs_f64() * 1000.0);
            out.push(json!({
                "direction": match d { Direction::Outbound => "outbound", Direction::Inbound => "inbound" },
                "cluster": l.cluster,
                "route": l.route,
                "peer": l.peer,
                "requests": total,
                "successes": s.successes(),
                "success_rate": if total == 0 { serde_json::Value::Null } else { json!(s.successes() as f64 / total as f64) },
                "in_flight": s.in_flight(),
                "latency_ms": {"p50": ms(0.5), "p95": ms(0.95), "p99": ms(0.99)},
                "outcomes": s.outcomes().into_iter().map(|(k, v)| (k.to_owned(), json!(v))).collect::<serde_json::Map<_, _>>(),
            }));
        }
    }
    json!({ "series": out })
}

/// What the xDS client holds, resource by resource.
pub fn config_dump_json(store: &ConfigStore) -> serde_json::Value {
    let dump = store.dump();
    let resources: Vec<serde_json::Value> = dump
        .resources
        .iter()
        .map(|r| {
            json!({
                "type": r.resource_type.type_url(),
                "name": r.name,
                "version": r.version,
                "status": r.status.as_str(),
                "error_state": r.error.as_ref().map(|e| json!({"failed_version": e.version, "details": e.error.to_string()})),
                "last_updated": r.updated.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs_f64()),
                "resource": r.raw.as_ref().and_then(|a| mesh_core::xds::file::any_to_json(a).ok()),
            })
        })
        .collect();
    json!({
        "server": dump.server,
        "connected": dump.connected,
        "last_error": dump.last_error,
        "from_cache_age_seconds": dump
            .from_cache
            .map(|saved| saved.elapsed().unwrap_or_default().as_secs()),
        "generation": store.load().generation(),
        "resources": resources,
    })
}

/// Serves the admin endpoints on `listener` (plaintext; bind it to a local address) until
/// `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    store: ConfigStore,
    shutdown: impl Future<Output = ()>,
) {
    metrics.observe_xds(&store);
    let csds = Csds::new(store.clone()).into_service();
    let app = tower::service_fn(move |req: Request<hyper::body::Incoming>| {
        let metrics = metrics.clone();
        let store = store.clone();
        let mut csds = csds.clone();
        async move {
            use http_body_util::BodyExt;
            use tower::Service;
            if req
                .uri()
                .path()
                .starts_with("/envoy.service.status.v3.ClientStatusDiscoveryService/")
            {
                // Correctness: tonic's generated server is always ready and never fails.
                let resp = match csds.call(req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                return Ok::<Response<AdminBody>, Infallible>(
                    resp.map(|b| b.map_err(BoxError::from).boxed_unsync()),
                );
            }
            let resp = match req.uri().path() {
                "/metrics" => respond(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics.render(),
                ),
                "/stats" => respond(
                    StatusCode::OK,
                    "application/json",
                    stats_json(&metrics).to_string(),
                ),
                "/config_dump" => respond(
                    StatusCode::OK,
                    "application/json",
                    config_dump_json(&store).to_string(),
                ),
                "/ready" if store.load().generation() > 0 => {
                    respond(StatusCode::OK, "text/plain", "ready\n".into())
                }
                "/ready" => respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "waiting for the first configuration\n".into(),
                ),
                _ => respond(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "try /metrics, /stats, /config_dump, /ready\n".into(),
                ),
            };
            Ok(resp.map(|b| b.map_err(|never| match never {}).boxed_unsync()))
        }
    });
    // Large answers (/metrics with many series, /config_dump) are gzipped for clients that
    // ask (Prometheus does), by tower-http; gRPC (CSDS) is left alone.
    let app = tower::Layer::layer(
        &tower_http::compression::CompressionLayer::new().gzip(true),
        app,
    );
    // Correctness: DISABLE needs no identity, so this cannot fail.
    let acceptor = MeshAcceptor::new(TlsMode::Disable, None).expect("plaintext acceptor");
    crate::server::serve(listener, acceptor, app, shutdown).await;
}
