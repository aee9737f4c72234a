//! The mesh's xDS client against a real xDS server over a real gRPC stream on 127.0.0.1:
//! the cascade, updates, deletions, a NACKed resource, reconnects. SotW and delta.

use std::time::Duration;

use envoy_types::pb::google::protobuf::Any;
use mesh_control::ads::{AdsServer, ResourceCache, Verdict};
use mesh_core::config::{ClusterSpecifier, RouteAction, Snapshot};
use mesh_core::xds::{Bootstrap, ProtocolMode, ResourceType, XdsClient};
use mesh_core::{ConfigStore, ResourceStatus, XdsError};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

mod support;

const PATIENCE: Duration = Duration::from_secs(15);

use support::xds::{listener, routes};

fn cluster(name: &str) -> Any {
    support::xds::cluster(name, name)
}

fn endpoints(name: &str, port: u16) -> Any {
    support::xds::endpoints(name, port)
}

fn world(split: &[(&str, u32)], ports: &[(&str, u16)]) -> Vec<Any> {
    let mut v = vec![listener("svc", "svc-routes"), routes("svc-routes", split)];
    for (name, port) in ports {
        v.push(cluster(name));
        v.push(endpoints(name, *port));
    }
    v
}

struct RunningServer {
    server: AdsServer,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(cache: ResourceCache, addr: &str) -> (RunningServer, std::net::SocketAddr) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let local = listener.local_addr().unwrap();
    let server = AdsServer::new(cache);
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.clone().serve(listener, async move {
        let _ = rx.await;
    }));
    (
        RunningServer {
            server,
            stop: Some(stop),
            task,
        },
        local,
    )
}

impl RunningServer {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("server shuts down")
            .unwrap()
            .unwrap();
    }
}

fn weights(s: &Snapshot) -> Vec<(String, u32)> {
    let Some(rc) = s.route_config("svc-routes") else {
        return vec![];
    };
    match &rc.virtual_hosts[0].routes[0].action {
        RouteAction::Forward(f) => match &f.cluster {
            ClusterSpecifier::Weighted(w) => w
                .clusters
                .iter()
                .map(|c| (c.name.clone(), c.weight))
                .collect(),
            _ => vec![],
        },
        _ => vec![],
    }
}

fn port_of(s: &Snapshot, cluster: &str) -> Option<u16> {
    s.endpoints_for_cluster(cluster)
        .map(|e| e.localities[0].endpoints[0].address.port())
}

async fn wait(
    store: &ConfigStore,
    what: &str,
    pred: impl FnMut(&Snapshot) -> bool,
) -> std::sync::Arc<Snapshot> {
    store
        .wait_for(PATIENCE, pred)
        .await
        .unwrap_or_else(|s| panic!("timed out waiting for {what}; last snapshot: {s:#?}"))
}

async fn lifecycle(mode: ProtocolMode) {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let cache = ResourceCache::new();
    cache.set_resources(world(
        &[("v1", 90), ("v2", 10)],
        &[("v1", 8001), ("v2", 8002)],
    ));
    let (running, addr) = start(cache.clone(), "127.0.0.1:0").await;

    let bootstrap = Bootstrap::new(addr.to_string(), format!("node-{mode:?}")).with_protocol(mode);
    let client = XdsClient::builder(bootstrap)
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .build()
        .unwrap();
    let store = client.store().clone();

    // Listener -> routes -> clusters -> endpoints.
    let l = client.listener("xds:///svc", PATIENCE).await.unwrap();
    assert_eq!(l.name, "svc");
    let snap = wait(&store, "the full cascade", |s| {
        port_of(s, "v1").is_some() && port_of(s, "v2").is_some()
    })
    .await;
    assert_eq!(weights(&snap), vec![("v1".into(), 90), ("v2".into(), 10)]);
    assert_eq!(port_of(&snap, "v2"), Some(8002));

    // Update: shift weights and move an endpoint.
    cache.set_resources(world(
        &[("v1", 50), ("v2", 50)],
        &[("v1", 8001), ("v2", 9002)],
    ));
    let snap = wait(&store, "50/50 and the new endpoint", |s| {
        weights(s) == vec![("v1".into(), 50), ("v2".into(), 50)] && port_of(s, "v2") == Some(9002)
    })
    .await;
    assert!(snap.cluster("v1").is_some());

    // Deletion: v2 leaves the split and the cluster set; the client drops it.
    cache.set_resources(world(&[("v1", 100)], &[("v1", 8001)]));
    wait(&store, "v2 to be gone", |s| {
        s.cluster("v2").is_none()
            && s.endpoints_for_cluster("v2").is_none()
            && weights(s).len() == 1
    })
    .await;

    // A bad resource is NACKed with detail; the last good route keeps serving.
    let mut bad = world(&[("v1", 100)], &[("v1", 8001)]);
    bad[1] = routes("svc-routes", &[("v1", 0)]);
    cache.set_resources(bad);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let nack = loop {
        if let Some(n) = running.server.nacks().into_iter().next() {
            break n;
        }
        assert!(tokio::time::Instant::now() < deadline, "no NACK arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(nack.type_url, ResourceType::RouteConfiguration.type_url());
    let Verdict::Nack(detail) = &nack.verdict else {
        unreachable!()
    };
    assert_eq!(
        detail,
        "route_config \"svc-routes\": virtual_hosts[0].routes[0].route.weighted_clusters: total weight is 0"
    );
    assert_eq!(nack.node, format!("node-{mode:?}"));
    let dump = store.dump();
    let rc = dump
        .get(ResourceType::RouteConfiguration, "svc-routes")
        .unwrap();
    assert_eq!(rc.status, ResourceStatus::Nacked);
    assert_eq!(rc.error.as_ref().unwrap().error.to_string(), *detail);
    assert_eq!(
        weights(&store.load()),
        vec![("v1".into(), 100)],
        "last good config serving"
    );

    // The next good push applies.
    cache.set_resources(world(
        &[("v1", 70), ("v3", 30)],
        &[("v1", 8001), ("v3", 8003)],
    ));
    wait(&store, "v3", |s| {
        port_of(s, "v3") == Some(8003) && weights(s).len() == 2
    })
    .await;
    assert_eq!(
        store
            .dump()
            .get(ResourceType::RouteConfiguration, "svc-routes")
            .unwrap()
            .status,
        ResourceStatus::Acked
    );

    // Control plane restart: config keeps serving, the client reconnects and resumes.
    let connects = running.server.connects();
    assert_eq!(connects, 1);
    running.stop().await;
    let before = store.load();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!store.dump().connected || store.load().generation() == before.generation());
    assert_eq!(
        port_of(&store.load(), "v3"),
        Some(8003),
        "nothing dropped while the server is down"
    );
    let (running, _) = start(cache.clone(), &addr.to_string()).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while running.server.connects() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "client did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cache.set_resources(world(
        &[("v1", 10), ("v3", 90)],
        &[("v1", 8001), ("v3", 8003)],
    ));
    wait(&store, "an update after the reconnect", |s| {
        weights(s) == vec![("v1".into(), 10), ("v3".into(), 90)]
    })
    .await;
    assert!(store.dump().connected);
    assert_eq!(port_of(&store.load(), "v1"), Some(8001));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_lifecycle() {
    lifecycle(ProtocolMode::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_lifecycle() {
    lifecycle(ProtocolMode::Delta).await;
}

#[tokio::test]
async fn unreachable_server_is_a_clear_error() {
    // Bind and drop to get a port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = XdsClient::builder(Bootstrap::new(format!("127.0.0.1:{port}"), "n"))
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .build()
        .unwrap();
    let err = client
        .listener("xds:///svc", Duration::from_millis(500))
        .await
        .unwrap_err();
    let XdsError::ListenerNotDelivered {
        name,
        waited,
        detail,
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(name, "svc");
    assert!(*waited >= Duration::from_millis(500));
    assert!(
        detail.contains(&format!(
            "xDS server http://127.0.0.1:{port} is unreachable"
        )),
        "{detail}"
    );
    assert!(
        err.to_string()
            .starts_with("listener \"svc\" was not delivered after waiting"),
        "{err}"
    );
}

/// The server's answer that a listener does not exist reaches the waiting caller at once
/// (SotW: absent from the full LDS response; delta: listed as removed), not after the timeout.
async fn missing_listener_fails_fast(mode: ProtocolMode) {
    let cache = ResourceCache::new();
    cache.set_resources(world(&[("v1", 1)], &[("v1", 1)]));
    let (running, addr) = start(cache, "127.0.0.1:0").await;
    let client = XdsClient::builder(Bootstrap::new(addr.to_string(), "n").with_protocol(mode))
        .build()
        .unwrap();
    // A known listener first, so the unknown one is a second subscription on a live stream.
    client.listener("svc", PATIENCE).await.unwrap();
    let started = std::time::Instant::now();
    let err = client
        .listener("xds:///nope", Duration::from_secs(60))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        err.to_string().contains("it does not exist on the server"),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "{mode:?}: waited {took:?}");
    println!("{mode:?}: unknown listener reported after {took:?}");
    // And from a cold start, when it is the first thing asked for.
    let cold = XdsClient::builder(Bootstrap::new(addr.to_string(), "m").with_protocol(mode))
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    cold.listener("xds:///nope", Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "{mode:?} cold");
    running.stop().await;
}

#[tokio::test]
async fn sotw_missing_listener_fails_fast() {
    missing_listener_fails_fast(ProtocolMode::Sotw).await;
}

#[tokio::test]
async fn delta_missing_listener_fails_fast() {
    missing_listener_fails_fast(ProtocolMode::Delta).await;
}

#[tokio::test]
async fn dropping_the_client_stops_its_stream() {
    let cache = ResourceCache::new();
    cache.set_resources(world(&[("v1", 1)], &[("v1", 1)]));
    let (running, addr) = start(cache.clone(), "127.0.0.1:0").await;
    let client = XdsClient::builder(Bootstrap::new(addr.to_string(), "n"))
        .build()
        .unwrap();
    client.listener("svc", PATIENCE).await.unwrap();
    let store = client.store().clone();
    drop(client);
    // The task ends; later changes are not received.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let generation = store.load().generation();
    cache.set_resources(world(&[("v1", 1)], &[("v1", 2)]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.load().generation(), generation);
    running.stop().await;
}
