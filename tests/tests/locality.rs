//! DestinationRule `localityLbSetting` end to end: `meshctl serve` answers each client with
//! the endpoint priorities and weights of its own locality (from its bootstrap's
//! `node.locality`), and the mesh's client follows them: nearest first, failover to the
//! region the rule names when the nearest endpoints are ejected, and `distribute` weights.

#![allow(dead_code)]

mod harness;

use std::time::{Duration, Instant};

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Locality;
use harness::{Backend, FAIL, HOST, TARGET};
use http_body_util::{BodyExt, Empty};
use mesh_control::istio::Options;
use mesh_core::xds::{Bootstrap, ProtocolMode, XdsClient};
use mesh_tower::MeshClient;
use tower::{Service, ServiceExt};

const PATIENCE: Duration = Duration::from_secs(15);

/// Three backends in three regions, one rule.
fn yaml(ports: &[u16], lb: &str) -> String {
    let localities = [
        "us-east/zone-a/sz1",
        "eu-west/zone-a/sz1",
        "ap-south/zone-a/sz1",
    ];
    let endpoints: String = ports
        .iter()
        .zip(localities)
        .map(|(p, l)| format!("  - {{address: 127.0.0.1, ports: {{http: {p}}}, locality: {l}}}\n"))
        .collect();
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: geo, namespace: test}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{endpoints}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: geo, namespace: test}}
spec:
  host: {HOST}
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 1, interval: 100ms, baseEjectionTime: 60s, maxEjectionPercent: 100}}
    loadBalancer:
      simple: ROUND_ROBIN
{lb}"#
    )
}

/// `meshctl serve` over `yaml`, as the binary runs it.
async fn serve(yaml: &str) -> (String, tokio::sync::oneshot::Sender<()>) {
    let dir = tempfile::tempdir().unwrap().keep();
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, yaml).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        mesh_control::serve::serve(&path, listener, Options::default(), async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (addr, stop)
}

async fn client(addr: &str, locality: &str, mode: ProtocolMode) -> (XdsClient, MeshClient) {
    let mut parts = locality.split('/');
    let mut bootstrap =
        Bootstrap::new(addr.to_owned(), format!("client-{locality}")).with_protocol(mode);
    bootstrap.node.locality = Some(Locality {
        region: parts.next().unwrap_or_default().into(),
        zone: parts.next().unwrap_or_default().into(),
        sub_zone: parts.next().unwrap_or_default().into(),
    });
    let xds = XdsClient::builder(bootstrap).build().unwrap();
    xds.listener(TARGET, PATIENCE).await.unwrap();
    xds.store()
        .wait_for(PATIENCE, |s| {
            s.endpoints_for_cluster(harness::CLUSTER).is_some()
        })
        .await
        .expect("endpoints arrive");
    let mesh = MeshClient::builder(xds.store().clone(), TARGET)
        .unwrap()
        .build();
    (xds, mesh)
}

/// Sends `n` requests one after another; returns how many succeeded.
async fn send(client: &MeshClient, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        let mut c = client.clone();
        let req = http::Request::get(format!("http://{HOST}/"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = ServiceExt::<http::Request<Empty<Bytes>>>::ready(&mut c)
            .await
            .unwrap()
            .call(req)
            .await;
        if let Ok(resp) = resp {
            let status = resp.status();
            let _ = resp.into_body().collect().await;
            ok += usize::from(status.is_success());
        }
    }
    ok
}

fn hits(b: &[Backend]) -> Vec<usize> {
    b.iter().map(Backend::hits).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_go_to_their_nearest_locality_and_fail_over_where_the_rule_says() {
    let epoch = Instant::now();
    let backends = harness::backends(3, None, epoch).await;
    let (us, eu, ap) = (0, 1, 2);
    let lb = "      localityLbSetting:\n        failover: [{from: us-east, to: ap-south}]\n";
    let (addr, _stop) = serve(&yaml(&harness::ports(&backends), lb)).await;

    // Each client is served its own priorities (over SotW and delta): all traffic stays in
    // its region.
    let (_x1, east) = client(&addr, "us-east/zone-a/sz1", ProtocolMode::Sotw).await;
    let (_x2, west) = client(&addr, "eu-west/zone-b/sz9", ProtocolMode::Delta).await;
    assert_eq!(send(&east, 40).await, 40);
    assert_eq!(hits(&backends), vec![40, 0, 0]);
    assert_eq!(send(&west, 40).await, 40);
    assert_eq!(hits(&backends), vec![40, 40, 0]);

    // us-east fails: after ejection, us-east clients go to ap-south (the rule's failover
    // region), not eu-west, although both are other regions.
    backends[us]
        .mode
        .store(FAIL, std::sync::atomic::Ordering::Relaxed);
    send(&east, 5).await;
    let before = hits(&backends);
    assert_eq!(
        send(&east, 40).await,
        40,
        "failed over: every request served"
    );
    let after = hits(&backends);
    assert_eq!(after[us], before[us], "the ejected endpoint gets nothing");
    assert_eq!(after[eu], before[eu], "eu-west is not the failover region");
    assert_eq!(after[ap] - before[ap], 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distribute_splits_a_clients_traffic_by_locality_weight() {
    let epoch = Instant::now();
    let backends = harness::backends(3, None, epoch).await;
    let lb = "      localityLbSetting:\n        distribute:\n        - from: us-east/*\n          to: {\"us-east/*\": 75, \"eu-west/*\": 25}\n";
    let (addr, _stop) = serve(&yaml(&harness::ports(&backends), lb)).await;
    let (_x1, east) = client(&addr, "us-east/zone-c/sz2", ProtocolMode::Delta).await;
    let n = 800;
    assert_eq!(send(&east, n).await, n);
    let h = hits(&backends);
    let us_share = h[0] as f64 / n as f64;
    assert!(
        (0.68..0.82).contains(&us_share),
        "us-east share {us_share}: {h:?}"
    );
    assert_eq!(h[2], 0, "ap-south is not in the distribution: {h:?}");
    // A client that no `from` matches keeps the plain assignment (all three, equal).
    let (_x2, ap) = client(&addr, "ap-south/zone-a/sz1", ProtocolMode::Sotw).await;
    assert_eq!(send(&ap, 300).await, 300);
    let d: Vec<usize> = hits(&backends).iter().zip(&h).map(|(a, b)| a - b).collect();
    assert!(d.iter().all(|&x| x > 60), "{d:?}");
}
