//! Aggregate clusters (`envoy.clusters.aggregate`, gRFC A37/A75) over a real ADS stream: the
//! route names the aggregate; requests go to its first cluster while that has an endpoint,
//! fail over to the next when it has none (its EDS empties), and come back when it recovers,
//! with no failed request. The client subscribes to the aggregate's clusters by itself.

mod support;

use support::wait_until;

use std::sync::atomic::Ordering;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use mesh_control::ads::ResourceCache;
use mesh_core::xds::{Bootstrap, XdsClient};
use mesh_tower::MeshClient;

const PATIENCE: Duration = Duration::from_secs(20);

fn aggregate(name: &str, children: &[&str]) -> envoy_types::pb::google::protobuf::Any {
    let yaml = format!(
        r#"
name: {name}
connect_timeout: 1s
lb_policy: CLUSTER_PROVIDED
cluster_type:
  name: envoy.clusters.aggregate
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig
    clusters: [{}]
"#,
        children.join(", ")
    );
    let c: PbCluster = mesh_core::xds::file::from_yaml(&yaml, "aggregate.yaml").unwrap();
    support::xds::any(&c)
}

fn no_endpoints(name: &str) -> envoy_types::pb::google::protobuf::Any {
    support::xds::any(&ClusterLoadAssignment {
        cluster_name: name.into(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_fails_over_in_priority_order_and_back() {
    let primary = support::backend("primary").await;
    let secondary = support::backend("secondary").await;
    let world = |primary_up: bool| {
        vec![
            support::xds::listener("svc", "svc-routes"),
            support::xds::routes("svc-routes", &[("both", 100)]),
            aggregate("both", &["primary", "secondary"]),
            support::xds::cluster("primary", "primary"),
            support::xds::cluster("secondary", "secondary"),
            if primary_up {
                support::xds::endpoints("primary", primary.addr.port())
            } else {
                no_endpoints("primary")
            },
            support::xds::endpoints("secondary", secondary.addr.port()),
        ]
    };
    let cache = ResourceCache::new();
    cache.set_resources(world(true));
    let addr = support::ads_server(&cache).await;
    let xds = XdsClient::builder(Bootstrap::new(addr.to_string(), "aggregate-test"))
        .build()
        .unwrap();
    xds.listener("xds:///svc", PATIENCE).await.unwrap();
    let store = xds.store().clone();
    store
        .wait_for(PATIENCE, |s| {
            s.endpoints_for_cluster("primary").is_some()
                && s.endpoints_for_cluster("secondary").is_some()
        })
        .await
        .expect("the aggregate's clusters and endpoints are subscribed and arrive");
    let client = MeshClient::builder(store, "xds:///svc").unwrap().build();

    let load = support::load(&client);
    let p = || primary.hits.load(Ordering::Relaxed);
    let s = || secondary.hits.load(Ordering::Relaxed);
    wait_until("the primary serving", || p() > 50).await;
    assert_eq!(
        s(),
        0,
        "the second cluster takes nothing while the first can"
    );

    cache.set_resources(world(false));
    wait_until("failover to the secondary", || s() > 50).await;
    let at = p();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(p(), at, "nothing goes to a cluster without endpoints");

    cache.set_resources(world(true));
    let back = p();
    wait_until("back on the primary", || p() > back + 50).await;
    let at = s();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s(), at, "the first cluster takes everything again");

    let (sent, failed) = load.finish().await;
    println!(
        "aggregate: {sent} sent, {failed} failed; primary {}, secondary {}",
        p(),
        s()
    );
    assert!(sent > 150, "{sent}");
    assert_eq!(failed, 0);
}
