//! The cost of one configuration update on the client, against how much it holds: one
//! endpoint of one cluster changes among 100, 1,000 and 10,000 services (each a listener,
//! a route configuration, an EDS cluster and 10 endpoints), and the client does all it does
//! for it: the delta response applied (decoded, translated, checked against the field
//! ledger), the ACK, the config dump and the snapshot published, the cluster registry
//! brought in step. Flat is the goal: the time follows the update, not the configuration.
//!
//! ```sh
//! cargo bench -p mesh-benches --bench update
//! ```

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3 as cpb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as epb;
use envoy_types::pb::envoy::config::listener::v3 as lpb;
use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use envoy_types::pb::google::protobuf::Any;
use mesh_core::xds::{AdsState, ProtocolMode, ResourceType};
use mesh_core::ConfigStore;
use mesh_tower::cluster::ClusterRegistry;
use prost::{Message, Name};

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn listener(i: usize) -> Any {
    let manager = hcm::HttpConnectionManager {
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                route_config_name: format!("r{i}"),
                config_source: None,
            },
        )),
        http_filters: vec![hcm::HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                &Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    any(&lpb::Listener {
        name: format!("l{i}"),
        api_listener: Some(lpb::ApiListener {
            api_listener: Some(any(&manager)),
        }),
        ..Default::default()
    })
}

fn routes(i: usize) -> Any {
    any(&rpb::RouteConfiguration {
        name: format!("r{i}"),
        virtual_hosts: vec![rpb::VirtualHost {
            name: "vh".into(),
            domains: vec!["*".into()],
            routes: vec![rpb::Route {
                r#match: Some(rpb::RouteMatch {
                    path_specifier: Some(rpb::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(rpb::route::Action::Route(rpb::RouteAction {
                    cluster_specifier: Some(rpb::route_action::ClusterSpecifier::Cluster(format!(
                        "c{i}"
                    ))),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    })
}

fn cluster(i: usize) -> Any {
    any(&cpb::Cluster {
        name: format!("c{i}"),
        cluster_discovery_type: Some(cpb::cluster::ClusterDiscoveryType::Type(3)),
        eds_cluster_config: Some(cpb::cluster::EdsClusterConfig {
            eds_config: None,
            service_name: format!("e{i}"),
        }),
        ..Default::default()
    })
}

fn endpoints(i: usize, first_port: u16) -> Any {
    let lb_endpoints = (0..10)
        .map(|k| epb::LbEndpoint {
            host_identifier: Some(epb::lb_endpoint::HostIdentifier::Endpoint(epb::Endpoint {
                address: Some(core::Address {
                    address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                        address: format!("10.0.{}.{}", i % 250, k + 1),
                        port_specifier: Some(core::socket_address::PortSpecifier::PortValue(
                            u32::from(if k == 0 { first_port } else { 8080 }),
                        )),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            ..Default::default()
        })
        .collect();
    any(&epb::ClusterLoadAssignment {
        cluster_name: format!("e{i}"),
        endpoints: vec![epb::LocalityLbEndpoints {
            lb_endpoints,
            ..Default::default()
        }],
        ..Default::default()
    })
}

fn response(
    rt: ResourceType,
    nonce: usize,
    resources: Vec<(String, Any)>,
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: rt.type_url().into(),
        nonce: format!("n{nonce}"),
        resources: resources
            .into_iter()
            .map(|(name, a)| Resource {
                name,
                version: format!("v{nonce}"),
                resource: Some(a),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// A client holding `n` services, as the xDS task holds them.
struct Client {
    ads: AdsState,
    store: ConfigStore,
    registry: std::sync::Arc<ClusterRegistry>,
    dump: Option<mesh_core::ConfigDump>,
    nonce: usize,
}

impl Client {
    fn new(n: usize) -> Self {
        let now = tokio::time::Instant::now();
        let node = core::Node {
            id: "bench".into(),
            ..Default::default()
        };
        let mut ads = AdsState::new(ProtocolMode::Delta, node);
        for i in 0..n {
            let _ = ads.watch_listener(&format!("l{i}"), now);
        }
        let _ = ads.on_connected(now);
        let store = ConfigStore::new();
        let registry = ClusterRegistry::new(store.clone());
        let mut client = Client {
            ads,
            store,
            registry,
            dump: None,
            nonce: 0,
        };
        type Make = fn(usize) -> Any;
        let all: [(ResourceType, Make, &str); 3] = [
            (ResourceType::Listener, listener, "l"),
            (ResourceType::RouteConfiguration, routes, "r"),
            (ResourceType::Cluster, cluster, "c"),
        ];
        for (rt, make, prefix) in all {
            let batch = (0..n).map(|i| (format!("{prefix}{i}"), make(i))).collect();
            client.apply(rt, batch);
        }
        let batch = (0..n)
            .map(|i| (format!("e{i}"), endpoints(i, 8080)))
            .collect();
        client.apply(ResourceType::ClusterLoadAssignment, batch);
        assert_eq!(client.store.load().endpoint_assignments().len(), n);
        assert_eq!(client.registry.get("c0").expect("c0").endpoints().len(), 10);
        client
    }

    /// What the client's task does with one response.
    fn apply(&mut self, rt: ResourceType, resources: Vec<(String, Any)>) {
        self.nonce += 1;
        let step = self.ads.on_delta_response(
            response(rt, self.nonce, resources),
            tokio::time::Instant::now(),
        );
        assert!(!step.send.is_empty(), "an ACK");
        if step.dump_changed || step.snapshot_changed {
            // Replaced as the store replaces the dump it publishes.
            self.dump = Some(self.ads.config_dump("bench", None));
        }
        if step.snapshot_changed {
            self.store
                .publish(self.ads.publish_view(tokio::time::Instant::now()));
            self.registry.sync(&self.store.load());
        }
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _enter = rt.enter();
    println!("| services held | setup | one-endpoint update, median | mean | p99 |");
    println!("|---:|---:|---:|---:|---:|");
    let mut medians = Vec::new();
    for n in [100, 1_000, 10_000] {
        let started = Instant::now();
        let mut client = Client::new(n);
        let setup = started.elapsed();
        let mut times: Vec<Duration> = Vec::new();
        let rounds = 2_000;
        for round in 0..rounds {
            let i = (round * 7919) % n;
            let port = 9000 + (round % 1000) as u16;
            let t = Instant::now();
            client.apply(
                ResourceType::ClusterLoadAssignment,
                vec![(format!("e{i}"), endpoints(i, port))],
            );
            times.push(t.elapsed());
            let c = client.registry.get(&format!("c{i}")).expect("cluster");
            assert!(c.endpoints().iter().any(|e| e.address.port() == port));
        }
        times.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let mean = times.iter().map(|d| us(*d)).sum::<f64>() / times.len() as f64;
        let median = us(times[times.len() / 2]);
        medians.push(median);
        println!(
            "| {n} | {:.0} ms | {median:.1} µs | {mean:.1} µs | {:.1} µs |",
            setup.as_secs_f64() * 1e3,
            us(times[times.len() * 99 / 100])
        );
    }
    println!(
        "\nmedian at 10,000 services / at 100: {:.2}x (flat: 1.0)",
        medians[2] / medians[0]
    );
    // What a client under churn receives: one response changing 100 of 1,000 services.
    let n = 1_000;
    let mut client = Client::new(n);
    let mut times: Vec<Duration> = Vec::new();
    for round in 0..200usize {
        let port = 9000 + (round % 1000) as u16;
        let batch = (0..100)
            .map(|k| {
                let i = (round * 100 + k * 7) % n;
                (format!("e{i}"), endpoints(i, port))
            })
            .collect();
        let t = Instant::now();
        client.apply(ResourceType::ClusterLoadAssignment, batch);
        times.push(t.elapsed());
    }
    times.sort();
    let median = times[times.len() / 2].as_secs_f64() * 1e6;
    println!(
        "\none response changing 100 of {n} services: median {median:.0} µs, {:.1} µs per assignment",
        median / 100.0
    );
}
