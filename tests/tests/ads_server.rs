//! The ADS server's own behaviour: many clients at once, and delta streams that carry only
//! what changed.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use mesh_control::ads::{AdsServer, ResourceCache};
use mesh_core::xds::{Bootstrap, ResourceType, XdsClient};
use tokio_stream::StreamExt;

mod support;

fn clusters(ports: &[(&str, u16)]) -> Vec<envoy_types::pb::google::protobuf::Any> {
    ports
        .iter()
        .flat_map(|(n, p)| [support::xds::cluster(n, n), support::xds::endpoints(n, *p)])
        .collect()
}

#[tokio::test]
async fn delta_sends_only_changed_resources() {
    let cache = ResourceCache::new();
    cache.set_resources(clusters(&[("a", 1), ("b", 2), ("c", 3)]));
    let addr = support::ads_server(&cache).await;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "delta".into(),
            ..Default::default()
        }),
        type_url: ResourceType::ClusterLoadAssignment.type_url().into(),
        resource_names_subscribe: vec!["a".into(), "b".into(), "c".into()],
        ..Default::default()
    })
    .unwrap();
    let mut stream = client
        .delta_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.resources.len(), 3);
    // Move b's endpoint and drop c: the next response carries b only, and c's removal
    // follows when its grace ends (clients routed to it move first).
    cache.set_retire_grace(Duration::from_millis(300));
    cache.set_resources(clusters(&[("a", 1), ("b", 20)]));
    let second = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let names: Vec<&str> = second.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, vec!["b"]);
    assert!(second.removed_resources.is_empty(), "c lingers");
    let started = std::time::Instant::now();
    let third = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(third.resources.is_empty());
    assert_eq!(third.removed_resources, vec!["c".to_string()]);
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    assert_ne!(
        second.resources[0].version,
        first
            .resources
            .iter()
            .find(|r| r.name == "b")
            .unwrap()
            .version
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_at_once() {
    let cache = ResourceCache::new();
    let mut world = vec![
        support::xds::listener("svc", "r"),
        support::xds::routes("r", &[("a", 1)]),
    ];
    world.extend(clusters(&[("a", 1)]));
    cache.set_resources(world.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = AdsServer::new(cache.clone());
    tokio::spawn(server.clone().serve(listener, std::future::pending()));
    let mut clients = Vec::new();
    for i in 0..50 {
        let mode = if i % 2 == 0 {
            mesh_core::xds::ProtocolMode::Sotw
        } else {
            mesh_core::xds::ProtocolMode::Delta
        };
        let c = XdsClient::builder(
            Bootstrap::new(addr.to_string(), format!("client-{i}")).with_protocol(mode),
        )
        .build()
        .unwrap();
        c.watch("xds:///svc").unwrap();
        clients.push(c);
    }
    for c in &clients {
        c.store()
            .wait_for(Duration::from_secs(15), |s| {
                s.endpoints_for_cluster("a").is_some()
            })
            .await
            .expect("every client gets the cascade");
    }
    // One change reaches all of them.
    world.truncate(2);
    world.extend(clusters(&[("a", 7)]));
    cache.set_resources(world);
    for c in &clients {
        c.store()
            .wait_for(Duration::from_secs(15), |s| {
                s.endpoints_for_cluster("a")
                    .is_some_and(|e| e.localities[0].endpoints[0].address.port() == 7)
            })
            .await
            .expect("every client gets the update");
    }
    assert_eq!(server.connects(), 50);
    let nodes: std::collections::BTreeSet<String> =
        server.events().into_iter().map(|e| e.node).collect();
    assert_eq!(nodes.len(), 50, "ACKs tracked per client");
}
