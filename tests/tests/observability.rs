//! Golden signals and the admin endpoint, through real traffic configured from Istio YAML:
//! a known mix of successes, 5xx with retries, and breaker overflows.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh_control::ads::ResourceCache;
use mesh_control::istio::{self, Options};
use mesh_core::xds::{Bootstrap, XdsClient};
use mesh_core::ConfigStore;
use mesh_tower::metrics::Metrics;
use mesh_tower::MeshClient;
use tower::ServiceExt;

async fn backend(status: u16, delay: Duration) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(
                    move |_req: http::Request<hyper::body::Incoming>| async move {
                        tokio::time::sleep(delay).await;
                        let mut r = http::Response::new(Full::new(Bytes::from_static(b"x")));
                        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(r)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    port
}

fn service(name: &str, port: u16, vs_http: &str, pool: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: {name}, namespace: prod}}
spec:
  hosts: [{name}.prod.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: {name}, namespace: prod}}
spec:
  host: {name}.prod.svc.cluster.local
  trafficPolicy: {{tls: {{mode: DISABLE}}{pool}}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: {name}, namespace: prod}}
spec:
  hosts: [{name}.prod.svc.cluster.local]
  http:
  - name: {name}-route
    {vs_http}
    route: [{{destination: {{host: {name}.prod.svc.cluster.local}}}}]
---
"#
    )
}

async fn send(client: &MeshClient, host: &str) -> Result<u16, String> {
    let req = http::Request::get(format!("http://{host}/"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    match client.clone().oneshot(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            Ok(status)
        }
        Err(e) => Err(e.to_string()),
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let client = support::client();
    support::get(&client, addr, "admin", path).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_signals_and_admin_endpoint() {
    let ok = backend(200, Duration::ZERO).await;
    let flaky = backend(503, Duration::ZERO).await;
    let slow = backend(200, Duration::from_millis(200)).await;
    let yaml = service("ok", ok, "retries: {attempts: 0}", "")
        + &service("flaky", flaky, "retries: {attempts: 1, retryOn: 5xx}", "")
        + &service(
            "slow",
            slow,
            "retries: {attempts: 0}",
            ", connectionPool: {http: {http2MaxRequests: 1}}",
        );
    let generated = istio::generate(
        &istio::parse(&yaml, "mix.yaml").unwrap(),
        &Options::default(),
    )
    .unwrap();
    let cache = ResourceCache::new();
    cache.set_resources(generated.resources.clone());
    let xds_addr = support::ads_server(&cache).await;

    let xds = XdsClient::builder(Bootstrap::new(xds_addr.to_string(), "observed"))
        .build()
        .unwrap();
    let store = xds.store().clone();
    // The admin endpoint is up before any configuration: /ready says 503.
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = admin_listener.local_addr().unwrap();
    let metrics = Metrics::default();
    tokio::spawn(mesh_tower::admin::serve(
        admin_listener,
        metrics.clone(),
        store.clone(),
        std::future::pending(),
    ));
    assert_eq!(http_get(admin, "/ready").await.0, 503);

    let mut clients = Vec::new();
    for name in ["ok", "flaky", "slow"] {
        let target = format!("xds:///{name}.prod.svc.cluster.local:80");
        xds.listener(&target, Duration::from_secs(15))
            .await
            .unwrap();
        store
            .wait_for(Duration::from_secs(15), |s| {
                s.endpoints_for_cluster(&format!("outbound|80||{name}.prod.svc.cluster.local"))
                    .is_some()
            })
            .await
            .unwrap();
        clients.push(
            MeshClient::builder(store.clone(), &target)
                .unwrap()
                .metrics(metrics.clone())
                .build(),
        );
    }
    assert_eq!(http_get(admin, "/ready").await.0, 200);

    for _ in 0..20 {
        assert_eq!(
            send(&clients[0], "ok.prod.svc.cluster.local").await,
            Ok(200)
        );
    }
    for _ in 0..10 {
        assert_eq!(
            send(&clients[1], "flaky.prod.svc.cluster.local").await,
            Ok(503)
        );
    }
    let slow_results =
        futures::future::join_all((0..3).map(|_| send(&clients[2], "slow.prod.svc.cluster.local")))
            .await;
    assert_eq!(
        slow_results.iter().filter(|r| **r == Ok(200)).count(),
        1,
        "{slow_results:?}"
    );

    // The signals, as /stats reports them.
    let (status, body) = http_get(admin, "/stats").await;
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    let series = |cluster: &str| {
        stats["series"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["cluster"] == cluster)
            .cloned()
            .unwrap_or_else(|| panic!("no series for {cluster}: {stats}"))
    };
    let ok_s = series("outbound|80||ok.prod.svc.cluster.local");
    assert_eq!(
        (ok_s["requests"].as_u64(), ok_s["success_rate"].as_f64()),
        (Some(20), Some(1.0))
    );
    assert_eq!(ok_s["route"], "ok-route");
    let flaky_s = series("outbound|80||flaky.prod.svc.cluster.local");
    assert_eq!(
        (
            flaky_s["requests"].as_u64(),
            flaky_s["outcomes"]["5xx"].as_u64()
        ),
        (Some(10), Some(10))
    );
    assert_eq!(flaky_s["success_rate"].as_f64(), Some(0.0));
    let slow_s = series("outbound|80||slow.prod.svc.cluster.local");
    assert_eq!(
        (
            slow_s["outcomes"]["2xx"].as_u64(),
            slow_s["outcomes"]["error"].as_u64()
        ),
        (Some(1), Some(2))
    );
    assert!(
        slow_s["latency_ms"]["p99"].as_f64().unwrap() >= 100.0,
        "{slow_s}"
    );

    // The same in Prometheus text, which parses and carries only bounded labels.
    let (_, text) = http_get(admin, "/metrics").await;
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let counter = |name: &str| {
        parsed
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => -1.0,
            })
    };
    assert_eq!(
        counter("mesh_retries_total"),
        Some(10.0),
        "one retry per flaky request"
    );
    assert_eq!(counter("mesh_breaker_overflows_total"), Some(2.0));
    for s in &parsed.samples {
        for (k, v) in s.labels.iter() {
            assert!(
                ["direction", "route", "cluster", "peer", "outcome", "le"].contains(&k.as_str()),
                "unbounded label {k}"
            );
            // Peers are workload identities, never addresses.
            if k == "peer" {
                assert!(v.is_empty() || v.starts_with("spiffe://"), "peer {v:?}");
            }
        }
    }

    // /config_dump: every resource ACKED; then a bad push is NACKED with its error.
    let (_, dump) = http_get(admin, "/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert!(
        dump["resources"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "ACKED"),
        "{dump}"
    );
    let mut bad = generated.resources.clone();
    for any in bad
        .iter_mut()
        .filter(|a| a.type_url.ends_with("RouteConfiguration"))
    {
        use prost::Message;
        let mut rc = envoy_types::pb::envoy::config::route::v3::RouteConfiguration::decode(
            any.value.as_slice(),
        )
        .unwrap();
        if rc.name.starts_with("ok.") {
            rc.virtual_hosts[0].domains = vec!["a*b".into()];
            any.value = rc.encode_to_vec();
        }
    }
    cache.set_resources(bad);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let nacked = loop {
        let (_, dump) = http_get(admin, "/config_dump").await;
        let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
        if let Some(r) = dump["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["status"] == "NACKED")
        {
            break r.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no NACK in /config_dump"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(nacked["name"], "ok.prod.svc.cluster.local:80");
    let (_, text) = http_get(admin, "/metrics").await;
    let counter = |name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(counter("mesh_xds_nacks_total"), 1.0, "{text}");
    assert!(
        counter("mesh_xds_updates_total") >= 4.0,
        "LDS, RDS, CDS, EDS at least"
    );
    let details = nacked["error_state"]["details"].as_str().unwrap();
    assert!(details.contains("virtual_hosts[0].domains[0]"), "{details}");
    assert!(
        nacked["resource"]["virtual_hosts"].is_array(),
        "the last good resource is still shown"
    );
    // The same state over CSDS (gRPC on the admin port), unary and streaming.
    {
        use envoy_types::pb::envoy::admin::v3::ClientResourceStatus;
        use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
        use envoy_types::pb::envoy::service::status::v3::ClientStatusRequest;
        let mut csds = ClientStatusDiscoveryServiceClient::connect(format!("http://{admin}"))
            .await
            .unwrap();
        let resp = csds
            .fetch_client_status(ClientStatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.config.len(), 1);
        let config = &resp.config[0];
        assert_eq!(config.node.as_ref().unwrap().id, "observed");
        let nacked = config
            .generic_xds_configs
            .iter()
            .find(|c| c.client_status == ClientResourceStatus::Nacked as i32)
            .expect("a NACKED resource");
        assert_eq!(nacked.name, "ok.prod.svc.cluster.local:80");
        assert!(nacked.type_url.ends_with("RouteConfiguration"));
        let error = nacked.error_state.as_ref().unwrap();
        assert!(
            error.details.contains("virtual_hosts[0].domains[0]"),
            "{error:?}"
        );
        assert!(!error.version_info.is_empty());
        assert!(
            nacked
                .xds_config
                .as_ref()
                .unwrap()
                .type_url
                .ends_with("RouteConfiguration"),
            "the last good resource"
        );
        let acked = config
            .generic_xds_configs
            .iter()
            .filter(|c| c.client_status == ClientResourceStatus::Acked as i32)
            .count();
        assert!(acked >= 3, "{config:?}");
        // Streaming: one response per request; contents excluded on request.
        let requests = futures::stream::iter([ClientStatusRequest {
            exclude_resource_contents: true,
            ..Default::default()
        }]);
        let mut stream = csds
            .stream_client_status(requests)
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(
            first.config[0].generic_xds_configs.len(),
            config.generic_xds_configs.len()
        );
        assert!(first.config[0]
            .generic_xds_configs
            .iter()
            .all(|c| c.xds_config.is_none()));
        // Node matchers are refused with a clear status.
        let err = csds
            .fetch_client_status(ClientStatusRequest {
                node_matchers: vec![Default::default()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
    // Ready flips only with the first configuration: a fresh store is not ready.
    let fresh = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fresh_addr = fresh.local_addr().unwrap();
    tokio::spawn(mesh_tower::admin::serve(
        fresh,
        Metrics::default(),
        ConfigStore::new(),
        std::future::pending(),
    ));
    assert_eq!(http_get(fresh_addr, "/ready").await.0, 503);
}

/// Collects what a `tracing` JSON subscriber writes.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn access_logs_are_structured_and_filtered() {
    use mesh_tower::metrics::AccessLog;
    let ok = backend(200, Duration::ZERO).await;
    let failing = backend(500, Duration::ZERO).await;
    let yaml = service("ok", ok, "retries: {attempts: 0}", "")
        + &service("bad", failing, "retries: {attempts: 0}", "");
    let (_, xds_addr) = support::control_plane(&yaml, "log.yaml").await;
    let xds = XdsClient::builder(Bootstrap::new(xds_addr.to_string(), "logged"))
        .build()
        .unwrap();
    let mut clients = Vec::new();
    for (name, errors_only) in [("ok", false), ("bad", true)] {
        let target = format!("xds:///{name}.prod.svc.cluster.local:80");
        xds.listener(&target, Duration::from_secs(15))
            .await
            .unwrap();
        xds.store()
            .wait_for(Duration::from_secs(15), |s| {
                s.endpoints_for_cluster(&format!("outbound|80||{name}.prod.svc.cluster.local"))
                    .is_some()
            })
            .await
            .unwrap();
        clients.push(
            MeshClient::builder(xds.store().clone(), &target)
                .unwrap()
                .access_log(AccessLog {
                    sample: 1.0,
                    errors_only,
                })
                .build(),
        );
    }
    let unlogged = MeshClient::builder(xds.store().clone(), "xds:///ok.prod.svc.cluster.local:80")
        .unwrap()
        .build();
    let ok_target = "xds:///ok.prod.svc.cluster.local:80";
    let errors_only = MeshClient::builder(xds.store().clone(), ok_target)
        .unwrap()
        .access_log(AccessLog {
            sample: 1.0,
            errors_only: true,
        })
        .build();
    let unsampled = MeshClient::builder(xds.store().clone(), ok_target)
        .unwrap()
        .access_log(AccessLog {
            sample: 0.0,
            errors_only: false,
        })
        .build();
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(move || writer.clone())
        .with_env_filter("mesh::access=info")
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    assert_eq!(
        send(&clients[0], "ok.prod.svc.cluster.local").await,
        Ok(200)
    );
    assert_eq!(
        send(&clients[1], "bad.prod.svc.cluster.local").await,
        Ok(500)
    );
    assert_eq!(send(&unlogged, "ok.prod.svc.cluster.local").await, Ok(200));
    assert_eq!(
        send(&errors_only, "ok.prod.svc.cluster.local").await,
        Ok(200)
    );
    assert_eq!(send(&unsampled, "ok.prod.svc.cluster.local").await, Ok(200));
    drop(_guard);
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        2,
        "one line per logged request; off by default: {text}"
    );
    let f = &lines[0]["fields"];
    assert_eq!(f["direction"], "outbound");
    assert_eq!(f["method"], "GET");
    assert_eq!(f["path"], "/");
    assert_eq!(f["status"], 200);
    assert_eq!(f["route"], "ok-route");
    assert_eq!(f["cluster"], "outbound|80||ok.prod.svc.cluster.local");
    assert!(f["duration_ms"].as_f64().is_some());
    assert_eq!(f["endpoint"], format!("127.0.0.1:{ok}"));
    assert_eq!(f["authority"], "ok.prod.svc.cluster.local");
    assert_eq!(
        lines[1]["fields"]["status"], 500,
        "errors_only still logs failures"
    );

    // Credentials are never logged: not by the access log, not in the mesh's request spans
    // (the mesh also marks them sensitive, so a header map printed with Debug hides them:
    // tests/tower_http.rs checks the application sees them marked).
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(move || writer.clone())
        .with_env_filter("info")
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let req = http::Request::get("http://ok.prod.svc.cluster.local/items?page=2")
        .header("authorization", "Bearer t0ken-in-header")
        .header("cookie", "session=c00kie-value")
        .header("proxy-authorization", "Basic pr0xy")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = clients[0].clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;
    drop(_guard);
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("\"path\":\"/items\""),
        "the request was logged: {text}"
    );
    for secret in ["t0ken", "c00kie", "pr0xy"] {
        assert!(!text.contains(secret), "{secret} logged: {text}");
    }
}

/// A client built with an identity exposes its certificate's remaining lifetime and the
/// handshakes that presented it expired.
#[tokio::test]
async fn the_workload_certificate_lifetime_is_a_metric() {
    let ca = mesh_control::ca::DevCa::new("cluster.local").unwrap();
    let identity = mesh_core::identity::IdentityStore::new(
        ca.workload_identity("prod", "frontend", Duration::from_secs(3600))
            .unwrap(),
    );
    let metrics = Metrics::default();
    let client = MeshClient::builder(ConfigStore::new(), "xds:///svc:80")
        .unwrap()
        .identity(identity)
        .metrics(metrics.clone())
        .build();
    let text = metrics.render();
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    };
    let left = value("mesh_identity_expiry_seconds");
    assert!((3500.0..=3600.0).contains(&left), "{left}");
    assert_eq!(value("mesh_identity_expired_handshakes_total"), 0.0);
    drop(client);
}
