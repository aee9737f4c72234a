//! No call fails while configuration arrives: the README's snippet (wait for the listener,
//! then call) loses none of its first 2,000 calls; under 300 rps, a push that adds subset v3
//! and moves all traffic to it fails nothing; nor does a cluster whose endpoints come 500 ms
//! after the route that uses it. SotW and delta.

#![allow(dead_code)]

mod harness;

use std::time::{Duration, Instant};

use bytes::Bytes;
use harness::{Backend, HOST, TARGET};
use http_body_util::{BodyExt, Empty};
use mesh_control::ads::{AdsServer, ResourceCache};
use mesh_control::istio::{self, Options};
use mesh_core::xds::{Bootstrap, ProtocolMode, XdsClient};
use mesh_tower::MeshClient;
use tokio::task::JoinSet;
use tower::{Service, ServiceExt};

/// v1, v2 and v3 backends; the route splits `split` (subset, weight) over the subsets the
/// DestinationRule names (`subsets`).
fn yaml(ports: &[u16], subsets: &[&str], split: &[(&str, u32)]) -> String {
    let endpoints: String = ports
        .iter()
        .zip(["v1", "v2", "v3"])
        .map(|(p, v)| {
            format!("  - {{address: 127.0.0.1, ports: {{http: {p}}}, labels: {{version: {v}}}}}\n")
        })
        .collect();
    let subsets: String = subsets
        .iter()
        .map(|s| format!("  - {{name: {s}, labels: {{version: {s}}}}}\n"))
        .collect();
    let routes: String = split
        .iter()
        .map(|(s, w)| {
            format!("    - {{destination: {{host: {HOST}, subset: {s}}}, weight: {w}}}\n")
        })
        .collect();
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: chaos, namespace: test}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{endpoints}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: chaos, namespace: test}}
spec:
  host: {HOST}
  subsets:
{subsets}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: chaos, namespace: test}}
spec:
  hosts: [{HOST}]
  http:
  - route:
{routes}"#
    )
}

fn canary(ports: &[u16]) -> String {
    yaml(ports, &["v1", "v2"], &[("v1", 90), ("v2", 10)])
}

fn all_to_v3(ports: &[u16]) -> String {
    yaml(ports, &["v1", "v2", "v3"], &[("v3", 100)])
}

/// `meshctl serve` over a file it watches; the file's path.
async fn serve(yaml: &str) -> (String, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap().keep();
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, yaml).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let served = path.clone();
    tokio::spawn(async move {
        mesh_control::serve::serve(
            &served,
            listener,
            Options::default(),
            std::future::pending(),
        )
        .await
        .unwrap();
    });
    (addr, path)
}

fn xds(addr: &str, mode: ProtocolMode, id: &str) -> XdsClient {
    XdsClient::builder(Bootstrap::new(addr.to_owned(), id).with_protocol(mode))
        .build()
        .unwrap()
}

async fn call(mut client: MeshClient) -> Result<(), String> {
    let req = http::Request::get(format!("http://{HOST}/"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = ServiceExt::<http::Request<Empty<Bytes>>>::ready(&mut client)
        .await
        .map_err(|e| e.to_string())?
        .call(req)
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    status
        .is_success()
        .then_some(())
        .ok_or_else(|| format!("status {status}"))
}

async fn readme_snippet_loses_no_call(mode: ProtocolMode) {
    let backends = harness::backends(3, None, Instant::now()).await;
    let (addr, _) = serve(&canary(&harness::ports(&backends))).await;
    // As the README writes it: wait for the listener, build the client, call.
    let xds = xds(&addr, mode, "readme");
    xds.listener(TARGET, Duration::from_secs(10)).await.unwrap();
    let client = MeshClient::builder(xds.store().clone(), TARGET)
        .unwrap()
        .build();
    let mut calls = JoinSet::new();
    let mut failed = Vec::new();
    for _ in 0..2000 {
        calls.spawn(call(client.clone()));
        if calls.len() >= 50 {
            if let Some(Err(e)) = calls.join_next().await.map(|r| r.unwrap()) {
                failed.push(e);
            }
        }
    }
    while let Some(r) = calls.join_next().await {
        if let Err(e) = r.unwrap() {
            failed.push(e);
        }
    }
    let counters = client.metrics().counters();
    let waited = counters
        .config_waits
        .load(std::sync::atomic::Ordering::Relaxed);
    let expired = counters
        .config_waits_expired
        .load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "{mode:?}: {waited} of the first calls waited for configuration, {expired} past the bound"
    );
    assert_eq!(expired, 0);
    let hits: Vec<usize> = backends.iter().map(Backend::hits).collect();
    println!(
        "{mode:?}: first 2,000 calls: {} failed; v1/v2/v3 hits {hits:?}",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{mode:?}: {} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert_eq!(hits.iter().sum::<usize>(), 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_readme_snippet_loses_no_call() {
    readme_snippet_loses_no_call(ProtocolMode::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_readme_snippet_loses_no_call() {
    readme_snippet_loses_no_call(ProtocolMode::Delta).await;
}

async fn shift_to_a_new_subset_loses_no_call(mode: ProtocolMode) {
    let backends = harness::backends(3, None, Instant::now()).await;
    let ports = harness::ports(&backends);
    let (addr, path) = serve(&canary(&ports)).await;
    let xds = xds(&addr, mode, "shift");
    xds.ready(TARGET, Duration::from_secs(10)).await.unwrap();
    let client = MeshClient::builder(xds.store().clone(), TARGET)
        .unwrap()
        .build();
    let load = tokio::spawn(harness::load(client, 300, Duration::from_secs(3)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // One push: subset v3 (a new cluster and its endpoints) and all traffic to it.
    // Written whole and renamed into place, as editors and config syncers do.
    let staged = path.with_extension("staged");
    std::fs::write(&staged, all_to_v3(&ports)).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    let figures = load.await.unwrap();
    let v3 = backends[2].hits();
    println!(
        "{mode:?}: shift to new subset v3 under 300 rps: {} sent, {} failed, v3 took {v3}",
        figures.sent, figures.failed
    );
    assert_eq!(figures.failed, 0, "{mode:?}: {:?}", figures.errors);
    assert!(v3 > 200, "{mode:?}: traffic moved to v3 ({v3})");
    // The route to v3 was held back until v3 arrived, well within the bound.
    assert_eq!(xds.store().xds_counts().route_holds_expired, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_shift_to_a_new_subset_loses_no_call() {
    shift_to_a_new_subset_loses_no_call(ProtocolMode::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_shift_to_a_new_subset_loses_no_call() {
    shift_to_a_new_subset_loses_no_call(ProtocolMode::Delta).await;
}

async fn late_endpoints_lose_no_call(mode: ProtocolMode) {
    let backends = harness::backends(3, None, Instant::now()).await;
    let ports = harness::ports(&backends);
    let generate = |yaml: &str| {
        istio::generate(
            &istio::parse(yaml, "late.yaml").unwrap(),
            &Options::default(),
        )
        .unwrap()
        .resources
    };
    let cache = ResourceCache::new();
    cache.set_resources(generate(&canary(&ports)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(AdsServer::new(cache.clone()).serve(listener, std::future::pending()));
    let xds = xds(&addr, mode, "late");
    xds.ready(TARGET, Duration::from_secs(10)).await.unwrap();
    let client = MeshClient::builder(xds.store().clone(), TARGET)
        .unwrap()
        .build();
    let load = tokio::spawn(harness::load(client, 300, Duration::from_secs(3)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The route to v3 and its cluster, but not its endpoints (a control plane that does not
    // order its pushes) ...
    let v3_endpoints = "outbound|80|v3|";
    let next = generate(&all_to_v3(&ports));
    let without: Vec<_> = next
        .iter()
        .filter(|a| {
            !(a.type_url.ends_with("ClusterLoadAssignment")
                && mesh_control::ads::resource_name(a).is_some_and(|n| n.starts_with(v3_endpoints)))
        })
        .cloned()
        .collect();
    assert_eq!(without.len() + 1, next.len());
    cache.set_resources(without);
    // ... which come 500 ms later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    cache.set_resources(next);
    let figures = load.await.unwrap();
    println!(
        "{mode:?}: endpoints 500 ms after their route, 300 rps: {} sent, {} failed, v3 took {}",
        figures.sent,
        figures.failed,
        backends[2].hits()
    );
    assert_eq!(figures.failed, 0, "{mode:?}: {:?}", figures.errors);
    assert!(backends[2].hits() > 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_late_endpoints_lose_no_call() {
    late_endpoints_lose_no_call(ProtocolMode::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_late_endpoints_lose_no_call() {
    late_endpoints_lose_no_call(ProtocolMode::Delta).await;
}

/// `MeshClient::from_xds` with no `xds.listener(..)` / `ready(..)` first: the client
/// subscribes itself, and its first calls wait for their configuration (none fails with "no
/// route configuration" for want of a subscription the xDS task has not sent yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_xds_needs_no_ready_first() {
    let backends = harness::backends(3, None, Instant::now()).await;
    let (addr, _) = serve(&canary(&harness::ports(&backends))).await;
    let xds = xds(&addr, ProtocolMode::Sotw, "from-xds");
    let client = MeshClient::from_xds(&xds, TARGET).unwrap().build();
    let mut calls = JoinSet::new();
    for _ in 0..50 {
        calls.spawn(call(client.clone()));
    }
    let mut failed = Vec::new();
    while let Some(r) = calls.join_next().await {
        if let Err(e) = r.unwrap() {
            failed.push(e);
        }
    }
    assert!(failed.is_empty(), "{failed:?}");
    let waited = client
        .metrics()
        .counters()
        .config_waits
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(waited > 0, "the first calls waited for their configuration");
}
