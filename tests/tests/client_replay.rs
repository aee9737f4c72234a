//! Request streams captured from real xDS clients (grpcio, grpc-js, Envoy; SotW and delta;
//! with NACKs), replayed against the mesh's ADS server. Nonces are mapped to the ones our
//! server issued. The server must answer every subscription, and record each ACK and NACK
//! with the client's node id and its `error_detail`.

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use mesh_control::ads::{AdsServer, ResourceCache, Verdict};
use mesh_core::xds::file;
use tokio_stream::StreamExt;

mod support;

fn fixtures() -> std::path::PathBuf {
    std::env::var_os("MESH_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/xds").into())
}

/// Resources under the names the captured clients asked for.
fn cache() -> ResourceCache {
    let cache = ResourceCache::new();
    cache.set_resources(vec![
        support::xds::listener("greeter.example:50051", "route-grpc"),
        support::xds::routes("route-grpc", &[("backend", 1)]),
        support::xds::routes("route-envoy", &[("backend", 1)]),
        support::xds::cluster("backend", "backend-eds"),
        support::xds::endpoints("backend-eds", 50051),
    ]);
    cache
}

async fn start(cache: ResourceCache) -> (AdsServer, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = AdsServer::new(cache);
    tokio::spawn(server.clone().serve(listener, std::future::pending()));
    (server, format!("http://{addr}"))
}

fn lines(name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(fixtures().join("client-requests").join(name))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// How many ACKs and NACKs the capture contains, and the NACK messages.
fn verdicts(reqs: &[serde_json::Value]) -> (usize, Vec<String>) {
    let mut acks = 0;
    let mut nacks = Vec::new();
    for r in reqs {
        let req = &r["req"];
        if req["response_nonce"]
            .as_str()
            .is_some_and(|n| !n.is_empty())
        {
            match req["error_detail"]["message"].as_str() {
                Some(m) => nacks.push(m.to_owned()),
                None => acks += 1,
            }
        }
    }
    (acks, nacks)
}

async fn replay_sotw(name: &str) {
    let reqs = lines(name);
    let (server, uri) = start(cache()).await;
    let mut client = AggregatedDiscoveryServiceClient::connect(uri)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut responses = client
        .stream_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut nonces: HashMap<String, String> = HashMap::new();
    let mut node = String::new();
    for line in &reqs {
        let mut req: DiscoveryRequest = file::from_yaml(&line["req"].to_string(), name).unwrap();
        if let Some(n) = &req.node {
            node = n.id.clone();
        }
        let is_ack = !req.response_nonce.is_empty();
        if is_ack {
            req.response_nonce = nonces
                .get(&req.type_url)
                .cloned()
                .expect("a response to answer");
        }
        let type_url = req.type_url.clone();
        tx.send(req).unwrap();
        if !is_ack {
            let resp = tokio::time::timeout(Duration::from_secs(5), responses.next())
                .await
                .unwrap_or_else(|_| panic!("{name}: no response to a {type_url} subscription"))
                .unwrap()
                .unwrap();
            assert_eq!(resp.type_url, type_url);
            assert!(
                !resp.resources.is_empty(),
                "{name}: {type_url} answered empty"
            );
            nonces.insert(resp.type_url.clone(), resp.nonce.clone());
        }
    }
    check_events(&server, name, &node, &reqs).await;
}

async fn replay_delta(name: &str) {
    let reqs = lines(name);
    let (server, uri) = start(cache()).await;
    let mut client = AggregatedDiscoveryServiceClient::connect(uri)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut responses = client
        .delta_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut nonces: HashMap<String, String> = HashMap::new();
    let mut node = String::new();
    for line in &reqs {
        let mut req: DeltaDiscoveryRequest =
            file::from_yaml(&line["req"].to_string(), name).unwrap();
        if let Some(n) = &req.node {
            node = n.id.clone();
        }
        let is_ack = !req.response_nonce.is_empty();
        if is_ack {
            req.response_nonce = nonces
                .get(&req.type_url)
                .cloned()
                .expect("a response to answer");
        }
        let type_url = req.type_url.clone();
        tx.send(req).unwrap();
        if !is_ack {
            let resp = tokio::time::timeout(Duration::from_secs(5), responses.next())
                .await
                .unwrap_or_else(|_| panic!("{name}: no response to a {type_url} subscription"))
                .unwrap()
                .unwrap();
            assert_eq!(resp.type_url, type_url);
            assert!(!resp.resources.is_empty());
            nonces.insert(resp.type_url.clone(), resp.nonce.clone());
        }
    }
    check_events(&server, name, &node, &reqs).await;
}

async fn check_events(server: &AdsServer, name: &str, node: &str, reqs: &[serde_json::Value]) {
    let (acks, nacks) = verdicts(reqs);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let events = server.events();
        if events.len() >= acks + nacks.len() {
            assert!(
                events.iter().all(|e| e.node == node),
                "{name}: events carry the node id"
            );
            let got: Vec<String> = events
                .iter()
                .filter_map(|e| match &e.verdict {
                    Verdict::Nack(m) => Some(m.clone()),
                    Verdict::Ack => None,
                })
                .collect();
            assert_eq!(got, nacks, "{name}: NACKs recorded with their error_detail");
            assert_eq!(events.len() - got.len(), acks, "{name}: ACKs recorded");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: events {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn grpcio_sotw() {
    replay_sotw("grpcio-1.85.1-sotw.jsonl").await;
}

#[tokio::test]
async fn grpcio_sotw_nack() {
    replay_sotw("grpcio-1.85.1-sotw-NACK.jsonl").await;
}

#[tokio::test]
async fn grpc_js_sotw() {
    replay_sotw("grpc-js-xds-1.14.1-sotw.jsonl").await;
}

#[tokio::test]
async fn envoy_sotw() {
    replay_sotw("envoy-1.40.0-GRPC.jsonl").await;
}

#[tokio::test]
async fn envoy_delta() {
    replay_delta("envoy-1.40.0-DELTA_GRPC.jsonl").await;
}

#[tokio::test]
async fn envoy_delta_nack() {
    replay_delta("envoy-1.40.0-DELTA_GRPC-NACK.jsonl").await;
}
