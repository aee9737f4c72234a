//! The mesh's xDS client against nebucloud-xds serving the Envoy Gateway fixtures over
//! state-of-the-world and delta ADS. Our client must receive every resource of each case and
//! translate it to exactly what the same bytes translate to offline.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use mesh_core::xds::{file, Bootstrap, ProtocolMode, ResourceType, XdsClient};
use mesh_core::ResourceStatus;
use nebucloud_xds::prelude::*;
use prost::Message;

const CASES: [&str; 5] = [
    "http-route-weighted-backend",
    "retry",
    "circuit-breaker",
    "http-route-timeout",
    "http-route-regex",
];

#[path = "../../../mesh-core/tests/support/unhonoured.rs"]
mod unhonoured;

fn fixtures() -> PathBuf {
    std::env::var_os("MESH_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/xds"))
        })
}

fn load(case: &str) -> Vec<envoy_types::pb::google::protobuf::Any> {
    ["listeners", "routes", "clusters", "endpoints"]
        .iter()
        .flat_map(|kind| {
            let path = fixtures().join(format!("envoy-gateway/{case}.{kind}.pb"));
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            DiscoveryResponse::decode(bytes.as_slice())
                .unwrap()
                .resources
        })
        // The protocol is under test here, not translation: serve what the mesh accepts (the
        // fields it refuses are checked by mesh-core's fixture tests).
        .map(|a| unhonoured::without_unhonoured(&a))
        .collect()
}

fn name_of(any: &envoy_types::pb::google::protobuf::Any) -> String {
    let snap = file::snapshot_from_resources(std::slice::from_ref(any)).unwrap();
    let name = snap
        .listeners()
        .keys()
        .chain(snap.route_configs().keys())
        .chain(snap.clusters().keys())
        .chain(snap.endpoint_assignments().keys())
        .next()
        .unwrap()
        .to_owned();
    name
}

/// A fixture resource in nebucloud's resource trait (its own `AnyResource` is not exported).
#[derive(Debug)]
struct Fixture {
    name: String,
    any: prost_types_013::Any,
}

impl nebucloud_xds::core::Resource for Fixture {
    fn type_url(&self) -> &str {
        &self.any.type_url
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn encode(&self) -> Result<prost_types_013::Any, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.any.clone())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

async fn run(mode: ProtocolMode) {
    // nebucloud binds its own address: find a free port first.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cache = Arc::new(ShardedCache::new());
    let node = format!("interop-{mode:?}");

    let mut server = XdsServer::builder().cache(cache.clone());
    server = match mode {
        ProtocolMode::Sotw => server.enable_sotw(),
        ProtocolMode::Delta => server.enable_delta(),
    };
    let server = server.build().unwrap();
    let (stop, stop_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(server.serve_with_shutdown(addr, stop_rx));

    for (i, case) in CASES.iter().enumerate() {
        let resources = load(case);
        let mut builder = Snapshot::builder().version(format!("fixture-{i}"));
        for rt in ResourceType::ALL {
            let list: Vec<BoxResource> = resources
                .iter()
                .filter(|a| a.type_url == rt.type_url())
                .map(|a| {
                    let any = prost_types_013::Any {
                        type_url: a.type_url.clone(),
                        value: a.value.clone(),
                    };
                    Arc::new(Fixture {
                        name: name_of(a),
                        any,
                    }) as BoxResource
                })
                .collect();
            builder = builder.resources(TypeUrl::new(rt.type_url()), list);
        }
        cache.set_snapshot(NodeHash::from_id(&node), builder.build());

        let expected = file::snapshot_from_resources(&resources).unwrap();
        // Subscribe to every listener of the case before the stream opens, so they go out in
        // its first request: nebucloud-xds (0.1.0) does not answer a SotW request whose
        // resource_names grew while its version_info is current (the xDS protocol requires
        // it), and a watch added after the first response would wait for that answer forever.
        let mut builder =
            XdsClient::builder(Bootstrap::new(addr.to_string(), node.clone()).with_protocol(mode))
                .backoff(Duration::from_millis(100), Duration::from_millis(500));
        for name in expected.listeners().keys() {
            builder = builder.watch_listener(name);
        }
        let client = builder.build().unwrap();
        let store = client.store().clone();
        for name in expected.listeners().keys() {
            client
                .listener(name, Duration::from_secs(20))
                .await
                .unwrap();
        }
        let got = store
            .wait_for(Duration::from_secs(20), |s| {
                s.listeners() == expected.listeners()
                    && s.route_configs() == expected.route_configs()
                    && s.clusters() == expected.clusters()
                    && s.endpoint_assignments() == expected.endpoint_assignments()
            })
            .await
            .unwrap_or_else(|s| {
                panic!("{mode:?} {case}: not everything arrived: {s:#?}\nexpected {expected:#?}")
            });
        if *case == "http-route-weighted-backend" {
            let cla = got.endpoints_for_cluster("first-route-dest").unwrap();
            assert_eq!(
                cla.localities.iter().map(|l| l.weight).collect::<Vec<_>>(),
                vec![20, 40, 20, 20]
            );
        }
        let dump = store.dump();
        assert_eq!(dump.resources.len(), resources.len(), "{mode:?} {case}");
        for r in &dump.resources {
            assert_eq!(r.status, ResourceStatus::Acked, "{mode:?} {case}: {r:?}");
        }
        println!(
            "{mode:?} {case}: received and ACKed {} resources from nebucloud-xds",
            dump.resources.len()
        );
    }

    let _ = stop.send(());
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_against_nebucloud() {
    run(ProtocolMode::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_against_nebucloud() {
    run(ProtocolMode::Delta).await;
}
