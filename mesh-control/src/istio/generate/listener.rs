//! Listeners: the client `api_listener` per service and the server listener per workload
//! port, with its PeerAuthentication TLS mode and the HTTP filters.

use super::common::*;
use crate::istio::index::{Service, Workload};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as lpb;
use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as rbac_filter;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::google::protobuf::BoolValue;
use std::collections::BTreeMap;

/// WebSocket upgrades, which Istio's sidecars allow on HTTP/1.1 ports (gRPC ports have none).
pub(super) fn websocket(on: bool) -> Vec<hcm::http_connection_manager::UpgradeConfig> {
    on.then(|| hcm::http_connection_manager::UpgradeConfig {
        upgrade_type: "websocket".into(),
        ..Default::default()
    })
    .into_iter()
    .collect()
}

pub(super) fn client_listener(name: &str, http1: bool) -> lpb::Listener {
    let manager = hcm::HttpConnectionManager {
        stat_prefix: name.to_owned(),
        upgrade_configs: websocket(http1),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                config_source: Some(ads_source()),
                route_config_name: name.to_owned(),
            },
        )),
        http_filters: vec![fault_filter(), router_filter()],
        ..Default::default()
    };
    lpb::Listener {
        name: name.to_owned(),
        api_listener: Some(lpb::ApiListener {
            api_listener: Some(any(&manager)),
        }),
        ..Default::default()
    }
}

pub(super) fn fault_filter() -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: "envoy.filters.http.fault".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
            &fault::HttpFault::default(),
        ))),
        ..Default::default()
    }
}

pub(super) fn router_filter() -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
            &Router::default(),
        ))),
        ..Default::default()
    }
}

impl Ctx<'_> {
    pub(super) fn server_listener(
        &mut self,
        name: &str,
        port: u32,
        svcs: &[&Service],
    ) -> lpb::Listener {
        let workloads: Vec<&Workload> = svcs
            .iter()
            .flat_map(|s| s.workloads.iter())
            .filter(|w| w.port == port)
            .collect();
        let (ns, labels) = workloads
            .first()
            .map(|w| (w.namespace.clone(), w.labels.clone()))
            .unwrap_or_else(|| ("default".into(), BTreeMap::new()));
        let mode = self.index.peer_mode(&ns, &labels);
        let h2 = svcs.iter().any(|s| s.http2());
        let manager = self.inbound_manager(name, port, &ns, &labels, h2);
        let filters = vec![lpb::Filter {
            name: "envoy.filters.network.http_connection_manager".into(),
            config_type: Some(lpb::filter::ConfigType::TypedConfig(any(&manager))),
        }];
        let tls_socket = || {
            let ctx = tls::DownstreamTlsContext {
                common_tls_context: Some(self.common_tls(Vec::new(), h2)),
                require_client_certificate: Some(BoolValue { value: true }),
                ..Default::default()
            };
            core::TransportSocket {
                name: "envoy.transport_sockets.tls".into(),
                config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(&ctx))),
            }
        };
        let chain =
            |name: &str, transport: &str, ts: Option<core::TransportSocket>| lpb::FilterChain {
                name: name.into(),
                filter_chain_match: (!transport.is_empty()).then(|| lpb::FilterChainMatch {
                    transport_protocol: transport.into(),
                    ..Default::default()
                }),
                filters: filters.clone(),
                transport_socket: ts,
                ..Default::default()
            };
        let filter_chains = match mode.as_str() {
            "STRICT" => vec![chain("mtls", "", Some(tls_socket()))],
            "DISABLE" => vec![chain("plaintext", "", None)],
            _ => vec![
                chain("mtls", "tls", Some(tls_socket())),
                chain("plaintext", "raw_buffer", None),
            ],
        };
        lpb::Listener {
            name: name.to_owned(),
            address: Some(socket("0.0.0.0", port)),
            filter_chains,
            traffic_direction: core::TrafficDirection::Inbound as i32,
            ..Default::default()
        }
    }

    /// The HTTP connection manager of a server listener: the RBAC filters of the workload's
    /// AuthorizationPolicies (DENY before ALLOW), then the router, over a route that accepts
    /// every request.
    fn inbound_manager(
        &mut self,
        name: &str,
        port: u32,
        ns: &str,
        labels: &BTreeMap<String, String>,
        h2: bool,
    ) -> hcm::HttpConnectionManager {
        let mut http_filters = Vec::new();
        for (action, filter_name) in [
            ("DENY", "envoy.filters.http.rbac.deny"),
            ("ALLOW", "envoy.filters.http.rbac.allow"),
        ] {
            if let Some(r) = self.rbac(action, ns, labels) {
                http_filters.push(hcm::HttpFilter {
                    name: filter_name.into(),
                    config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                        &rbac_filter::Rbac {
                            rules: Some(r),
                            ..Default::default()
                        },
                    ))),
                    ..Default::default()
                });
            }
        }
        http_filters.push(router_filter());
        hcm::HttpConnectionManager {
            stat_prefix: name.to_owned(),
            upgrade_configs: websocket(!h2),
            route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
                rpb::RouteConfiguration {
                    name: format!("inbound|{port}"),
                    virtual_hosts: vec![rpb::VirtualHost {
                        name: format!("inbound|http|{port}"),
                        domains: vec!["*".into()],
                        routes: vec![rpb::Route {
                            r#match: Some(prefix_match("/")),
                            action: Some(rpb::route::Action::NonForwardingAction(
                                rpb::NonForwardingAction {},
                            )),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            http_filters,
            ..Default::default()
        }
    }
}
