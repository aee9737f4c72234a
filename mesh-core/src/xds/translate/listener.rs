//! `Listener` (LDS) translation: API listeners for clients, socket listeners for servers.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as pb;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as RbacFilter;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use prost::Name;

use super::fault::fault;
use super::matcher::cidr;
use super::rbac::rbac_filter;
use super::route::route_config;
use super::tls::{downstream, Socket};
use super::{decode_any, err, opt_nonzero_duration, type_name, At, FieldError, TranslateError};
use crate::config::*;
use crate::xds::ResourceType;

impl TryFrom<&pb::Listener> for Listener {
    type Error = TranslateError;

    fn try_from(l: &pb::Listener) -> Result<Self, Self::Error> {
        listener(l)
            .and_then(|x| super::ledger::check_resource(l).map(|()| x))
            .map_err(|e| e.into_error(ResourceType::Listener, &l.name))
    }
}

impl TryFrom<pb::Listener> for Listener {
    type Error = TranslateError;

    fn try_from(l: pb::Listener) -> Result<Self, Self::Error> {
        Listener::try_from(&l)
    }
}

fn listener(l: &pb::Listener) -> Result<Listener, FieldError> {
    if l.name.is_empty() {
        return err("name is empty").at("name");
    }
    if let Some(api) = &l.api_listener {
        let any = api
            .api_listener
            .as_ref()
            .ok_or_else(|| FieldError::new("api_listener is empty"))
            .at("api_listener")?;
        let manager: hcm::HttpConnectionManager =
            decode_any(any).at("api_listener").at("api_listener")?;
        let manager = http_connection_manager(&manager)
            .and_then(client_side)
            .at("api_listener")
            .at("api_listener")?;
        return Ok(Listener {
            name: l.name.clone(),
            kind: ListenerKind::Api(manager),
        });
    }
    if matches!(
        l.listener_specifier,
        Some(pb::listener::ListenerSpecifier::InternalListener(_))
    ) {
        return err("internal listeners are not supported").at("internal_listener");
    }
    let address = socket_address(
        l.address
            .as_ref()
            .ok_or_else(|| FieldError::new("a listener needs api_listener or address"))
            .at("address")?,
    )
    .at("address")?;
    for (i, f) in l.listener_filters.iter().enumerate() {
        // The mesh's acceptor reads the first bytes of every connection itself (TLS or
        // plaintext, SNI and ALPN), which is what these two filters do for Envoy.
        const INSPECTORS: [&str; 2] = [
            "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
            "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
        ];
        match &f.config_type {
            Some(pb::listener_filter::ConfigType::TypedConfig(any))
                if INSPECTORS.contains(&type_name(any)) => {}
            _ => {
                return err(format!(
                    "listener filter {:?} is not supported (only the TLS and HTTP inspectors, which the mesh's acceptor does itself)",
                    f.name
                ))
                .at_index("listener_filters", i)
            }
        }
    }
    if l.filter_chains.is_empty() && l.default_filter_chain.is_none() {
        return err("at least one filter chain is required").at("filter_chains");
    }
    let filter_chains = l
        .filter_chains
        .iter()
        .enumerate()
        .map(|(i, fc)| filter_chain(fc).at_index("filter_chains", i))
        .collect::<Result<_, _>>()?;
    let default_filter_chain = l
        .default_filter_chain
        .as_ref()
        .map(filter_chain)
        .transpose()
        .at("default_filter_chain")?;
    Ok(Listener {
        name: l.name.clone(),
        kind: ListenerKind::Server(ServerListener {
            address,
            filter_chains,
            default_filter_chain,
        }),
    })
}

pub(crate) fn socket_address(a: &core::Address) -> Result<SocketAddr, FieldError> {
    match &a.address {
        Some(core::address::Address::SocketAddress(sa)) => {
            let ip: IpAddr = sa
                .address
                .parse()
                .map_err(|_| {
                    FieldError::new(format!(
                        "{:?} is not an IP address (hostnames need DNS, which EDS and STATIC clusters do not do)",
                        sa.address
                    ))
                })
                .at("address")
                .at("socket_address")?;
            let port = match sa.port_specifier {
                Some(core::socket_address::PortSpecifier::PortValue(p)) if p <= 65535 => p as u16,
                Some(core::socket_address::PortSpecifier::PortValue(p)) => {
                    return err(format!("port {p} is out of range"))
                        .at("port_value")
                        .at("socket_address")
                }
                _ => return err("port_value is required").at("socket_address"),
            };
            Ok(SocketAddr::new(ip, port))
        }
        _ => err("socket_address is required"),
    }
}

fn filter_chain(fc: &pb::FilterChain) -> Result<FilterChain, FieldError> {
    let matcher = match &fc.filter_chain_match {
        None => FilterChainMatch::default(),
        Some(m) => chain_match(m).at("filter_chain_match")?,
    };
    let tls = match &fc.transport_socket {
        None => None,
        Some(ts) => match downstream(ts).at("transport_socket")? {
            Socket::Plaintext => None,
            Socket::Tls(t) => Some(t),
        },
    };
    let mut http = None;
    for (i, f) in fc.filters.iter().enumerate() {
        let any = match &f.config_type {
            Some(pb::filter::ConfigType::TypedConfig(any)) => any,
            Some(pb::filter::ConfigType::ConfigDiscovery(_)) => {
                return err("filter config discovery is not supported").at_index("filters", i)
            }
            None => {
                return err(format!("filter {:?} has no typed_config", f.name))
                    .at("typed_config")
                    .at_index("filters", i)
            }
        };
        if type_name(any) != hcm::HttpConnectionManager::full_name() {
            return err(format!(
                "network filter {:?} ({}) is not supported; the mesh serves HTTP through an HttpConnectionManager",
                f.name,
                type_name(any)
            ))
            .at_index("filters", i);
        }
        if i + 1 != fc.filters.len() {
            return err("the HttpConnectionManager must be the last network filter")
                .at_index("filters", i);
        }
        let m: hcm::HttpConnectionManager =
            decode_any(any).at("typed_config").at_index("filters", i)?;
        http = Some(
            http_connection_manager(&m)
                .and_then(server_side)
                .at("typed_config")
                .at_index("filters", i)?,
        );
    }
    Ok(FilterChain {
        name: fc.name.clone(),
        matcher,
        tls,
        http,
    })
}

fn chain_match(m: &pb::FilterChainMatch) -> Result<FilterChainMatch, FieldError> {
    let port = |p: u32, field| {
        u16::try_from(p)
            .map_err(|_| FieldError::new(format!("{p} is not a port")))
            .at(field)
    };
    Ok(FilterChainMatch {
        destination_port: m
            .destination_port
            .map(|p| port(p.value, "destination_port"))
            .transpose()?,
        prefix_ranges: m
            .prefix_ranges
            .iter()
            .enumerate()
            .map(|(i, c)| cidr(c).at_index("prefix_ranges", i))
            .collect::<Result<_, _>>()?,
        source_prefix_ranges: m
            .source_prefix_ranges
            .iter()
            .enumerate()
            .map(|(i, c)| cidr(c).at_index("source_prefix_ranges", i))
            .collect::<Result<_, _>>()?,
        source_ports: m
            .source_ports
            .iter()
            .map(|p| port(*p, "source_ports"))
            .collect::<Result<_, _>>()?,
        transport_protocol: m.transport_protocol.clone(),
        application_protocols: m.application_protocols.clone(),
        server_names: m.server_names.clone(),
    })
}

/// What a client (API listener) cannot act on: an RBAC filter guards a server.
fn client_side(m: HttpConnectionManager) -> Result<HttpConnectionManager, FieldError> {
    if let Some(i) = m
        .http_filters
        .iter()
        .position(|f| matches!(f.kind, HttpFilterKind::Rbac(_)))
    {
        return err("an RBAC filter on a client (API) listener is not supported; RBAC belongs on the server's listener")
            .at_index("http_filters", i);
    }
    Ok(m)
}

/// What a server listener cannot act on: the mesh's server authorizes (RBAC) and hands the
/// request to the application; it neither injects faults nor routes. Its routes must be
/// `non_forwarding_action` (as proxyless gRPC servers' are).
fn server_side(m: HttpConnectionManager) -> Result<HttpConnectionManager, FieldError> {
    if let Some(i) = m
        .http_filters
        .iter()
        .position(|f| matches!(f.kind, HttpFilterKind::Fault(_)))
    {
        return err("fault injection on a server listener is not supported; inject faults on the client's routes")
            .at_index("http_filters", i);
    }
    if let RouteSource::Inline(rc) = &m.routes {
        for (v, vh) in rc.virtual_hosts.iter().enumerate() {
            for (r, route) in vh.routes.iter().enumerate() {
                if route.action != RouteAction::NonForwarding {
                    return err("a server listener's routes must be non_forwarding_action: the mesh's server hands every authorized request to the application and does not route")
                        .at_index("routes", r)
                        .at_index("virtual_hosts", v)
                        .at("route_config");
                }
            }
        }
    }
    Ok(m)
}

pub(crate) fn http_connection_manager(
    m: &hcm::HttpConnectionManager,
) -> Result<HttpConnectionManager, FieldError> {
    let routes = route_source(m)?;
    // The mesh never rewrites the `server` header: that is PASS_THROUGH. Envoy's default
    // (OVERWRITE with "envoy") is not something a proxyless service should do.
    match m.server_header_transformation {
        0 | 2 => {}
        other => {
            return err(format!(
                "server_header_transformation {other} is not supported (the mesh passes the server header through)"
            ))
            .at("server_header_transformation")
        }
    }
    let http_filters = http_filters(m)?;
    let request = RequestPolicy {
        upgrades: upgrades(m)?,
        normalize_path: m.normalize_path.map(|b| b.value).unwrap_or(false),
        merge_slashes: m.merge_slashes,
        escaped_slashes: match m.path_with_escaped_slashes_action {
            0 | 1 => EscapedSlashes::Keep,
            2 => EscapedSlashes::Reject,
            3 => EscapedSlashes::UnescapeAndRedirect,
            4 => EscapedSlashes::UnescapeAndForward,
            other => {
                return err(format!("unknown path_with_escaped_slashes_action {other}"))
                    .at("path_with_escaped_slashes_action")
            }
        },
        underscore_headers: match m
            .common_http_protocol_options
            .as_ref()
            .map_or(0, |o| o.headers_with_underscores_action)
        {
            0 => UnderscoreHeaders::Allow,
            1 => UnderscoreHeaders::Reject,
            2 => UnderscoreHeaders::Drop,
            other => {
                return err(format!("unknown headers_with_underscores_action {other}"))
                    .at("headers_with_underscores_action")
                    .at("common_http_protocol_options")
            }
        },
    };
    Ok(HttpConnectionManager {
        routes,
        http_filters,
        request,
        max_stream_duration: opt_nonzero_duration(
            m.common_http_protocol_options
                .as_ref()
                .and_then(|o| o.max_stream_duration.as_ref()),
        )
        .at("max_stream_duration")
        .at("common_http_protocol_options")?,
    })
}

/// Where a connection manager's routes come from: RDS (over ADS) or inline.
fn route_source(m: &hcm::HttpConnectionManager) -> Result<RouteSource, FieldError> {
    use hcm::http_connection_manager::RouteSpecifier as R;
    let routes = match &m.route_specifier {
        Some(R::Rds(rds)) => {
            if rds.route_config_name.is_empty() {
                return err("route_config_name is empty")
                    .at("route_config_name")
                    .at("rds");
            }
            if let Some(cs) = &rds.config_source {
                use core::config_source::ConfigSourceSpecifier as S;
                match cs.config_source_specifier {
                    Some(S::Ads(_)) | Some(S::Self_(_)) | None => {}
                    Some(_) => {
                        return err("only ads or self config sources are supported")
                            .at("config_source")
                            .at("rds")
                    }
                }
            }
            RouteSource::Rds(rds.route_config_name.clone())
        }
        Some(R::RouteConfig(rc)) => {
            RouteSource::Inline(Arc::new(route_config(rc).at("route_config")?))
        }
        Some(R::ScopedRoutes(_)) => {
            return err("scoped_routes is not supported").at("scoped_routes")
        }
        None => return err("one of rds or route_config is required"),
    };
    Ok(routes)
}

/// A connection manager's HTTP filters: the ones the mesh acts on, ending with the router.
fn http_filters(m: &hcm::HttpConnectionManager) -> Result<Vec<HttpFilter>, FieldError> {
    let mut http_filters = Vec::with_capacity(m.http_filters.len());
    for (i, f) in m.http_filters.iter().enumerate() {
        if let Some(kind) = http_filter(f).at_index("http_filters", i)? {
            http_filters.push(HttpFilter {
                name: f.name.clone(),
                kind,
            });
        }
    }
    match http_filters
        .iter()
        .position(|f| f.kind == HttpFilterKind::Router)
    {
        None => return err("the router filter is required").at("http_filters"),
        Some(pos) if pos + 1 != http_filters.len() => {
            return err("the router must be the last HTTP filter").at("http_filters")
        }
        Some(_) => {}
    }
    Ok(http_filters)
}

/// The HTTP/1.1 upgrade types a connection manager allows (websocket and the like).
fn upgrades(m: &hcm::HttpConnectionManager) -> Result<Vec<String>, FieldError> {
    let mut upgrades = Vec::new();
    for (i, u) in m.upgrade_configs.iter().enumerate() {
        if !u.filters.is_empty() {
            return err("filter chains per upgrade type are not supported")
                .at("filters")
                .at_index("upgrade_configs", i);
        }
        if u.upgrade_type.eq_ignore_ascii_case("connect") || u.upgrade_type.is_empty() {
            return err(format!(
                "upgrade type {:?} is not supported (HTTP/1.1 Upgrade types such as websocket are)",
                u.upgrade_type
            ))
            .at("upgrade_type")
            .at_index("upgrade_configs", i);
        }
        if u.enabled.is_none_or(|b| b.value) {
            upgrades.push(u.upgrade_type.to_ascii_lowercase());
        }
    }
    Ok(upgrades)
}

/// `Ok(None)`: an optional filter the mesh does not implement, skipped.
fn http_filter(f: &hcm::HttpFilter) -> Result<Option<HttpFilterKind>, FieldError> {
    if f.name.is_empty() {
        return err("name is empty").at("name");
    }
    let any = match &f.config_type {
        Some(hcm::http_filter::ConfigType::TypedConfig(any)) => any,
        Some(hcm::http_filter::ConfigType::ConfigDiscovery(_)) if f.is_optional => return Ok(None),
        Some(hcm::http_filter::ConfigType::ConfigDiscovery(_)) => {
            return err(format!(
                "filter {:?}: config_discovery is not supported",
                f.name
            ))
            .at("config_discovery")
        }
        None => {
            return err(format!("filter {:?} has no typed_config", f.name)).at("typed_config");
        }
    };
    if f.disabled {
        return Ok(None);
    }
    let name = type_name(any);
    let kind = if name == Router::full_name() {
        HttpFilterKind::Router
    } else if name == HttpFault::full_name() {
        let cfg: HttpFault = decode_any(any).at("typed_config")?;
        // An empty HTTPFault is the usual "enabled, configured per route" form.
        let base = fault(&cfg).at("typed_config")?;
        let empty = base.delay.is_none() && base.abort.is_none();
        HttpFilterKind::Fault((!empty).then_some(base))
    } else if name == RbacFilter::full_name() {
        let cfg: RbacFilter = decode_any(any).at("typed_config")?;
        HttpFilterKind::Rbac(rbac_filter(&cfg).at("typed_config")?)
    } else if f.is_optional {
        return Ok(None);
    } else {
        return err(format!(
            "filter {:?} of type {name} is not supported and not marked is_optional",
            f.name
        ))
        .at("typed_config");
    };
    Ok(Some(kind))
}
