//! # quickstart: a canary over mTLS, shifted live, surviving a failing version
//!
//! `cargo run -p mesh-examples --bin quickstart`
//!
//! Everything runs in this process, on 127.0.0.1, with no external service:
//! - a control plane (`mesh-control`) serving Istio-style YAML over ADS: a ServiceEntry for
//!   `frontend` with a v1 endpoint and two v2 endpoints, a DestinationRule with subsets v1/v2
//!   (ISTIO_MUTUAL, outlier detection), the 90/10 VirtualService with retries, and
//!   PeerAuthentication STRICT;
//! - the three backends, each a hyper server behind the inbound stack whose TLS mode comes
//!   from its xDS server listener (STRICT: mTLS only), with SPIFFE certificates from a
//!   development CA;
//! - a client sending a steady load through a `MeshClient` over mTLS.
//!
//! It prints a golden-signal table per version every second (success, RPS, p50/p95/p99),
//! and moves through four phases by rewriting the YAML and pushing it: 90/10, 50/50, 0/100,
//! then one v2 endpoint starts failing every request; retries and outlier ejection keep the
//! success rate at 100 %. Each phase ends with a check of what was measured (the split
//! within tolerance, no failed request); the program exits non-zero if one fails.
//!
//! Options: `--phase SECONDS` (default 4), `--rps N` (default 300), `--delta` (incremental
//! xDS). Traces go to OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (see
//! `examples/compose.yaml`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use mesh_control::ads::{AdsServer, ResourceCache};
use mesh_control::ca::DevCa;
use mesh_control::istio::{self, Options};
use mesh_core::config::{ClusterSpecifier, RouteAction, Snapshot};
use mesh_core::identity::IdentityStore;
use mesh_core::xds::{Bootstrap, ProtocolMode, XdsClient};
use mesh_tower::otlp::Otlp;
use mesh_tower::server::{serve_xds, XdsServe};
use mesh_tower::trace::TraceLayer;
use mesh_tower::MeshClient;
use tower::ServiceExt;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const HOST: &str = "frontend.prod.svc.cluster.local";
const TARGET: &str = "xds:///frontend.prod.svc.cluster.local:80";

/// The mesh's configuration, as an operator would write it.
fn yaml(ports: [u16; 3], v1: u32, v2: u32) -> String {
    let [p1, p2a, p2b] = ports;
    format!(
        r#"apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: frontend, namespace: prod}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {p1}}}, labels: {{version: v1}}, serviceAccount: frontend}}
  - {{address: 127.0.0.1, ports: {{http: {p2a}}}, labels: {{version: v2}}, serviceAccount: frontend}}
  - {{address: 127.0.0.1, ports: {{http: {p2b}}}, labels: {{version: v2}}, serviceAccount: frontend}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: frontend, namespace: prod}}
spec:
  host: {HOST}
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    tls: {{mode: ISTIO_MUTUAL}}
    outlierDetection: {{consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: frontend, namespace: prod}}
spec:
  hosts: [{HOST}]
  http:
  - name: canary
    retries: {{attempts: 3, retryOn: "5xx,connect-failure"}}
    route:
    - {{destination: {{host: {HOST}, subset: v1}}, weight: {v1}}}
    - {{destination: {{host: {HOST}, subset: v2}}, weight: {v2}}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec: {{mtls: {{mode: STRICT}}}}
"#
    )
}

fn push(cache: &ResourceCache, yaml: &str) -> Result<()> {
    let show = |errors: Vec<istio::ConfigError>| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let config = istio::parse(yaml, "quickstart.yaml").map_err(show)?;
    cache.set_resources(
        istio::generate(&config, &Options::default())
            .map_err(show)?
            .resources,
    );
    Ok(())
}

/// The weights the client holds for the canary route, by subset.
fn weights(s: &Snapshot) -> Option<Vec<(String, u32)>> {
    let rc = s.routes_for_listener(&format!("{HOST}:80"))?;
    let route = rc.virtual_hosts.first()?.routes.first()?;
    let RouteAction::Forward(f) = &route.action else {
        return None;
    };
    let subset = |name: &str| name.split('|').nth(2).unwrap_or("").to_owned();
    match &f.cluster {
        ClusterSpecifier::Weighted(w) => Some(
            w.clusters
                .iter()
                .map(|c| (subset(&c.name), c.weight))
                .collect(),
        ),
        // A split with one destination left is sent as a plain route to it.
        ClusterSpecifier::Cluster(c) => Some(vec![(subset(c), 100)]),
        ClusterSpecifier::Header(_) => None,
    }
}

fn identity(ca: &DevCa, sa: &str) -> Result<IdentityStore> {
    Ok(IdentityStore::new(ca.workload_identity(
        "prod",
        sa,
        Duration::from_secs(3600),
    )?))
}

/// What the client saw, per version, since the last reset.
#[derive(Default)]
struct Window {
    ok: BTreeMap<String, Vec<Duration>>,
    failed: u64,
    errors: BTreeMap<String, u64>,
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1000.0)
}

fn print_table(w: &Window, secs: f64) {
    println!(
        "  {:<8} {:>8} {:>7} {:>9} {:>9} {:>9}",
        "VERSION", "SUCCESS", "RPS", "P50", "P95", "P99"
    );
    let total_ok: usize = w.ok.values().map(Vec::len).sum();
    for (version, lat) in &w.ok {
        let mut sorted = lat.clone();
        sorted.sort();
        // Failed requests cannot be told apart by version (no backend answered for them).
        let success = if w.failed == 0 {
            100.0
        } else {
            100.0 * total_ok as f64 / (total_ok as f64 + w.failed as f64)
        };
        println!(
            "  {:<8} {:>7.2}% {:>7.0} {:>9} {:>9} {:>9}",
            version,
            success,
            lat.len() as f64 / secs,
            ms(quantile(&sorted, 0.5)),
            ms(quantile(&sorted, 0.95)),
            ms(quantile(&sorted, 0.99))
        );
    }
    if w.failed > 0 {
        println!("  failed: {} {:?}", w.failed, w.errors);
    }
}

struct Phase {
    name: &'static str,
    v1: u32,
    v2: u32,
    /// Expected v2 share, in percent, and the tolerance.
    expect_v2: (f64, f64),
    fail_v2b: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut phase_len = Duration::from_secs(4);
    let mut rps = 300u32;
    let mut mode = ProtocolMode::Sotw;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--phase" => {
                let v = args.next().ok_or("--phase needs seconds")?;
                phase_len = Duration::from_secs_f64(v.trim_end_matches('s').parse()?);
            }
            "--rps" => rps = args.next().ok_or("--rps needs a number")?.parse()?,
            "--delta" => mode = ProtocolMode::Delta,
            other => {
                return Err(format!(
                    "unknown argument {other:?}; try --phase SECONDS, --rps N, --delta"
                )
                .into())
            }
        }
    }

    // Traces, when a collector is configured: the mesh's spans are `tracing` spans, and
    // this installs the tracing-opentelemetry pipeline that exports them.
    let traces = match std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Some(_) => Some(Otlp::try_from_env()?.service_name("quickstart").install()?),
        None => None,
    };
    let client_trace = TraceLayer::client;
    let server_trace = TraceLayer::server;

    // 1. The control plane, in-process, and the workloads' certificates.
    let ca = DevCa::new("cluster.local")?;
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
    }
    let ports = [0, 1, 2].map(|i| listeners[i].local_addr().map(|a| a.port()).unwrap_or(0));
    let cache = ResourceCache::new();
    push(&cache, &yaml(ports, 90, 10))?;
    let xds_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let xds_addr = xds_listener.local_addr()?;
    tokio::spawn(AdsServer::new(cache.clone()).serve(xds_listener, std::future::pending()));
    println!("control plane: ADS on {xds_addr} ({mode:?}), PeerAuthentication STRICT");

    // 2. The backends: v1, v2a, v2b. Their TLS mode comes from their xDS server listeners.
    let backend_xds = XdsClient::builder(
        Bootstrap::new(xds_addr.to_string(), "frontend-workloads")
            .with_protocol(mode)
            .with_server_listener_template("xds.istio.io/grpc/lds/inbound/%s"),
    )
    .build()?;
    let backend_id = identity(&ca, "frontend")?;
    let v2b_failing = Arc::new(AtomicBool::new(false));
    for (listener, (version, failing)) in listeners.into_iter().zip([
        ("v1", None),
        ("v2", None),
        ("v2", Some(v2b_failing.clone())),
    ]) {
        let app = tower::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
            let fail = failing.as_ref().is_some_and(|f| f.load(Ordering::Relaxed));
            async move {
                let mut resp = http::Response::new(Full::new(Bytes::from(version)));
                if fail {
                    *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                }
                Ok::<_, Infallible>(resp)
            }
        });
        let options = XdsServe::new(&format!("frontend-{version}"))
            .identity(backend_id.clone())
            .trace(server_trace());
        let xds = backend_xds.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_xds(&xds, listener, app, options, std::future::pending()).await {
                eprintln!("backend {version}: {e}");
                std::process::exit(1);
            }
        });
    }

    // 3. The client: configuration over ADS, mTLS with its own SPIFFE identity.
    let xds = XdsClient::builder(
        Bootstrap::new(xds_addr.to_string(), "quickstart-client").with_protocol(mode),
    )
    .build()?;
    xds.listener(TARGET, Duration::from_secs(10)).await?;
    xds.store()
        .wait_for(Duration::from_secs(10), |s| {
            s.endpoints_for_cluster(&format!("outbound|80|v1|{HOST}"))
                .is_some()
                && s.endpoints_for_cluster(&format!("outbound|80|v2|{HOST}"))
                    .is_some()
        })
        .await
        .map_err(|_| "endpoints did not arrive")?;
    let client = MeshClient::builder(xds.store().clone(), TARGET)?
        .identity(identity(&ca, "client")?)
        .trace(client_trace())
        .build();
    println!("client: {TARGET} over mTLS as spiffe://cluster.local/ns/prod/sa/client\n");

    // 4. Steady load from a few workers, each at a fixed pace.
    let window = Arc::new(Mutex::new(Window::default()));
    // Requests are counted in the phase they started in (one in flight across a switch was
    // routed by the previous configuration).
    let epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers = 6u32;
    let period = Duration::from_secs_f64(f64::from(workers) / f64::from(rps.max(1)));
    for _ in 0..workers {
        let client = client.clone();
        let window = window.clone();
        let epoch = epoch.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let started = Instant::now();
                let started_in = epoch.load(Ordering::Acquire);
                let req = http::Request::get(format!("http://{HOST}/"))
                    .body(Empty::<Bytes>::new())
                    .expect("a valid request");
                let result = match client.clone().oneshot(req).await {
                    Ok(resp) if resp.status().is_success() => {
                        match resp.into_body().collect().await {
                            Ok(b) => Ok(String::from_utf8_lossy(&b.to_bytes()).into_owned()),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                    Ok(resp) => Err(format!("HTTP {}", resp.status())),
                    Err(e) => Err(e.to_string()),
                };
                let elapsed = started.elapsed();
                let mut w = window.lock().expect("window lock");
                if epoch.load(Ordering::Acquire) != started_in {
                    continue;
                }
                match result {
                    Ok(version) => w.ok.entry(version).or_default().push(elapsed),
                    Err(e) => {
                        w.failed += 1;
                        *w.errors.entry(e).or_default() += 1;
                    }
                }
            }
        });
    }

    let phases = [
        Phase {
            name: "90/10 canary",
            v1: 90,
            v2: 10,
            expect_v2: (10.0, 4.0),
            fail_v2b: false,
        },
        Phase {
            name: "50/50",
            v1: 50,
            v2: 50,
            expect_v2: (50.0, 7.0),
            fail_v2b: false,
        },
        Phase {
            name: "0/100: v2 takes all traffic",
            v1: 0,
            v2: 100,
            expect_v2: (100.0, 0.0),
            fail_v2b: false,
        },
        Phase {
            name: "0/100, one v2 endpoint fails every request",
            v1: 0,
            v2: 100,
            expect_v2: (100.0, 0.0),
            fail_v2b: true,
        },
    ];
    let mut problems = Vec::new();
    for (i, phase) in phases.iter().enumerate() {
        if i > 0 {
            push(&cache, &yaml(ports, phase.v1, phase.v2))?;
            let want = (phase.v1, phase.v2);
            xds.store()
                .wait_for(Duration::from_secs(10), |s| {
                    weights(s).is_some_and(|w| {
                        let of = |v: &str| w.iter().find(|(n, _)| n == v).map_or(0, |(_, x)| *x);
                        let total = (of("v1") + of("v2")).max(1);
                        of("v1") * 100 / total == want.0 && of("v2") * 100 / total == want.1
                    })
                })
                .await
                .map_err(|_| "the new split did not arrive")?;
        }
        v2b_failing.store(phase.fail_v2b, Ordering::Relaxed);
        epoch.fetch_add(1, Ordering::AcqRel);
        println!(
            "== phase {}: {} (pushed; generation {})",
            i + 1,
            phase.name,
            xds.store().load().generation()
        );
        *window.lock().expect("window lock") = Window::default();
        let mut total = Window::default();
        let started = Instant::now();
        let mut second = Instant::now();
        while started.elapsed() < phase_len {
            tokio::time::sleep(
                Duration::from_secs(1).min(phase_len.saturating_sub(started.elapsed())),
            )
            .await;
            let w = std::mem::take(&mut *window.lock().expect("window lock"));
            print_table(&w, second.elapsed().as_secs_f64());
            second = Instant::now();
            for (v, l) in w.ok {
                total.ok.entry(v).or_default().extend(l);
            }
            total.failed += w.failed;
            for (e, n) in w.errors {
                *total.errors.entry(e).or_default() += n;
            }
        }
        let n_ok: usize = total.ok.values().map(Vec::len).sum();
        let n = n_ok as u64 + total.failed;
        let v2 = total.ok.get("v2").map_or(0, Vec::len);
        let share = 100.0 * v2 as f64 / n_ok.max(1) as f64;
        let success = 100.0 * n_ok as f64 / n.max(1) as f64;
        let (want, tol) = phase.expect_v2;
        let split_ok = (share - want).abs() <= tol;
        let success_ok = total.failed == 0 && n > 0;
        println!(
            "-- phase {} result: {n} requests, v2 share {share:.1}% (want {want:.0}% ± {tol:.0}): {}, success {success:.2}%: {}",
            i + 1,
            if split_ok { "ok" } else { "FAIL" },
            if success_ok { "ok" } else { "FAIL" },
        );
        if !split_ok {
            problems.push(format!(
                "phase {}: v2 share {share:.1}%, want {want}% ± {tol}",
                i + 1
            ));
        }
        if !success_ok {
            problems.push(format!(
                "phase {}: {} of {n} requests failed: {:?}",
                i + 1,
                total.failed,
                total.errors
            ));
        }
        if phase.fail_v2b {
            let c = client.metrics().counters();
            let retries = c.retries.load(Ordering::Relaxed);
            let ejections = c.ejections.load(Ordering::Relaxed);
            let ejected_now = client
                .registry()
                .get(&format!("outbound|80|v2|{HOST}"))
                .map_or(0, |r| r.ejected(tokio::time::Instant::now()));
            println!(
                "-- the failing endpoint: {retries} retries, {ejections} outlier ejection(s), {ejected_now} endpoint ejected now; no request failed"
            );
            if ejected_now != 1 || retries == 0 {
                problems.push(format!(
                    "failing v2 endpoint: want it ejected after retries, got {ejected_now} ejected and {retries} retries"
                ));
            }
        }
        println!();
    }
    if let Some(guard) = traces {
        // Flushing blocks: off the runtime's thread.
        tokio::task::spawn_blocking(move || drop(guard)).await?;
    }
    if problems.is_empty() {
        println!("quickstart: all checks passed");
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}
