//! Translation tests, most against resources made by real control planes
//! (`fixtures/xds`, vendored from real control planes).

use std::path::PathBuf;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cpb;
use envoy_types::pb::envoy::config::listener::v3 as lpb;
use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use prost::Message;

use crate::config::*;
use crate::xds::file;

pub(crate) fn fixtures() -> PathBuf {
    std::env::var_os("MESH_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/xds")))
}

#[path = "../../../tests/support/unhonoured.rs"]
mod unhonoured;
use unhonoured::{without_unhonoured, NOT_HONOURED};

fn gateway_resources(case: &str, kind: &str) -> Vec<Any> {
    let path = fixtures().join(format!("envoy-gateway/{case}.{kind}.pb"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let resp = DiscoveryResponse::decode(bytes.as_slice()).unwrap();
    assert_eq!(resp.version_info, "fixture");
    assert!(!resp.resources.is_empty());
    resp.resources
}

/// A fixture as the mesh holds it: the resources with the [`NOT_HONOURED`] fields cleared.
fn gateway(case: &str, kind: &str) -> Snapshot {
    let resources: Vec<Any> = gateway_resources(case, kind)
        .iter()
        .map(without_unhonoured)
        .collect();
    file::snapshot_from_resources(&resources).unwrap_or_else(|e| panic!("{case}.{kind}: {e}"))
}

#[test]
fn every_envoy_gateway_fixture_translates() {
    let dir = fixtures().join("envoy-gateway");
    let mut n = 0;
    let mut refused = std::collections::BTreeMap::<String, usize>::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "pb") {
            let resp = DiscoveryResponse::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
            // As generated: every resource is accepted, or refused naming a field the mesh
            // does not honour.
            for any in &resp.resources {
                if let Err(e) = file::snapshot_from_resources(std::slice::from_ref(any)) {
                    let field = NOT_HONOURED
                        .iter()
                        .find(|f| e.contains(&format!("{f}: ")))
                        .unwrap_or_else(|| {
                            panic!("{}: refused for another reason: {e}", path.display())
                        });
                    *refused.entry((*field).to_owned()).or_default() += 1;
                }
            }
            // Without them, everything translates.
            let cleared: Vec<Any> = resp.resources.iter().map(without_unhonoured).collect();
            let snap = file::snapshot_from_resources(&cleared)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let held = snap.listeners().len()
                + snap.route_configs().len()
                + snap.clusters().len()
                + snap.endpoint_assignments().len();
            assert_eq!(held, resp.resources.len(), "{}", path.display());
            n += 1;
        }
    }
    assert_eq!(n, 20, "five cases of four kinds");
    // Every listener and route configuration of these cases is refused as generated (Envoy
    // Gateway turns on WebSocket upgrades everywhere).
    assert!(refused.contains_key("upgrade_configs"), "{refused:?}");
    assert!(refused.contains_key("stream_idle_timeout"), "{refused:?}");
    assert!(
        refused.contains_key("per_host_thresholds")
            || refused.contains_key("max_requests_per_connection"),
        "{refused:?}"
    );
}

#[test]
fn yaml_and_pb_fixtures_agree() {
    for case in [
        "retry",
        "circuit-breaker",
        "http-route-timeout",
        "http-route-regex",
        "http-route-weighted-backend",
    ] {
        let path = fixtures().join(format!("envoy-gateway/{case}.routes.yaml"));
        let text = std::fs::read_to_string(&path).unwrap();
        let from_yaml: Vec<rpb::RouteConfiguration> =
            file::list_from_yaml(&text, &path.display().to_string()).unwrap();
        let from_pb = gateway(case, "routes");
        for rc in from_yaml {
            let any = Any {
                type_url: crate::xds::ResourceType::RouteConfiguration
                    .type_url()
                    .into(),
                value: rc.encode_to_vec(),
            };
            let rc =
                rpb::RouteConfiguration::decode(without_unhonoured(&any).value.as_slice()).unwrap();
            let ours = RouteConfig::try_from(&rc).unwrap();
            assert_eq!(
                Some(&ours),
                from_pb.route_config(&rc.name).map(|r| &**r),
                "{case}"
            );
        }
    }
}

#[test]
fn weighted_backend_locality_weights() {
    let snap = gateway("http-route-weighted-backend", "endpoints");
    let cla = &snap.endpoint_assignments()["first-route-dest"];
    let weights: Vec<u32> = cla.localities.iter().map(|l| l.weight).collect();
    assert_eq!(weights, vec![20, 40, 20, 20]);
    let addrs: Vec<String> = cla
        .endpoints()
        .map(|(_, e)| e.address.to_string())
        .collect();
    assert_eq!(
        addrs,
        vec![
            "1.1.1.1:50001",
            "2.2.2.2:50002",
            "3.3.3.3:50003",
            "4.4.4.4:50004"
        ]
    );
    assert_eq!(
        cla.localities[1].locality.region,
        "first-route-dest/backend/1"
    );
    let clusters = gateway("http-route-weighted-backend", "clusters");
    let c = &clusters.clusters()["first-route-dest"];
    assert_eq!(c.lb_policy, LbPolicy::LeastRequest { choice_count: 2 });
    assert!(c.locality_weighted);
    assert_eq!(c.eds_service_name(), Some("first-route-dest"));
    assert_eq!(c.connect_timeout, Duration::from_secs(10));
    assert_eq!(c.circuit_breakers.default.max_retries, 1024);
    // The listener is server-side: an HCM taking routes over RDS.
    let listeners = gateway("http-route-weighted-backend", "listeners");
    let l = &listeners.listeners()["first-listener"];
    let ListenerKind::Server(s) = &l.kind else {
        panic!("server listener expected")
    };
    assert_eq!(s.address.port(), 10080);
    let hcm = s
        .default_filter_chain
        .as_ref()
        .unwrap()
        .http
        .as_ref()
        .unwrap();
    assert_eq!(hcm.routes, RouteSource::Rds("first-listener".into()));
    assert_eq!(
        hcm.http_filters.last().unwrap().kind,
        HttpFilterKind::Router
    );
}

fn forward(rc: &RouteConfig, vh: usize, route: usize) -> &ForwardAction {
    match &rc.virtual_hosts[vh].routes[route].action {
        RouteAction::Forward(f) => f,
        other => panic!("expected a forward action, got {other:?}"),
    }
}

#[test]
fn retry_policies() {
    let snap = gateway("retry", "routes");
    let rc = &snap.route_configs()["first-listener"];
    let first = forward(rc, 0, 0).retry_policy.as_ref().unwrap();
    assert_eq!(first.num_retries, 3);
    assert_eq!(first.retriable_status_codes, vec![500]);
    assert_eq!(first.backoff.base, Duration::from_millis(200));
    assert_eq!(
        first.backoff.max,
        Duration::from_secs(2),
        "max defaults to 10 x base"
    );
    for c in [
        RetryOn::CONNECT_FAILURE,
        RetryOn::REFUSED_STREAM,
        RetryOn::GRPC_UNAVAILABLE,
        RetryOn::GRPC_CANCELLED,
        RetryOn::RETRIABLE_STATUS_CODES,
    ] {
        assert!(first.retry_on.contains(c), "{c:?}");
    }
    assert!(!first.retry_on.contains(RetryOn::FIVE_XX));
    assert!(first.previous_hosts);
    assert_eq!(first.host_selection_max_attempts, 5);
    let second = forward(rc, 1, 0).retry_policy.as_ref().unwrap();
    assert_eq!(second.num_retries, 2);
    assert_eq!(second.retriable_status_codes, vec![503]);
    assert_eq!(second.backoff, RetryBackoff::default());
    let third = forward(rc, 1, 1).retry_policy.as_ref().unwrap();
    assert_eq!(third.num_retries, 5);
    assert_eq!(
        third.retry_on.names(),
        "reset,reset-before-request,connect-failure"
    );
    // Domain matching over the fixture: `foo` gets its own virtual host.
    assert_eq!(
        rc.find_virtual_host("foo:80").unwrap().name,
        "first-listener/foo"
    );
    assert_eq!(
        rc.find_virtual_host("bar").unwrap().name,
        "first-listener/*"
    );
}

#[test]
fn circuit_breaker_thresholds() {
    let snap = gateway("circuit-breaker", "clusters");
    let c = &snap.clusters()["first-route-dest"];
    let t = &c.circuit_breakers.default;
    assert_eq!(
        (
            t.max_connections,
            t.max_pending_requests,
            t.max_requests,
            t.max_retries
        ),
        (1, 1, 1, 2)
    );
    let budget = t.retry_budget.as_ref().unwrap();
    assert_eq!(budget.budget_percent, 10.0);
    assert_eq!(budget.min_retry_concurrency, 1);
    // per_host_thresholds (max_connections 1) and max_requests_per_connection (10) are set
    // in this case and not honoured by the mesh: the cluster as generated is refused.
    let raw = gateway_resources("circuit-breaker", "clusters");
    let e = file::snapshot_from_resources(&raw).unwrap_err();
    assert!(
        e.contains("per_host_thresholds") || e.contains("max_requests_per_connection"),
        "{e}"
    );
    assert_eq!(c.circuit_breakers.per_host_max_connections, None);
    assert_eq!(c.max_requests_per_connection, None);
    assert_eq!(c.protocol, UpstreamProtocol::Http1);
}

#[test]
fn route_timeouts() {
    let snap = gateway("http-route-timeout", "routes");
    let rc = &snap.route_configs()["first-listener"];
    let first = forward(rc, 0, 0);
    assert_eq!(first.timeout, Some(Duration::from_secs(5)));
    // The route's idle_timeout (20 s) is not honoured by the mesh: as generated, refused.
    let raw = gateway_resources("http-route-timeout", "routes");
    let e = file::snapshot_from_resources(&raw).unwrap_err();
    assert!(
        e.contains("idle_timeout") || e.contains("upgrade_configs"),
        "{e}"
    );
    assert_eq!(first.idle_timeout, None);
    assert_eq!(first.max_stream_duration, Some(Duration::from_secs(30)));
    assert_eq!(forward(rc, 0, 1).timeout, Some(Duration::from_secs(4000)));
    assert_eq!(forward(rc, 0, 1).max_stream_duration, None, "0s disables");
    assert_eq!(
        forward(rc, 0, 2).timeout,
        None,
        "timeout 0s disables the timeout"
    );
    assert_eq!(forward(rc, 0, 3).timeout, Some(Duration::from_secs(10)));
    let m = &rc.virtual_hosts[0].routes[0].matcher;
    assert_eq!(m.headers[0].name, "user");
    assert_eq!(
        m.headers[0].kind,
        HeaderMatch::String(StringMatcher::exact("jason"))
    );
    assert_eq!(
        snap.route_configs()["second-listener"].virtual_hosts[0]
            .routes
            .len(),
        1
    );
}

#[test]
fn route_regex() {
    let snap = gateway("http-route-regex", "routes");
    let rc = &snap.route_configs()["first-listener"];
    let m = &rc.virtual_hosts[0].routes[0].matcher;
    let PathMatch::Regex(p) = &m.path else {
        panic!("regex path expected: {:?}", m.path)
    };
    assert_eq!(p.as_str(), "/v1/.*");
    let HeaderMatch::String(StringMatcher {
        kind: StringMatch::Regex(h),
        ..
    }) = &m.headers[0].kind
    else {
        panic!("{:?}", m.headers[0])
    };
    assert_eq!(
        (m.headers[0].name.as_str(), h.as_str()),
        ("re_header", ".*")
    );
    assert_eq!(m.query_params[0].name, "re_query");
    let headers = http::HeaderMap::from_iter([(
        http::HeaderName::from_static("re_header"),
        "x".parse().unwrap(),
    )]);
    let req = |path| RequestInfo {
        method: "GET",
        authority: "any",
        path,
        query: Some("re_query=1"),
        headers: &headers,
        random: 0,
    };
    assert!(rc.virtual_hosts[0].find_route(&req("/v1/users")).is_some());
    assert!(rc.virtual_hosts[0].find_route(&req("/v2/users")).is_none());
}

#[test]
fn envoy_example_without_typed_config_is_rejected() {
    let path = fixtures().join("envoy-examples/dynamic-config-fs.lds.OLD-no-typed-config.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let resp: DiscoveryResponse = file::from_yaml(&text, "old.yaml").unwrap();
    let l = lpb::Listener::decode(resp.resources[0].value.as_slice()).unwrap();
    let err = Listener::try_from(&l).unwrap_err();
    assert_eq!(err.name, "listener_0");
    assert_eq!(
        err.to_string(),
        "listener \"listener_0\": filter_chains[0].filters[0].typed_config.http_filters[0].typed_config: \
         filter \"envoy.filters.http.router\" has no typed_config"
    );
    // The current example (filters written as a mapping, as Envoy accepts) loads, and is
    // refused: it is a proxy's listener whose routes forward to a cluster, and the mesh's
    // server does not route (its routes must be non_forwarding_action).
    let path = fixtures().join("envoy-examples/dynamic-config-fs.lds.yaml");
    let err = file::load_snapshot(&path).unwrap_err();
    assert!(
        err.message.contains(
            "listener \"listener_0\": filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[0]: a server listener's routes must be non_forwarding_action"
        ),
        "{err}"
    );
    // Its cluster is STRICT_DNS: each address `service1` resolves to becomes an endpoint.
    let snap =
        file::load_snapshot(&fixtures().join("envoy-examples/dynamic-config-fs.cds.yaml")).unwrap();
    let Discovery::Dns(dns) = &snap.clusters()["example_proxy_cluster"].discovery else {
        panic!("a DNS cluster")
    };
    assert!(!dns.logical);
    assert_eq!(dns.hosts(), vec!["service1"]);
    assert_eq!(dns.localities[0].targets[0].port, 8080);
    assert_eq!(dns.refresh_rate, Duration::from_secs(5));
}

fn weighted_route(weights: &[(&str, u32)]) -> rpb::RouteConfiguration {
    rpb::RouteConfiguration {
        name: "r1".into(),
        virtual_hosts: vec![
            rpb::VirtualHost {
                name: "a".into(),
                domains: vec!["a".into()],
                ..Default::default()
            },
            rpb::VirtualHost {
                name: "b".into(),
                domains: vec!["b".into()],
                ..Default::default()
            },
            rpb::VirtualHost {
                name: "c".into(),
                domains: vec!["*".into()],
                routes: vec![rpb::Route {
                    r#match: Some(rpb::RouteMatch {
                        path_specifier: Some(rpb::route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(rpb::route::Action::Route(rpb::RouteAction {
                        cluster_specifier: Some(
                            rpb::route_action::ClusterSpecifier::WeightedClusters(
                                rpb::WeightedCluster {
                                    clusters: weights
                                        .iter()
                                        .map(|(n, w)| rpb::weighted_cluster::ClusterWeight {
                                            name: (*n).into(),
                                            weight: Some(UInt32Value { value: *w }),
                                            ..Default::default()
                                        })
                                        .collect(),
                                    ..Default::default()
                                },
                            ),
                        ),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

#[test]
fn errors_name_resource_and_field_path() {
    let err = RouteConfig::try_from(&weighted_route(&[("v1", 0), ("v2", 0)])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "route_config \"r1\": virtual_hosts[2].routes[0].route.weighted_clusters: total weight is 0"
    );
    let ok = RouteConfig::try_from(&weighted_route(&[("v1", 90), ("v2", 10), ("v3", 0)])).unwrap();
    let ClusterSpecifier::Weighted(w) = &forward(&ok, 2, 0).cluster else {
        panic!()
    };
    assert_eq!(w.total, 100);
    assert_eq!(w.clusters.len(), 2, "zero-weight targets are dropped");
    assert_eq!(ok.cluster_names(), vec!["v1", "v2"]);

    let mut bad_regex = weighted_route(&[("v1", 1)]);
    bad_regex.virtual_hosts[2].routes[0].r#match = Some(rpb::RouteMatch {
        path_specifier: Some(rpb::route_match::PathSpecifier::SafeRegex(
            envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
                regex: "(".into(),
                ..Default::default()
            },
        )),
        ..Default::default()
    });
    let err = RouteConfig::try_from(&bad_regex).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("route_config \"r1\": virtual_hosts[2].routes[0].match.safe_regex.regex: invalid regex \"(\""),
        "{err}"
    );

    let cluster = cpb::Cluster {
        name: "c1".into(),
        cluster_discovery_type: Some(cpb::cluster::ClusterDiscoveryType::Type(3)),
        outlier_detection: Some(cpb::OutlierDetection {
            max_ejection_percent: Some(UInt32Value { value: 150 }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let err = Cluster::try_from(&cluster).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cluster \"c1\": outlier_detection.max_ejection_percent: 150 is over 100"
    );
}

#[test]
fn api_listener_rules() {
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
    use envoy_types::pb::google::protobuf::Any;
    use prost::Name;
    let any = |m: &dyn Fn() -> (String, Vec<u8>)| {
        let (type_url, value) = m();
        Any { type_url, value }
    };
    let router = any(&|| {
        (
            envoy_types::pb::envoy::extensions::filters::http::router::v3::Router::type_url(),
            envoy_types::pb::envoy::extensions::filters::http::router::v3::Router::default()
                .encode_to_vec(),
        )
    });
    let unknown = Any {
        type_url: "type.googleapis.com/example.Unknown".into(),
        value: vec![],
    };
    let listener = |filters: Vec<hcm::HttpFilter>| {
        let manager = hcm::HttpConnectionManager {
            route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
                hcm::Rds {
                    route_config_name: "routes".into(),
                    config_source: None,
                },
            )),
            http_filters: filters,
            ..Default::default()
        };
        lpb::Listener {
            name: "greeter:50051".into(),
            api_listener: Some(lpb::ApiListener {
                api_listener: Some(Any {
                    type_url: hcm::HttpConnectionManager::type_url(),
                    value: manager.encode_to_vec(),
                }),
            }),
            ..Default::default()
        }
    };
    let filter = |name: &str, cfg: &Any, optional| hcm::HttpFilter {
        name: name.into(),
        is_optional: optional,
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(cfg.clone())),
        ..Default::default()
    };
    // An optional unknown filter is skipped.
    let ok = Listener::try_from(&listener(vec![
        filter("x", &unknown, true),
        filter("router", &router, false),
    ]))
    .unwrap();
    assert_eq!(ok.api().unwrap().http_filters.len(), 1);
    assert_eq!(ok.api().unwrap().routes, RouteSource::Rds("routes".into()));
    // A required unknown filter is rejected.
    let err = Listener::try_from(&listener(vec![
        filter("x", &unknown, false),
        filter("router", &router, false),
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("api_listener.api_listener.http_filters[0].typed_config: filter \"x\" of type example.Unknown is not supported"), "{err}");
    // The router must be last.
    let err = Listener::try_from(&listener(vec![
        filter("router", &router, false),
        filter("r2", &router, false),
    ]))
    .unwrap_err();
    assert!(
        err.to_string()
            .ends_with("http_filters: the router must be the last HTTP filter"),
        "{err}"
    );
    let err = Listener::try_from(&listener(vec![])).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("http_filters: the router filter is required"),
        "{err}"
    );
}

#[test]
fn descriptor_set_and_json_round_trip() {
    let rc = weighted_route(&[("v1", 90), ("v2", 10)]);
    let json = file::to_json(&rc).unwrap();
    assert_eq!(
        json["virtual_hosts"][2]["routes"][0]["route"]["weighted_clusters"]["clusters"][0]
            ["weight"],
        90
    );
    let back: rpb::RouteConfiguration = file::from_yaml(&json.to_string(), "json").unwrap();
    assert_eq!(back, rc);
}

#[test]
fn aggregate_clusters() {
    let yaml = |clusters: &str, extra: &str| {
        format!(
            r#"
name: both
lb_policy: CLUSTER_PROVIDED
{extra}cluster_type:
  name: envoy.clusters.aggregate
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig
    clusters: [{clusters}]
"#
        )
    };
    let c: cpb::Cluster = file::from_yaml(&yaml("a, b", ""), "agg.yaml").unwrap();
    let ours = Cluster::try_from(&c).unwrap();
    let Discovery::Aggregate(children) = &ours.discovery else {
        panic!("{:?}", ours.discovery)
    };
    assert_eq!(&children[..], ["a".to_owned(), "b".to_owned()]);
    for (clusters, extra, want) in [
        ("", "", "cluster_type.typed_config.clusters: at least one cluster is required"),
        ("a, both", "", "cluster_type.typed_config.clusters[1]: a cluster name must be non-empty and not the aggregate itself"),
        ("a", "", ""),
    ] {
        let c: cpb::Cluster = file::from_yaml(&yaml(clusters, extra), "agg.yaml").unwrap();
        match Cluster::try_from(&c) {
            Ok(_) => assert!(want.is_empty()),
            Err(e) => assert_eq!(e.to_string(), format!("cluster \"both\": {want}")),
        }
    }
    let c: cpb::Cluster = file::from_yaml(
        &yaml("a", "").replace("CLUSTER_PROVIDED", "RANDOM"),
        "agg.yaml",
    )
    .unwrap();
    let e = Cluster::try_from(&c).unwrap_err();
    assert_eq!(e.path, "lb_policy", "{e}");
}

#[test]
fn yaml_load_errors_name_the_field_path() {
    let text = "name: r\nvirtual_hosts:\n- name: v\n  domains: ['*']\n  routes:\n  - match: {prefix: /}\n    route: {cluster: c, timeout: soon}\n";
    let e = file::from_yaml::<rpb::RouteConfiguration>(text, "r.yaml").unwrap_err();
    assert_eq!(e.origin, "r.yaml");
    assert!(
        e.message
            .starts_with("virtual_hosts[0].routes[0].route.timeout: "),
        "{e}"
    );
    let list = "- name: ok\n- name: bad\n  virtual_hosts: [{name: v, domains: 7}]\n";
    let e = file::list_from_yaml::<rpb::RouteConfiguration>(list, "l.yaml").unwrap_err();
    assert!(
        e.message.starts_with("[1].virtual_hosts[0].domains: "),
        "{e}"
    );
}
