//! The ADS server's own behaviour: many clients at once, and delta streams that carry only
//! what changed.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
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

/// A raw delta stream to a server, as a client that answers only when told to.
struct RawDelta {
    tx: tokio::sync::mpsc::UnboundedSender<DeltaDiscoveryRequest>,
    stream: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl RawDelta {
    async fn connect(addr: std::net::SocketAddr) -> RawDelta {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stream = client
            .delta_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        RawDelta { tx, stream }
    }

    fn subscribe(&self, rt: ResourceType, names: &[&str]) {
        self.tx
            .send(DeltaDiscoveryRequest {
                node: Some(Node {
                    id: "delta".into(),
                    ..Default::default()
                }),
                type_url: rt.type_url().into(),
                resource_names_subscribe: names.iter().map(|n| (*n).to_owned()).collect(),
                ..Default::default()
            })
            .unwrap();
    }

    fn ack(&self, resp: &DeltaDiscoveryResponse) {
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            })
            .unwrap();
    }

    async fn next(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.stream.next())
            .await
            .expect("a response in time")
            .unwrap()
            .unwrap()
    }

    /// Whether a response comes within `wait`.
    async fn quiet_for(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.stream.next())
            .await
            .is_err()
    }
}

/// A service `svc` (listener, routes) to cluster `a`, whose one endpoint is at `port`.
fn svc(port: u16) -> Vec<envoy_types::pb::google::protobuf::Any> {
    let mut world = vec![
        support::xds::listener("svc", "r"),
        support::xds::routes("r", &[("a", 1)]),
    ];
    world.extend(clusters(&[("a", port)]));
    world
}

/// The port of a delta resource holding a one-endpoint assignment.
fn port(r: &envoy_types::pb::envoy::service::discovery::v3::Resource) -> u32 {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
    use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
    use prost::Message;
    let cla = ClusterLoadAssignment::decode(r.resource.as_ref().unwrap().value.as_slice()).unwrap();
    let Some(lb_endpoint::HostIdentifier::Endpoint(e)) =
        &cla.endpoints[0].lb_endpoints[0].host_identifier
    else {
        panic!("no endpoint")
    };
    match e.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(sa)) => match sa.port_specifier {
            Some(socket_address::PortSpecifier::PortValue(p)) => p,
            _ => panic!("no port"),
        },
        _ => panic!("no socket address"),
    }
}

/// A server of `cache` holding assignments a, b and c (ports 1, 2, 3), and a raw delta
/// client subscribed to them, with the first response (all three).
async fn watching_abc(cache: &ResourceCache) -> (RawDelta, DeltaDiscoveryResponse) {
    cache.set_resources(clusters(&[("a", 1), ("b", 2), ("c", 3)]));
    let addr = support::ads_server(cache).await;
    let mut client = RawDelta::connect(addr).await;
    client.subscribe(ResourceType::ClusterLoadAssignment, &["a", "b", "c"]);
    let first = client.next().await;
    assert_eq!(first.resources.len(), 3);
    (client, first)
}

fn names(resp: &DeltaDiscoveryResponse) -> Vec<&str> {
    let mut n: Vec<&str> = resp.resources.iter().map(|r| r.name.as_str()).collect();
    n.sort();
    n
}

#[tokio::test]
async fn delta_sends_only_changed_resources() {
    let cache = ResourceCache::new();
    let (mut client, first) = watching_abc(&cache).await;
    client.ack(&first);
    // Move b's endpoint and drop c: the next response carries b only, and c's removal
    // follows when its grace ends (clients routed to it move first).
    cache.set_retire_grace(Duration::from_millis(300));
    cache.set_resources(clusters(&[("a", 1), ("b", 20)]));
    let second = client.next().await;
    assert_eq!(names(&second), vec!["b"]);
    assert!(second.removed_resources.is_empty(), "c lingers");
    client.ack(&second);
    let started = std::time::Instant::now();
    let third = client.next().await;
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

/// Flow control: while a push is unanswered, the changes that follow are held and sent
/// merged, in one response at their latest versions, when the client answers; a client that
/// does not answer gets the next push once the ACK wait is over.
#[tokio::test]
async fn a_slow_client_gets_the_changes_merged() {
    let cache = ResourceCache::new();
    cache.set_ack_wait(Duration::from_millis(800));
    let (mut client, first) = watching_abc(&cache).await;
    // Three changes while the first response is unanswered: nothing is pushed.
    for (i, ports) in [[10, 2, 3], [10, 20, 3], [11, 20, 30]].iter().enumerate() {
        cache.set_resources(clusters(&[
            ("a", ports[0]),
            ("b", ports[1]),
            ("c", ports[2]),
        ]));
        assert!(
            client.quiet_for(Duration::from_millis(100)).await,
            "change {i} was pushed before the last push was answered"
        );
    }
    let held_at = std::time::Instant::now();
    client.ack(&first);
    let merged = client.next().await;
    assert_eq!(names(&merged), vec!["a", "b", "c"], "every change, merged");
    let ports: Vec<(&str, u32)> = merged
        .resources
        .iter()
        .map(|r| (r.name.as_str(), port(r)))
        .collect();
    assert_eq!(
        ports,
        vec![("a", 11), ("b", 20), ("c", 30)],
        "each at its last state"
    );
    assert!(
        held_at.elapsed() < Duration::from_millis(700),
        "sent on the answer, not the wait"
    );
    // Not answered: the next change goes out once the wait is over, not before.
    let sent = std::time::Instant::now();
    cache.set_resources(clusters(&[("a", 12), ("b", 20), ("c", 30)]));
    let late = client.next().await;
    assert_eq!(names(&late), vec!["a"]);
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "pushed after {waited:?}, before the wait"
    );
}

/// Flow control keeps make-before-break: a type pushed after one whose push is held (here
/// endpoints after clusters) waits with it, and both go in push order on the answer.
#[tokio::test]
async fn a_held_type_holds_the_types_after_it() {
    let cache = ResourceCache::new();
    cache.set_ack_wait(Duration::from_secs(30));
    cache.set_resources(clusters(&[("a", 1)]));
    let addr = support::ads_server(&cache).await;
    let mut client = RawDelta::connect(addr).await;
    client.subscribe(ResourceType::Cluster, &["a", "b"]);
    let cds = client.next().await;
    assert_eq!(names(&cds), vec!["a"]);
    client.subscribe(ResourceType::ClusterLoadAssignment, &["a", "b"]);
    let eds = client.next().await;
    assert_eq!(names(&eds), vec!["a"]);
    client.ack(&eds);
    // Cluster b and its endpoints arrive while the clusters' push is unanswered.
    cache.set_resources(clusters(&[("a", 1), ("b", 2)]));
    assert!(
        client.quiet_for(Duration::from_millis(300)).await,
        "endpoints overtook the held clusters"
    );
    client.ack(&cds);
    let first = client.next().await;
    let second = client.next().await;
    assert_eq!(first.type_url, ResourceType::Cluster.type_url());
    assert_eq!(names(&first), vec!["b"]);
    assert_eq!(
        second.type_url,
        ResourceType::ClusterLoadAssignment.type_url()
    );
    assert_eq!(names(&second), vec!["b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_at_once() {
    let cache = ResourceCache::new();
    cache.set_resources(svc(1));
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
    cache.set_resources(svc(7));
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

/// The client applies updates on a thread of its own: with the runtime that built it not
/// driven at all (a service whose only worker is busy), a change still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_applies_updates_while_its_runtime_is_busy() {
    let cache = ResourceCache::new();
    cache.set_resources(svc(1));
    let addr = support::ads_server(&cache).await;
    let port_of = |s: &mesh_core::config::Snapshot| {
        s.endpoints_for_cluster("a")
            .map(|e| e.localities[0].endpoints[0].address.port())
    };
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let service = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(async {
            let c = XdsClient::builder(Bootstrap::new(addr.to_string(), "busy"))
                .build()
                .unwrap();
            c.watch("xds:///svc").unwrap();
            c.store()
                .wait_for(Duration::from_secs(10), |s| port_of(s) == Some(1))
                .await
                .expect("the first configuration");
            c
        });
        ready_tx.send(()).unwrap();
        // From here on nothing drives `rt`: the thread only sleeps and reads the store.
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if port_of(&client.store().load()) == Some(7) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    });
    ready_rx.await.unwrap();
    cache.set_resources(svc(7));
    let arrived = tokio::task::spawn_blocking(move || service.join().unwrap())
        .await
        .unwrap();
    assert!(
        arrived,
        "the change arrived with the client's runtime not driven"
    );
}
