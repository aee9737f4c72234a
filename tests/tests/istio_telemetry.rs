//! Istio's telemetry, checked by a real Prometheus: two meshed services (frontend calls
//! backend over mTLS) with Istio's metrics turned on, under load with a known error rate
//! (every tenth backend answer is a 500), scraped by a Prometheus server this test starts;
//! then the PromQL of Istio's own service and workload dashboards (vendored under
//! `fixtures/istio/dashboards/`, Grafana variables substituted) runs through Prometheus's
//! HTTP API: every request panel answers, and the answers are right (volume, success rate
//! within 1 % of the injected error rate, duration quantiles, request and response sizes,
//! by source and by destination).
//!
//! Needs the `prometheus` binary (Debian package `prometheus`; `.ci/run` installs it):
//! `cargo test -p mesh-tests --test istio_telemetry -- --ignored --nocapture`
//! (`MESH_PROMETHEUS` names another binary).

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mesh_control::ca::DevCa;
use mesh_core::identity::IdentityStore;
use mesh_core::xds::{Bootstrap, XdsClient};
use mesh_tower::metrics::{Metrics, Workload};
use mesh_tower::server::InboundLayer;
use mesh_tower::tls::{MeshAcceptor, TlsMode};
use mesh_tower::MeshClient;
use tower::{Layer, ServiceExt};

const HOST: &str = "backend.prod.svc.cluster.local";
const RPS: u64 = 200;
const LOAD: Duration = Duration::from_secs(10);
const REQUEST_BYTES: usize = 50;
const RESPONSE_BYTES: usize = 100;

fn yaml(port: u16) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: backend, namespace: prod}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}, serviceAccount: backend}}]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: backend, namespace: prod}}
spec:
  host: {HOST}
  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: backend, namespace: prod}}
spec:
  hosts: [{HOST}]
  http:
  - name: backend
    retries: {{attempts: 0}}
    route: [{{destination: {{host: {HOST}}}}}]
"#
    )
}

/// The workload as Istio's injector describes it in the node metadata of the bootstrap.
fn workload(name: &str, app: &str) -> Workload {
    let json = format!(
        r#"{{"xds_servers": [{{"server_uri": "127.0.0.1:1", "channel_creds": [{{"type": "insecure"}}]}}],
            "node": {{"id": "sidecar~127.0.0.1~{name}-7d4f.prod~prod.svc.cluster.local",
                     "metadata": {{"WORKLOAD_NAME": "{name}", "NAMESPACE": "prod",
                                   "CLUSTER_ID": "Kubernetes",
                                   "LABELS": {{"app": "{app}", "version": "v1"}}}}}}}}"#
    );
    let bootstrap = Bootstrap::from_json(&json, "bootstrap.json").unwrap();
    Workload::from_node(&bootstrap.node)
        .principal(format!("spiffe://cluster.local/ns/prod/sa/{app}"))
}

fn identity(ca: &DevCa, sa: &str) -> IdentityStore {
    IdentityStore::new(
        ca.workload_identity("prod", sa, Duration::from_secs(3600))
            .unwrap(),
    )
}

async fn admin(metrics: Metrics, store: mesh_core::ConfigStore) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(mesh_tower::admin::serve(
        listener,
        metrics,
        store,
        std::future::pending(),
    ));
    addr
}

struct Prometheus {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn prometheus(targets: &[std::net::SocketAddr]) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    let config = format!(
        "global: {{scrape_interval: 1s, scrape_timeout: 900ms, evaluation_interval: 1s}}\n\
         scrape_configs:\n\
         - job_name: mesh\n  metrics_path: /metrics\n  static_configs:\n  - targets: [{}]\n",
        targets.join(", ")
    );
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let bin = std::env::var("MESH_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    let child = std::process::Command::new(bin)
        .arg(format!("--config.file={}", path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--log.level=warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("the prometheus binary (Debian package `prometheus`, or MESH_PROMETHEUS)");
    let p = Prometheus {
        child,
        addr,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = get(&p.addr, "/-/ready").await {
            break;
        }
        assert!(Instant::now() < deadline, "prometheus did not become ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    p
}

async fn get(addr: &str, path_and_query: &str) -> Result<(u16, String), String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let resp = client
        .request(
            http::Request::get(format!("http://{addr}{path_and_query}"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Runs `query` at `time` (Unix seconds) through the HTTP API: the result vector.
async fn query(prom: &Prometheus, query: &str, time: f64) -> Vec<serde_json::Value> {
    let q: String = url_encode(query);
    let (status, body) = get(
        &prom.addr,
        &format!("/api/v1/query?query={q}&time={time:.3}"),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{query}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "success", "{query}: {body}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A panel's queries from a vendored dashboard: (title, expr), TCP panels left out (the
/// mesh speaks HTTP and gRPC).
fn panels(file: &str) -> Vec<(String, String)> {
    let path = format!(
        "{}/../fixtures/istio/dashboards/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    fn walk(v: &serde_json::Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                let t = m.get("title").and_then(|t| t.as_str()).unwrap_or(title);
                if let Some(e) = m.get("expr").and_then(|e| e.as_str()) {
                    out.push((t.to_owned(), e.to_owned()));
                }
                for v in m.values() {
                    walk(v, t, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, title, out)),
            _ => {}
        }
    }
    walk(&d, "", &mut out);
    out.retain(|(t, e)| !t.contains("TCP") && !e.contains("istio_tcp"));
    out
}

/// Grafana's variables substituted ("All" is `.*`).
fn substitute(expr: &str, vars: &[(&str, &str)]) -> String {
    let mut e = expr.replace("$__rate_interval", "5s");
    // Longest names first, so `$srcns` is not read as `$src` + `ns`.
    let mut vars = vars.to_vec();
    vars.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    for (k, v) in vars {
        e = e.replace(&format!("${k}"), v);
    }
    assert!(!e.contains('$'), "unsubstituted variable in {e}");
    e
}

fn value(r: &serde_json::Value) -> f64 {
    r["value"][1].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the prometheus binary; CI runs it"]
async fn istio_dashboards_answer_right_from_a_real_prometheus() {
    let ca = DevCa::new("cluster.local").unwrap();

    // backend: every tenth answer is a 500; 5 ms of work; 100-byte answers.
    let backend_metrics = Metrics::default().istio(workload("backend-v1", "backend"));
    let served = Arc::new(AtomicU64::new(0));
    let app = {
        let served = served.clone();
        tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let n = served.fetch_add(1, Ordering::Relaxed);
            async move {
                let _ = req.into_body().collect().await;
                tokio::time::sleep(Duration::from_millis(5)).await;
                let mut resp =
                    http::Response::new(Full::new(Bytes::from(vec![b'b'; RESPONSE_BYTES])));
                if n % 10 == 9 {
                    *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                }
                Ok::<_, std::convert::Infallible>(resp)
            }
        })
    };
    let backend = InboundLayer::new("backend")
        .metrics(backend_metrics.clone())
        .layer(app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(mesh_tower::server::serve(
        listener,
        MeshAcceptor::new(TlsMode::Strict, Some(&identity(&ca, "backend"))).unwrap(),
        backend,
        std::future::pending(),
    ));

    // The control plane and the frontend's client.
    let (_, xds_addr) = support::control_plane(&yaml(port), "backend.yaml").await;
    let xds = XdsClient::builder(Bootstrap::new(xds_addr.to_string(), "frontend"))
        .build()
        .unwrap();
    let target = format!("xds:///{HOST}:80");
    let frontend_metrics = Metrics::default().istio(workload("frontend-v1", "frontend"));
    let client = MeshClient::builder(xds.store().clone(), &target)
        .unwrap()
        .identity(identity(&ca, "frontend"))
        .metrics(frontend_metrics.clone())
        .wait_for_config(Duration::from_secs(10))
        .build();
    xds.listener(&target, Duration::from_secs(10))
        .await
        .unwrap();

    let frontend_admin = admin(frontend_metrics.clone(), xds.store().clone()).await;
    let backend_admin = admin(backend_metrics.clone(), xds.store().clone()).await;
    let prom = prometheus(&[frontend_admin, backend_admin]).await;

    // Load: RPS for LOAD, 50-byte requests.
    let start = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let workers = 20;
    for _ in 0..workers {
        let (client, sent, failed) = (client.clone(), sent.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs_f64(workers as f64 / RPS as f64));
            while start.elapsed() < LOAD {
                tick.tick().await;
                let req = http::Request::post(format!("http://{HOST}/items"))
                    .header("content-length", REQUEST_BYTES)
                    .body(Full::new(Bytes::from(vec![b'a'; REQUEST_BYTES])))
                    .unwrap();
                sent.fetch_add(1, Ordering::Relaxed);
                match client.clone().oneshot(req).await {
                    Ok(resp) => {
                        let _ = resp.into_body().collect().await;
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let load_end = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "transport failures");
    let served = served.load(Ordering::Relaxed);
    println!(
        "sent {} requests in {:?}, {} served by the backend ({} answered 500)",
        sent.load(Ordering::Relaxed),
        start.elapsed(),
        served,
        served / 10
    );
    // Let the last scrapes in; then look at the dashboards as of half a second before the
    // load ended (irate needs the last two scrapes within the load).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let at = load_end - 0.5;

    let service = [
        ("service", HOST),
        ("srcns", ".*"),
        ("srcwl", ".*"),
        ("dstns", ".*"),
        ("dstwl", ".*"),
        ("srccluster", ".*"),
        ("dstcluster", ".*"),
    ];
    let mut answers: BTreeMap<String, Vec<(String, Vec<serde_json::Value>)>> = BTreeMap::new();
    for (file, vars) in [
        (
            "istio-service-dashboard.json",
            vec![
                service.to_vec(),
                [&service[..], &[("qrep", "destination")]].concat(),
            ],
        ),
        (
            "istio-workload-dashboard.json",
            vec![
                vec![
                    ("namespace", "prod"),
                    ("workload", "backend-v1"),
                    ("qrep", "destination"),
                    ("srcns", ".*"),
                    ("srcwl", ".*"),
                    ("dstsvc", ".*"),
                ],
                vec![
                    ("namespace", "prod"),
                    ("workload", "frontend-v1"),
                    ("qrep", "source"),
                    ("srcns", ".*"),
                    ("srcwl", ".*"),
                    ("dstsvc", ".*"),
                ],
            ],
        ),
    ] {
        for vars in vars {
            if !vars.iter().any(|(k, _)| *k == "qrep") {
                continue;
            }
            for (title, expr) in panels(file) {
                let e = substitute(&expr, &vars);
                let result = query(&prom, &e, at).await;
                let workload = vars
                    .iter()
                    .find(|(k, _)| *k == "workload")
                    .map_or("", |(_, v)| *v);
                answers
                    .entry(format!("{file} {workload} {title}"))
                    .or_default()
                    .push((e, result));
            }
        }
    }
    // Every panel answers (some of a panel's queries are for the other kind of traffic:
    // non-mTLS, or gRPC, so a panel answers when one of its queries does). Panels about
    // the other direction of a workload are asked of the workload that has it.
    let mut empty = Vec::new();
    for (panel, queries) in &answers {
        // The frontend only calls, the backend only serves: the workload dashboard's panels
        // about the other direction of each have nothing to show.
        let outgoing = panel.contains("Outgoing") || panel.contains("By Destination");
        let relevant = if panel.contains("frontend-v1") {
            outgoing
        } else if panel.contains("backend-v1") {
            !outgoing
        } else {
            true
        };
        if relevant && queries.iter().all(|(_, r)| r.is_empty()) {
            empty.push(panel.clone());
        }
        println!("{panel}");
        for (e, r) in queries {
            for s in r {
                println!("    {} = {}", s["metric"], s["value"][1]);
            }
            if r.is_empty() && relevant {
                println!("    (empty) {e}");
            }
        }
    }
    assert!(empty.is_empty(), "panels with no answer: {empty:#?}");

    let one = |panel: &str| -> Vec<serde_json::Value> {
        answers
            .get(panel)
            .unwrap_or_else(|| panic!("no panel {panel}"))
            .iter()
            .flat_map(|(_, r)| r.clone())
            .collect()
    };
    let sd = "istio-service-dashboard.json ";
    // Volume: the rate the load ran at.
    let volume = value(&one(&format!("{sd} Server Request Volume"))[0]);
    assert!(
        (volume - RPS as f64).abs() <= RPS as f64 * 0.25,
        "server request volume {volume}"
    );
    let volume = value(&one(&format!("{sd} Client Request Volume"))[0]);
    assert!(
        (volume - RPS as f64).abs() <= RPS as f64 * 0.25,
        "client request volume {volume}"
    );
    // Success rate: 90 % within 1 %, as the server and the client report it.
    for panel in [
        "Server Success Rate (non-5xx responses)",
        "Client Success Rate (non-5xx responses)",
    ] {
        let rate = value(&one(&format!("{sd} {panel}"))[0]);
        assert!((rate - 0.9).abs() <= 0.01, "{panel}: {rate}");
    }
    // By source: frontend-v1 of prod, over mTLS, 90 % again.
    let by_source = one(&format!(
        "{sd} Incoming Success Rate (non-5xx responses) By Source"
    ));
    assert_eq!(by_source.len(), 1, "{by_source:?}");
    assert_eq!(by_source[0]["metric"]["source_workload"], "frontend-v1");
    assert_eq!(by_source[0]["metric"]["source_workload_namespace"], "prod");
    assert!((value(&by_source[0]) - 0.9).abs() <= 0.01);
    let codes = one(&format!(
        "{sd} Incoming Requests By Source And Response Code"
    ));
    let mut seen: Vec<String> = codes
        .iter()
        .map(|r| {
            r["metric"]["response_code"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["200", "500"], "{codes:?}");
    // Duration: 5 ms of work, so the quantiles fall in Istio's (5, 10] or (10, 25] ms buckets.
    for r in one(&format!("{sd} Server Request Duration")) {
        let seconds = value(&r);
        assert!(
            (0.005..=0.025).contains(&seconds),
            "duration {seconds}: {r}"
        );
    }
    // Sizes: 50-byte requests and 100-byte responses fall in Istio's (10, 100] bucket.
    for panel in ["Incoming Request Size By Source", "Response Size By Source"] {
        let r = one(&format!("{sd} {panel}"));
        assert!(!r.is_empty(), "{panel}");
        for r in r {
            let bytes = value(&r);
            assert!((10.0..=100.0).contains(&bytes), "{panel}: {bytes}: {r}");
        }
    }
    // The workload dashboard: the frontend's outgoing requests by destination service and
    // code; and they name the backend's workload, learnt by metadata exchange (as the
    // dashboards' variable queries and Kiali's graph read it).
    let out = one(
        "istio-workload-dashboard.json frontend-v1 Outgoing Requests By Destination And Response Code",
    );
    let mut codes: Vec<&str> = out
        .iter()
        .filter(|r| r["metric"]["destination_service"] == HOST)
        .map(|r| r["metric"]["response_code"].as_str().unwrap_or(""))
        .collect();
    codes.sort();
    codes.dedup();
    assert_eq!(codes, ["200", "500"], "{out:?}");
    let named = query(
        &prom,
        "sum(istio_requests_total{reporter=\"source\", source_workload=\"frontend-v1\"}) by (destination_workload, destination_workload_namespace, destination_version, source_principal)",
        at,
    )
    .await;
    assert_eq!(named.len(), 1, "{named:?}");
    assert_eq!(named[0]["metric"]["destination_workload"], "backend-v1");
    assert_eq!(named[0]["metric"]["destination_workload_namespace"], "prod");
    assert_eq!(named[0]["metric"]["destination_version"], "v1");
    assert_eq!(
        named[0]["metric"]["source_principal"],
        "spiffe://cluster.local/ns/prod/sa/frontend"
    );
    let incoming =
        one("istio-workload-dashboard.json backend-v1 Incoming Success Rate (non-5xx responses)");
    assert!((value(&incoming[0]) - 0.9).abs() <= 0.01, "{incoming:?}");
}
