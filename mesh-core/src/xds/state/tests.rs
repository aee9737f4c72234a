//! The ADS state machine, driven without sockets.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cpb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as epb;
use envoy_types::pb::envoy::config::listener::v3 as lpb;
use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryResponse, Resource as DeltaResource,
};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use prost::{Message, Name};
use tokio::time::Instant;

use super::*;

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

pub(crate) fn listener(name: &str, rds: &str) -> Any {
    let manager = hcm::HttpConnectionManager {
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                route_config_name: rds.into(),
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
        name: name.into(),
        api_listener: Some(lpb::ApiListener {
            api_listener: Some(any(&manager)),
        }),
        ..Default::default()
    })
}

pub(crate) fn routes(name: &str, clusters: &[(&str, u32)]) -> Any {
    let spec = if clusters.len() == 1 {
        rpb::route_action::ClusterSpecifier::Cluster(clusters[0].0.into())
    } else {
        rpb::route_action::ClusterSpecifier::WeightedClusters(rpb::WeightedCluster {
            clusters: clusters
                .iter()
                .map(|(n, w)| rpb::weighted_cluster::ClusterWeight {
                    name: (*n).into(),
                    weight: Some(UInt32Value { value: *w }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    };
    any(&rpb::RouteConfiguration {
        name: name.into(),
        virtual_hosts: vec![rpb::VirtualHost {
            name: "vh".into(),
            domains: vec!["*".into()],
            routes: vec![rpb::Route {
                r#match: Some(rpb::RouteMatch {
                    path_specifier: Some(rpb::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(rpb::route::Action::Route(rpb::RouteAction {
                    cluster_specifier: Some(spec),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    })
}

pub(crate) fn cluster(name: &str) -> Any {
    any(&cpb::Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cpb::cluster::ClusterDiscoveryType::Type(3)),
        eds_cluster_config: Some(cpb::cluster::EdsClusterConfig {
            eds_config: None,
            service_name: format!("{name}-eds"),
        }),
        ..Default::default()
    })
}

pub(crate) fn endpoints(name: &str, ports: &[u16]) -> Any {
    any(&epb::ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![epb::LocalityLbEndpoints {
            lb_endpoints: ports
                .iter()
                .map(|p| epb::LbEndpoint {
                    host_identifier: Some(epb::lb_endpoint::HostIdentifier::Endpoint(
                        epb::Endpoint {
                            address: Some(core::Address {
                                address: Some(core::address::Address::SocketAddress(
                                    core::SocketAddress {
                                        address: "127.0.0.1".into(),
                                        port_specifier: Some(
                                            core::socket_address::PortSpecifier::PortValue(
                                                u32::from(*p),
                                            ),
                                        ),
                                        ..Default::default()
                                    },
                                )),
                            }),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    })
}

fn sotw(rt: ResourceType, version: &str, nonce: &str, resources: Vec<Any>) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.into(),
        resources,
        type_url: rt.type_url().into(),
        nonce: nonce.into(),
        ..Default::default()
    }
}

fn sotw_reqs(out: &[Outbound]) -> Vec<&DiscoveryRequest> {
    out.iter()
        .map(|o| match o {
            Outbound::Sotw(r) => r,
            Outbound::Delta(_) => panic!("delta request on a SotW stream"),
        })
        .collect()
}

fn delta_reqs(out: &[Outbound]) -> Vec<&DeltaDiscoveryRequest> {
    out.iter()
        .map(|o| match o {
            Outbound::Delta(r) => r,
            Outbound::Sotw(_) => panic!("SotW request on a delta stream"),
        })
        .collect()
}

fn node() -> Node {
    Node {
        id: "test-node".into(),
        ..Default::default()
    }
}

/// Drives a SotW client through the whole cascade and returns it with everything held.
fn sotw_cascade(now: Instant) -> AdsState {
    let mut ads = AdsState::new(ProtocolMode::Sotw, node());
    assert!(
        ads.watch_listener("svc", now).send.is_empty(),
        "nothing is sent before connecting"
    );
    let out = ads.on_connected(now).send;
    let r = sotw_reqs(&out);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].type_url, ResourceType::Listener.type_url());
    assert_eq!(r[0].resource_names, vec!["svc"]);
    assert_eq!(r[0].node.as_ref().unwrap().id, "test-node");
    assert_eq!(
        (r[0].version_info.as_str(), r[0].response_nonce.as_str()),
        ("", "")
    );

    let out = ads
        .on_sotw_response(
            sotw(
                ResourceType::Listener,
                "1",
                "n1",
                vec![listener("svc", "rc")],
            ),
            now,
        )
        .send;
    let r = sotw_reqs(&out);
    assert_eq!(r.len(), 2, "ACK plus the RDS subscription: {r:?}");
    assert_eq!(
        (r[0].version_info.as_str(), r[0].response_nonce.as_str()),
        ("1", "n1")
    );
    assert!(r[0].error_detail.is_none());
    assert!(r[0].node.is_none(), "node goes in the first request only");
    assert_eq!(r[1].type_url, ResourceType::RouteConfiguration.type_url());
    assert_eq!(r[1].resource_names, vec!["rc"]);

    let out = ads
        .on_sotw_response(
            sotw(
                ResourceType::RouteConfiguration,
                "1",
                "n2",
                vec![routes("rc", &[("v1", 90), ("v2", 10)])],
            ),
            now,
        )
        .send;
    let r = sotw_reqs(&out);
    assert_eq!(r[1].type_url, ResourceType::Cluster.type_url());
    assert_eq!(r[1].resource_names, vec!["v1", "v2"]);

    let out = ads
        .on_sotw_response(
            sotw(
                ResourceType::Cluster,
                "1",
                "n3",
                vec![cluster("v1"), cluster("v2")],
            ),
            now,
        )
        .send;
    let r = sotw_reqs(&out);
    assert_eq!(r[1].resource_names, vec!["v1-eds", "v2-eds"]);

    let step = ads.on_sotw_response(
        sotw(
            ResourceType::ClusterLoadAssignment,
            "1",
            "n4",
            vec![endpoints("v1-eds", &[8001]), endpoints("v2-eds", &[8002])],
        ),
        now,
    );
    assert!(step.snapshot_changed, "the endpoints complete the snapshot");
    assert_eq!(step.verdict, Some(Verdict::Ack));
    let out = step.send;
    assert_eq!(sotw_reqs(&out).len(), 1, "only the ACK");
    ads
}

#[test]
fn sotw_cascade_and_acks() {
    let now = Instant::now();
    let ads = sotw_cascade(now);
    let snap = ads.snapshot();
    assert!(snap.routes_for_listener("svc").is_some());
    assert_eq!(
        snap.endpoints_for_cluster("v2").unwrap().localities[0].endpoints[0]
            .address
            .port(),
        8002
    );
    for rt in ResourceType::ALL {
        assert!(ads
            .dump()
            .iter()
            .filter(|d| d.resource_type == rt)
            .all(|d| d.status == ResourceStatus::Acked));
    }
}

#[test]
fn sotw_nack_keeps_last_good_and_applies_the_good_ones() {
    let now = Instant::now();
    let mut ads = sotw_cascade(now);
    // One good cluster update and one that cannot be used, in the same response.
    let bad = any(&cpb::Cluster {
        name: "v2".into(),
        cluster_discovery_type: Some(cpb::cluster::ClusterDiscoveryType::Type(1)),
        ..Default::default()
    });
    let mut good = cpb::Cluster::decode(cluster("v1").value.as_slice()).unwrap();
    good.connect_timeout = Some(envoy_types::pb::google::protobuf::Duration {
        seconds: 2,
        nanos: 0,
    });
    let step = ads.on_sotw_response(
        sotw(ResourceType::Cluster, "2", "n5", vec![any(&good), bad]),
        now,
    );
    assert_eq!(
        step.verdict,
        Some(Verdict::Nack(
            "cluster \"v2\": load_assignment: a DNS cluster needs load_assignment".into()
        ))
    );
    assert!(step.snapshot_changed, "the good cluster is applied");
    assert!(step.dump_changed);
    let out = step.send;
    let r = sotw_reqs(&out);
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0].version_info, "1",
        "a NACK carries the last accepted version"
    );
    assert_eq!(r[0].response_nonce, "n5");
    let detail = r[0].error_detail.as_ref().unwrap();
    assert_eq!(detail.code, 3);
    assert_eq!(
        detail.message,
        "cluster \"v2\": load_assignment: a DNS cluster needs load_assignment"
    );
    let snap = ads.snapshot();
    assert_eq!(
        snap.cluster("v1").unwrap().connect_timeout,
        Duration::from_secs(2),
        "good resource applied"
    );
    assert!(
        snap.cluster("v2").unwrap().eds_service_name().is_some(),
        "last good v2 keeps serving"
    );
    assert_eq!(
        ads.status(ResourceType::Cluster, "v2"),
        Some(ResourceStatus::Nacked)
    );
    assert_eq!(
        ads.status(ResourceType::Cluster, "v1"),
        Some(ResourceStatus::Acked)
    );
    let dump = ads.dump();
    let v2 = dump
        .iter()
        .find(|d| d.name == "v2" && d.resource_type == ResourceType::Cluster)
        .unwrap();
    assert_eq!(v2.version, "1");
    let rejected = v2.error.as_ref().unwrap();
    assert_eq!(rejected.version, "2");
    // The dump keeps the error typed: resource, field and message apart.
    assert_eq!(rejected.error.resource_type, ResourceType::Cluster);
    assert_eq!(rejected.error.name, "v2");
    assert_eq!(rejected.error.path, "load_assignment");
    assert_eq!(
        rejected.error.message,
        "a DNS cluster needs load_assignment"
    );
    assert_eq!(
        ads.error(ResourceType::Cluster, "v2"),
        Some(&rejected.error)
    );
    // The next good push clears the NACK.
    let out = ads
        .on_sotw_response(
            sotw(
                ResourceType::Cluster,
                "3",
                "n6",
                vec![any(&good), cluster("v2")],
            ),
            now,
        )
        .send;
    assert_eq!(sotw_reqs(&out)[0].version_info, "3");
    assert!(sotw_reqs(&out)[0].error_detail.is_none());
    assert_eq!(
        ads.status(ResourceType::Cluster, "v2"),
        Some(ResourceStatus::Acked)
    );
}

#[test]
fn sotw_deletion_semantics() {
    let now = Instant::now();
    let mut ads = sotw_cascade(now);
    // RDS/EDS: absence from a response is not deletion.
    let out = ads
        .on_sotw_response(
            sotw(
                ResourceType::ClusterLoadAssignment,
                "2",
                "e2",
                vec![endpoints("v1-eds", &[9001])],
            ),
            now,
        )
        .send;
    assert!(sotw_reqs(&out)[0].error_detail.is_none());
    assert!(
        ads.snapshot().endpoints_for_cluster("v2").is_some(),
        "v2 endpoints kept"
    );
    // CDS: absence is deletion, and the deleted cluster's EDS subscription is dropped.
    let out = ads
        .on_sotw_response(
            sotw(ResourceType::Cluster, "2", "c2", vec![cluster("v1")]),
            now,
        )
        .send;
    let r = sotw_reqs(&out);
    assert_eq!(r.len(), 2);
    assert_eq!(
        r[1].type_url,
        ResourceType::ClusterLoadAssignment.type_url()
    );
    assert_eq!(r[1].resource_names, vec!["v1-eds"]);
    assert!(ads.snapshot().cluster("v2").is_none());
    assert_eq!(
        ads.status(ResourceType::Cluster, "v2"),
        Some(ResourceStatus::DoesNotExist)
    );
    // LDS: deleting the listener unwinds the cascade (empty lists, never wildcard).
    let out = ads
        .on_sotw_response(sotw(ResourceType::Listener, "2", "l2", vec![]), now)
        .send;
    let r = sotw_reqs(&out);
    let names: Vec<(&str, usize)> = r
        .iter()
        .map(|r| (r.type_url.as_str(), r.resource_names.len()))
        .collect();
    assert_eq!(
        names[0],
        (ResourceType::Listener.type_url(), 1),
        "ACK keeps the listener subscribed"
    );
    assert!(names[1..].iter().all(|(_, n)| *n == 0), "{names:?}");
    assert_eq!(r.len(), 4, "RDS, CDS and EDS unsubscribed");
    let snap = ads.snapshot();
    assert!(
        snap.listeners().is_empty()
            && snap.route_configs().is_empty()
            && snap.clusters().is_empty()
    );
    assert_eq!(
        ads.status(ResourceType::Listener, "svc"),
        Some(ResourceStatus::DoesNotExist)
    );
}

#[test]
fn sotw_unnamed_garbage_never_deletes() {
    let now = Instant::now();
    let mut ads = sotw_cascade(now);
    let garbage = Any {
        type_url: ResourceType::Cluster.type_url().into(),
        value: vec![0xff, 0xff, 0xff],
    };
    let out = ads
        .on_sotw_response(sotw(ResourceType::Cluster, "2", "c2", vec![garbage]), now)
        .send;
    let r = sotw_reqs(&out);
    assert!(r[0]
        .error_detail
        .as_ref()
        .unwrap()
        .message
        .contains("cannot decode protobuf"));
    assert!(ads.snapshot().cluster("v1").is_some() && ads.snapshot().cluster("v2").is_some());
}

#[test]
fn reconnect_resubscribes_with_versions_and_keeps_config() {
    let now = Instant::now();
    let mut ads = sotw_cascade(now);
    let before = ads.snapshot().clone();
    let _ = ads.on_disconnected();
    assert!(!ads.is_connected());
    let out = ads.on_connected(now).send;
    let r = sotw_reqs(&out);
    assert_eq!(r.len(), 4, "every type resubscribed");
    assert!(r[0].node.is_some(), "node again on the new stream");
    for req in &r {
        assert_eq!(
            req.version_info, "1",
            "{}: held version offered",
            req.type_url
        );
        assert_eq!(req.response_nonce, "", "nonces belong to the old stream");
    }
    assert_eq!(ads.snapshot(), &before, "nothing dropped by the reconnect");
}

#[test]
fn does_not_exist_timer() {
    let now = Instant::now();
    let mut ads = AdsState::new(ProtocolMode::Sotw, node());
    let _ = ads.watch_listener("svc", now);
    let _ = ads.on_connected(now);
    let _ = ads.on_sotw_response(
        sotw(
            ResourceType::Listener,
            "1",
            "n1",
            vec![listener("svc", "rc")],
        ),
        now,
    );
    assert_eq!(ads.next_deadline(), Some(now + DOES_NOT_EXIST_TIMEOUT));
    let _ = ads.poll_timers(now + Duration::from_secs(14));
    assert_eq!(
        ads.status(ResourceType::RouteConfiguration, "rc"),
        Some(ResourceStatus::Requested)
    );
    let _ = ads.poll_timers(now + DOES_NOT_EXIST_TIMEOUT);
    assert_eq!(
        ads.status(ResourceType::RouteConfiguration, "rc"),
        Some(ResourceStatus::DoesNotExist)
    );
    assert_eq!(ads.next_deadline(), None);
    // While disconnected, silence proves nothing: timers are off.
    let mut ads = AdsState::new(ProtocolMode::Sotw, node());
    let _ = ads.watch_listener("svc", now);
    let _ = ads.on_connected(now);
    let _ = ads.on_disconnected();
    assert_eq!(ads.next_deadline(), None);
}

#[test]
fn unknown_type_is_nacked() {
    let now = Instant::now();
    let mut ads = AdsState::new(ProtocolMode::Sotw, node());
    let _ = ads.watch_listener("svc", now);
    let _ = ads.on_connected(now);
    let out = ads
        .on_sotw_response(
            DiscoveryResponse {
                type_url: "type.googleapis.com/example.Nope".into(),
                nonce: "x".into(),
                ..Default::default()
            },
            now,
        )
        .send;
    let r = sotw_reqs(&out);
    assert!(r[0]
        .error_detail
        .as_ref()
        .unwrap()
        .message
        .contains("unsupported type_url"));
}

fn delta(
    rt: ResourceType,
    nonce: &str,
    resources: Vec<(&str, &str, Any)>,
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: rt.type_url().into(),
        nonce: nonce.into(),
        resources: resources
            .into_iter()
            .map(|(name, version, a)| DeltaResource {
                name: name.into(),
                version: version.into(),
                resource: Some(a),
                ..Default::default()
            })
            .collect(),
        removed_resources: removed.iter().map(|s| (*s).into()).collect(),
        ..Default::default()
    }
}

#[test]
fn delta_cascade_nack_removal_and_reconnect() {
    let now = Instant::now();
    let mut ads = AdsState::new(ProtocolMode::Delta, node());
    let _ = ads.watch_listener("svc", now);
    let out = ads.on_connected(now).send;
    let r = delta_reqs(&out);
    assert_eq!(r[0].resource_names_subscribe, vec!["svc"]);
    assert!(r[0].node.is_some());
    let out = ads
        .on_delta_response(
            delta(
                ResourceType::Listener,
                "d1",
                vec![("svc", "l1", listener("svc", "rc"))],
                &[],
            ),
            now,
        )
        .send;
    let r = delta_reqs(&out);
    assert_eq!(r[0].response_nonce, "d1");
    assert!(r[0].error_detail.is_none());
    assert_eq!(r[1].resource_names_subscribe, vec!["rc"]);
    let out = ads
        .on_delta_response(
            delta(
                ResourceType::RouteConfiguration,
                "d2",
                vec![("rc", "r1", routes("rc", &[("v1", 1), ("v2", 1)]))],
                &[],
            ),
            now,
        )
        .send;
    assert_eq!(
        delta_reqs(&out)[1].resource_names_subscribe,
        vec!["v1", "v2"]
    );
    let _ = ads.on_delta_response(
        delta(
            ResourceType::Cluster,
            "d3",
            vec![("v1", "c1", cluster("v1")), ("v2", "c1", cluster("v2"))],
            &[],
        ),
        now,
    );
    let _ = ads.on_delta_response(
        delta(
            ResourceType::ClusterLoadAssignment,
            "d4",
            vec![
                ("v1-eds", "e1", endpoints("v1-eds", &[1])),
                ("v2-eds", "e1", endpoints("v2-eds", &[2])),
            ],
            &[],
        ),
        now,
    );
    assert!(ads.snapshot().endpoints_for_cluster("v1").is_some());

    // A bad route update is NACKed; the old one serves.
    let out = ads
        .on_delta_response(
            delta(
                ResourceType::RouteConfiguration,
                "d5",
                vec![("rc", "r2", routes("rc", &[("v1", 0), ("v2", 0)]))],
                &[],
            ),
            now,
        )
        .send;
    let r = delta_reqs(&out);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].response_nonce, "d5");
    assert!(r[0]
        .error_detail
        .as_ref()
        .unwrap()
        .message
        .contains("total weight is 0"));
    assert_eq!(
        ads.snapshot().route_config("rc").unwrap().cluster_names(),
        vec!["v1", "v2"]
    );

    // A good update shrinks the split to v1: v2 is unsubscribed down the cascade.
    let out = ads
        .on_delta_response(
            delta(
                ResourceType::RouteConfiguration,
                "d6",
                vec![("rc", "r3", routes("rc", &[("v1", 1)]))],
                &[],
            ),
            now,
        )
        .send;
    let r = delta_reqs(&out);
    assert_eq!(r[1].resource_names_unsubscribe, vec!["v2"]);
    assert_eq!(r[2].resource_names_unsubscribe, vec!["v2-eds"]);
    assert!(ads.snapshot().cluster("v2").is_none());

    // Removal by the server.
    let _ = ads.on_delta_response(
        delta(
            ResourceType::ClusterLoadAssignment,
            "d7",
            vec![],
            &["v1-eds"],
        ),
        now,
    );
    assert!(ads.snapshot().endpoints_for_cluster("v1").is_none());
    assert_eq!(
        ads.status(ResourceType::ClusterLoadAssignment, "v1-eds"),
        Some(ResourceStatus::DoesNotExist)
    );

    // Reconnect: subscribe again with initial_resource_versions of what is held.
    let _ = ads.on_disconnected();
    let out = ads.on_connected(now).send;
    let r = delta_reqs(&out);
    assert_eq!(r.len(), 4);
    assert_eq!(
        r[0].initial_resource_versions
            .get("svc")
            .map(String::as_str),
        Some("l1")
    );
    assert_eq!(
        r[1].initial_resource_versions.get("rc").map(String::as_str),
        Some("r3")
    );
    assert_eq!(
        r[2].initial_resource_versions.get("v1").map(String::as_str),
        Some("c1")
    );
    assert!(
        r[3].initial_resource_versions.is_empty(),
        "removed endpoints are not offered"
    );
    assert_eq!(r[3].resource_names_subscribe, vec!["v1-eds"]);
}

#[test]
fn unwatch_drops_the_cascade() {
    let now = Instant::now();
    let mut ads = sotw_cascade(now);
    let out = ads.unwatch_listener("svc", now).send;
    let r = sotw_reqs(&out);
    assert_eq!(r.len(), 4);
    assert!(r.iter().all(|r| r.resource_names.is_empty()));
    assert!(ads.dump().is_empty());
    assert!(ads.snapshot().clusters().is_empty());
}

#[test]
fn sotw_absence_of_a_new_name_counts_only_on_a_response_that_answers_it() {
    let now = Instant::now();
    let mut ads = AdsState::new(ProtocolMode::Sotw, node());
    let _ = ads.watch_listener("svc", now);
    let _ = ads.on_connected(now);
    // "new" is asked for while the response to the first request is still on its way.
    let out = ads.watch_listener("new", now).send;
    assert_eq!(sotw_reqs(&out)[0].resource_names, vec!["new", "svc"]);
    // That response predates the request for "new": its absence proves nothing.
    let _ = ads.on_sotw_response(
        sotw(
            ResourceType::Listener,
            "1",
            "n1",
            vec![listener("svc", "rc")],
        ),
        now,
    );
    assert_eq!(
        ads.status(ResourceType::Listener, "new"),
        Some(ResourceStatus::Requested)
    );
    // The next one answers it: "new" does not exist, without waiting for the timer.
    let _ = ads.on_sotw_response(
        sotw(
            ResourceType::Listener,
            "1",
            "n2",
            vec![listener("svc", "rc")],
        ),
        now,
    );
    assert_eq!(
        ads.status(ResourceType::Listener, "new"),
        Some(ResourceStatus::DoesNotExist)
    );
    // Asked for on a quiet stream, the first response is the answer.
    let out = ads.watch_listener("other", now).send;
    assert!(!sotw_reqs(&out).is_empty());
    let _ = ads.on_sotw_response(
        sotw(
            ResourceType::Listener,
            "1",
            "n3",
            vec![listener("svc", "rc")],
        ),
        now,
    );
    assert_eq!(
        ads.status(ResourceType::Listener, "other"),
        Some(ResourceStatus::DoesNotExist)
    );
    assert_eq!(
        ads.status(ResourceType::Listener, "svc"),
        Some(ResourceStatus::Acked)
    );
}

#[test]
fn a_route_update_waits_for_the_clusters_it_points_at() {
    use crate::config::{ClusterSpecifier, RouteAction};
    let now = Instant::now();
    let mut ads = sotw_cascade(now);
    let split = |s: &crate::config::Snapshot| -> Vec<String> {
        let rc = s.route_config("rc").unwrap();
        let RouteAction::Forward(f) = &rc.virtual_hosts[0].routes[0].action else {
            panic!()
        };
        match &f.cluster {
            ClusterSpecifier::Weighted(w) => w.clusters.iter().map(|c| c.name.clone()).collect(),
            ClusterSpecifier::Cluster(c) => vec![c.clone()],
            ClusterSpecifier::Header(_) => vec![],
        }
    };
    let published = ads.publish_view(now);
    assert_eq!(split(&published), vec!["v1", "v2"]);
    // The route moves everything to v3, which the client does not hold yet.
    let _ = ads.on_sotw_response(
        sotw(
            ResourceType::RouteConfiguration,
            "2",
            "n5",
            vec![routes("rc", &[("v3", 100)])],
        ),
        now,
    );
    let published = ads.publish_view(now);
    assert_eq!(split(&published), vec!["v1", "v2"], "held back");
    assert!(published.cluster("v1").is_some() && published.endpoints_for_cluster("v1").is_some());
    assert_eq!(ads.next_deadline(), Some(now + ROUTE_HOLD));
    // v3 arrives, then its endpoints: only then does the new route apply.
    let _ = ads.on_sotw_response(
        sotw(ResourceType::Cluster, "2", "n6", vec![cluster("v3")]),
        now,
    );
    assert_eq!(
        split(&ads.publish_view(now)),
        vec!["v1", "v2"],
        "endpoints missing"
    );
    let _ = ads.on_sotw_response(
        sotw(
            ResourceType::ClusterLoadAssignment,
            "2",
            "n7",
            vec![endpoints("v3-eds", &[8003])],
        ),
        now,
    );
    let published = ads.publish_view(now);
    assert_eq!(split(&published), vec!["v3"]);
    assert!(
        published.cluster("v1").is_none(),
        "the old clusters go with the old route"
    );
    assert_eq!(ads.holds_expired(), 0);

    // A route to a cluster that never comes applies after the bound, and is counted.
    let _ = ads.on_sotw_response(
        sotw(
            ResourceType::RouteConfiguration,
            "3",
            "n8",
            vec![routes("rc", &[("v4", 100)])],
        ),
        now,
    );
    assert_eq!(split(&ads.publish_view(now)), vec!["v3"]);
    let later = now + ROUTE_HOLD;
    let step = ads.poll_timers(later);
    assert!(step.snapshot_changed, "the held route applies at the bound");
    assert_eq!(step.verdict, None);
    assert_eq!(split(&ads.publish_view(later)), vec!["v4"]);
    assert_eq!(ads.holds_expired(), 1);
}

/// Found by the `ads_sequences` fuzz target: a delta response naming a resource twice, good
/// then bad, applied the first and then marked the resource NACKed while it served the
/// version just applied. The repeat is refused as SotW refuses it.
#[test]
fn delta_refuses_a_resource_named_twice_in_one_response() {
    let now = Instant::now();
    let mut ads = AdsState::new(ProtocolMode::Delta, node());
    let _ = ads.watch_listener("svc", now);
    let _ = ads.on_connected(now);
    let mut bad = lpb::Listener::decode(listener("svc", "rc").value.as_slice()).unwrap();
    bad.api_listener = None;
    let step = ads.on_delta_response(
        delta(
            ResourceType::Listener,
            "d1",
            vec![
                ("svc", "l1", listener("svc", "rc")),
                ("svc", "l2", any(&bad)),
            ],
            &[],
        ),
        now,
    );
    let Some(Verdict::Nack(message)) = &step.verdict else {
        panic!("{:?}", step.verdict);
    };
    assert!(
        message.contains("duplicate resource in response"),
        "{message}"
    );
    assert_eq!(
        ads.status(ResourceType::Listener, "svc"),
        Some(ResourceStatus::Acked),
        "the first is applied and its status is what the snapshot serves"
    );
    assert!(ads.snapshot().listener("svc").is_some());
}

/// gRFC A53: a server with `ignore_resource_deletion` cannot take away what the client holds,
/// neither by leaving it out of a SotW LDS/CDS response nor by a delta removal.
#[test]
fn ignore_resource_deletion_keeps_what_is_held() {
    let now = Instant::now();
    let mut ads = sotw_cascade(now);
    ads.set_ignore_resource_deletion(true);
    let _ = ads.on_sotw_response(sotw(ResourceType::Cluster, "2", "n9", vec![]), now);
    assert!(
        ads.snapshot().cluster("v1").is_some() && ads.snapshot().cluster("v2").is_some(),
        "clusters missing from the response are kept"
    );
    ads.set_ignore_resource_deletion(false);
    let _ = ads.on_sotw_response(sotw(ResourceType::Cluster, "3", "n10", vec![]), now);
    assert!(ads.snapshot().clusters().is_empty(), "without it they go");

    let mut ads = AdsState::new(ProtocolMode::Delta, node());
    let _ = ads.watch_listener("svc", now);
    let _ = ads.on_connected(now);
    let _ = ads.on_delta_response(
        delta(
            ResourceType::Listener,
            "d1",
            vec![("svc", "l1", listener("svc", "rc"))],
            &[],
        ),
        now,
    );
    ads.set_ignore_resource_deletion(true);
    let _ = ads.on_delta_response(delta(ResourceType::Listener, "d2", vec![], &["svc"]), now);
    assert!(
        ads.snapshot().listener("svc").is_some(),
        "a delta removal is ignored"
    );
    assert_eq!(
        ads.status(ResourceType::Listener, "svc"),
        Some(ResourceStatus::Acked)
    );
}

/// The dump the client publishes is kept entry by entry; after every kind of change it says
/// what a dump rebuilt from all entries says, and an unchanged entry is shared, not copied.
#[test]
fn the_dump_is_kept_entry_by_entry() {
    fn same(ads: &mut AdsState, at: &str) -> ConfigDump {
        let dump = ads.config_dump("s", None);
        let kept: Vec<ResourceDump> = dump.resources.iter().cloned().collect();
        assert_eq!(kept, ads.dump(), "after {at}");
        dump
    }
    let now = Instant::now();
    let mut ads = AdsState::new(ProtocolMode::Delta, node());
    let _ = ads.watch_listener("svc", now);
    let _ = ads.on_connected(now);
    same(&mut ads, "connect");
    let steps: Vec<(&str, DeltaDiscoveryResponse)> = vec![
        (
            "listener",
            delta(
                ResourceType::Listener,
                "d1",
                vec![("svc", "l1", listener("svc", "rc"))],
                &[],
            ),
        ),
        (
            "routes",
            delta(
                ResourceType::RouteConfiguration,
                "d2",
                vec![("rc", "r1", routes("rc", &[("v1", 1), ("v2", 1)]))],
                &[],
            ),
        ),
        (
            "clusters",
            delta(
                ResourceType::Cluster,
                "d3",
                vec![("v1", "c1", cluster("v1")), ("v2", "c1", cluster("v2"))],
                &[],
            ),
        ),
        (
            "endpoints",
            delta(
                ResourceType::ClusterLoadAssignment,
                "d4",
                vec![
                    ("v1-eds", "e1", endpoints("v1-eds", &[1])),
                    ("v2-eds", "e1", endpoints("v2-eds", &[2])),
                ],
                &[],
            ),
        ),
        (
            "a NACK",
            delta(
                ResourceType::RouteConfiguration,
                "d5",
                vec![("rc", "r2", routes("rc", &[("v1", 0), ("v2", 0)]))],
                &[],
            ),
        ),
        (
            "a shrink",
            delta(
                ResourceType::RouteConfiguration,
                "d6",
                vec![("rc", "r3", routes("rc", &[("v1", 1)]))],
                &[],
            ),
        ),
        (
            "a removal",
            delta(
                ResourceType::ClusterLoadAssignment,
                "d7",
                vec![],
                &["v1-eds"],
            ),
        ),
    ];
    for (at, resp) in steps {
        let _ = ads.on_delta_response(resp, now);
        same(&mut ads, at);
    }
    // One endpoints update: the listener's entry is the one published before, not a copy.
    let before = same(&mut ads, "before an update");
    let _ = ads.on_delta_response(
        delta(
            ResourceType::ClusterLoadAssignment,
            "d8",
            vec![("v1-eds", "e2", endpoints("v1-eds", &[3]))],
            &[],
        ),
        now,
    );
    let after = same(&mut ads, "an update");
    let l = |d: &ConfigDump| d.get(ResourceType::Listener, "svc").map(|r| r as *const _);
    assert_eq!(l(&before), l(&after), "an unchanged entry is shared");
    assert_eq!(
        after
            .get(ResourceType::ClusterLoadAssignment, "v1-eds")
            .map(|r| r.version.as_str()),
        Some("e2")
    );
    // A timer: a listener that never comes is DOES_NOT_EXIST in the kept dump too.
    let _ = ads.watch_listener("never", now);
    same(&mut ads, "a new watch");
    let _ = ads.poll_timers(now + Duration::from_secs(60));
    let dump = same(&mut ads, "the does-not-exist timer");
    assert_eq!(
        dump.get(ResourceType::Listener, "never").map(|r| r.status),
        Some(ResourceStatus::DoesNotExist)
    );
    let _ = ads.unwatch_listener("svc", now);
    let _ = ads.unwatch_listener("never", now);
    assert!(same(&mut ads, "unwatching everything").resources.is_empty());
}
