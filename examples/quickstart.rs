//! # quickstart
//!
//! `cargo run -p mesh-examples --bin quickstart`
//!
//! Starts an xDS server in-process (the mesh's own `mesh-control`), loads it with the
//! resources of `examples/quickstart.yaml` (a 90/10 split of `frontend` between v1 and v2),
//! and connects the mesh's xDS client to it over a real ADS stream on 127.0.0.1. It prints
//! what the client holds, then pushes a 50/50 split, then a broken route that the client
//! NACKs while the last good config keeps serving.
//!
//! Options: `--delta` uses incremental xDS instead of state-of-the-world.
//!
//! The request path (routing, balancing, mTLS, metrics) comes with the outbound layers; this
//! demo shows the configuration half that everything else reads.

use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use mesh_control::ads::{AdsServer, ResourceCache, Verdict};
use mesh_core::config::{ClusterSpecifier, RouteAction, Snapshot};
use mesh_core::xds::{file, Bootstrap, ProtocolMode, XdsClient};
use prost::{Message, Name};

const TARGET: &str = "xds:///frontend.prod.svc.cluster.local:80";

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[tokio::main]
async fn main() -> Result<()> {
    let mode = if std::env::args().any(|a| a == "--delta") {
        ProtocolMode::Delta
    } else {
        ProtocolMode::Sotw
    };
    let yaml = include_str!("quickstart.yaml");
    let mut resources =
        file::from_yaml::<DiscoveryResponse>(yaml, "examples/quickstart.yaml")?.resources;

    // 1. The control plane, in-process.
    let cache = ResourceCache::new();
    cache.set_resources(resources.clone());
    let server = AdsServer::new(cache.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(server.clone().serve(listener, std::future::pending()));
    println!("xDS server listening on {addr} ({mode:?})");

    // 2. The mesh's xDS client, as a service would start it.
    let bootstrap = Bootstrap::new(addr.to_string(), "quickstart-client").with_protocol(mode);
    let client = XdsClient::builder(bootstrap).build()?;
    let listener = client.listener(TARGET, Duration::from_secs(10)).await?;
    let store = client.store().clone();
    let snap = store
        .wait_for(Duration::from_secs(10), |s| {
            split(s, &listener.name).is_some_and(|v| v.iter().all(|(_, _, e)| *e > 0))
        })
        .await
        .map_err(|_| "endpoints did not arrive")?;
    println!("\n== {TARGET}: configuration received");
    print_split(&snap, &listener.name);
    print_status(&client);

    // 3. Shift the split: the control plane pushes, the client applies.
    set_weights(&mut resources, 50, 50)?;
    cache.set_resources(resources.clone());
    let snap = store
        .wait_for(Duration::from_secs(10), |s| {
            split(s, &listener.name).is_some_and(|v| v[0].1 == 50)
        })
        .await
        .map_err(|_| "the 50/50 update did not arrive")?;
    println!(
        "\n== pushed a 50/50 split (generation {})",
        snap.generation()
    );
    print_split(&snap, &listener.name);

    // 4. A broken route: NACKed with the field path, last good config keeps serving.
    set_weights(&mut resources, 0, 0)?;
    cache.set_resources(resources.clone());
    let nack = loop {
        if let Some(n) = server.nacks().into_iter().next() {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if let Verdict::Nack(detail) = &nack.verdict {
        println!("\n== pushed weights 0/0: the client NACKed it\n   {detail}");
    }
    println!("   still serving:");
    print_split(&store.load(), &listener.name);
    print_status(&client);
    Ok(())
}

/// (cluster, weight, endpoint count) of the first route of the listener's first virtual host.
fn split(s: &Snapshot, listener: &str) -> Option<Vec<(String, u32, usize)>> {
    let rc = s.routes_for_listener(listener)?;
    let RouteAction::Forward(fwd) = &rc.virtual_hosts.first()?.routes.first()?.action else {
        return None;
    };
    let ClusterSpecifier::Weighted(w) = &fwd.cluster else {
        return None;
    };
    Some(
        w.clusters
            .iter()
            .map(|c| {
                let eps = s
                    .endpoints_for_cluster(&c.name)
                    .map_or(0, |e| e.endpoints().count());
                (c.name.clone(), c.weight, eps)
            })
            .collect(),
    )
}

fn print_split(s: &Snapshot, listener: &str) {
    for (cluster, weight, eps) in split(s, listener).unwrap_or_default() {
        let addrs: Vec<String> = s
            .endpoints_for_cluster(&cluster)
            .map(|e| {
                e.endpoints()
                    .map(|(_, ep)| ep.address.to_string())
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "   {weight:>3}%  {cluster}  ({eps} endpoints: {})",
            addrs.join(", ")
        );
    }
}

fn print_status(client: &XdsClient) {
    println!("   {:<24} {:<52} {:<8} STATUS", "TYPE", "NAME", "VERSION");
    for r in &client.store().dump().resources {
        println!(
            "   {:<24} {:<52} {:<8} {}",
            r.resource_type,
            r.name,
            r.version,
            r.status.as_str()
        );
    }
}

fn set_weights(resources: &mut [Any], v1: u32, v2: u32) -> Result<()> {
    use envoy_types::pb::envoy::config::route::v3::route::Action;
    use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier as C;
    for any in resources
        .iter_mut()
        .filter(|a| a.type_url == RouteConfiguration::type_url())
    {
        let mut rc = RouteConfiguration::decode(any.value.as_slice())?;
        if let Some(Action::Route(ra)) = &mut rc.virtual_hosts[0].routes[0].action {
            if let Some(C::WeightedClusters(w)) = &mut ra.cluster_specifier {
                w.clusters[0].weight = Some(UInt32Value { value: v1 });
                w.clusters[1].weight = Some(UInt32Value { value: v2 });
            }
        }
        any.value = rc.encode_to_vec();
    }
    Ok(())
}
