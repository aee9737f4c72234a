//! Listeners (LDS): client-side API listeners and server-side listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::fault::FaultConfig;
use super::rbac::{CidrRange, RbacConfig};
use super::route::RouteConfig;
use super::tls::DownstreamTls;

/// `envoy.config.listener.v3.Listener`.
#[derive(Clone, Debug, PartialEq)]
pub struct Listener {
    /// Resource name (for a client, the target: `greeter:50051`).
    pub name: String,
    /// Client or server side.
    pub kind: ListenerKind,
}

impl Listener {
    /// The HTTP connection manager of an API listener.
    pub fn api(&self) -> Option<&HttpConnectionManager> {
        match &self.kind {
            ListenerKind::Api(hcm) => Some(hcm),
            ListenerKind::Server(_) => None,
        }
    }

    /// Every route source (RDS name or inline config) this listener uses.
    pub fn route_sources(&self) -> Vec<&RouteSource> {
        match &self.kind {
            ListenerKind::Api(hcm) => vec![&hcm.routes],
            ListenerKind::Server(s) => s
                .filter_chains
                .iter()
                .chain(s.default_filter_chain.iter())
                .filter_map(|fc| fc.http.as_ref().map(|h| &h.routes))
                .collect(),
        }
    }
}

/// Which side a listener configures.
// Listeners live behind an `Arc` in the snapshot and are never moved per request, so the
// size of the larger variant costs nothing worth a `Box`.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum ListenerKind {
    /// `api_listener`: a client's view of a target.
    Api(HttpConnectionManager),
    /// A listening socket with filter chains (the inbound side).
    Server(ServerListener),
}

/// Where an HTTP connection manager's routes come from.
#[derive(Clone, Debug, PartialEq)]
pub enum RouteSource {
    /// RDS, by name.
    Rds(String),
    /// Inline.
    Inline(Arc<RouteConfig>),
}

/// `HttpConnectionManager`, the part the mesh uses.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpConnectionManager {
    /// Routes.
    pub routes: RouteSource,
    /// HTTP filters in order; the router is last.
    pub http_filters: Vec<HttpFilter>,
    /// `common_http_protocol_options.max_stream_duration` (gRPC's default deadline).
    pub max_stream_duration: Option<Duration>,
    /// What happens to a request before routing and RBAC (path normalization, escaped
    /// slashes, underscore headers).
    pub request: super::RequestPolicy,
}

impl HttpConnectionManager {
    /// The fault filter's base config, if the filter is present.
    pub fn fault(&self) -> Option<&FaultConfig> {
        self.http_filters.iter().find_map(|f| match &f.kind {
            HttpFilterKind::Fault(cfg) => cfg.as_ref(),
            _ => None,
        })
    }

    /// Whether the fault filter is in the chain (routes may override an empty base config).
    pub fn has_fault_filter(&self) -> bool {
        self.http_filters
            .iter()
            .any(|f| matches!(f.kind, HttpFilterKind::Fault(_)))
    }

    /// The RBAC filter's config, if present.
    pub fn rbac(&self) -> Option<&RbacConfig> {
        self.http_filters.iter().find_map(|f| match &f.kind {
            HttpFilterKind::Rbac(cfg) => Some(cfg),
            _ => None,
        })
    }
}

/// One HTTP filter.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpFilter {
    /// Name from the config (`envoy.filters.http.router`...).
    pub name: String,
    /// The recognised filter.
    pub kind: HttpFilterKind,
}

/// The HTTP filters the mesh implements.
#[derive(Clone, Debug, PartialEq)]
pub enum HttpFilterKind {
    /// Terminal: forward by the route table.
    Router,
    /// Fault injection (`None`: no base config, only per-route overrides).
    Fault(Option<FaultConfig>),
    /// Authorization.
    Rbac(RbacConfig),
}

/// A server-side listener.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerListener {
    /// Listening address.
    pub address: SocketAddr,
    /// Filter chains; the most specific match wins.
    pub filter_chains: Vec<FilterChain>,
    /// Used when no chain matches.
    pub default_filter_chain: Option<FilterChain>,
}

/// `FilterChainMatch`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FilterChainMatch {
    /// Destination port.
    pub destination_port: Option<u16>,
    /// Destination address ranges.
    pub prefix_ranges: Vec<CidrRange>,
    /// Source address ranges.
    pub source_prefix_ranges: Vec<CidrRange>,
    /// Source ports.
    pub source_ports: Vec<u16>,
    /// `tls` or `raw_buffer` (empty: any).
    pub transport_protocol: String,
    /// ALPN values (empty: any).
    pub application_protocols: Vec<String>,
    /// SNI values (empty: any).
    pub server_names: Vec<String>,
}

/// One filter chain: an optional TLS context and the HTTP connection manager.
#[derive(Clone, Debug, PartialEq)]
pub struct FilterChain {
    /// The chain's name (what errors and the config dump call it by).
    pub name: String,
    /// When the chain applies.
    pub matcher: FilterChainMatch,
    /// TLS termination (`None`: plaintext).
    pub tls: Option<DownstreamTls>,
    /// HTTP handling (`None` for a chain without an HTTP connection manager).
    pub http: Option<HttpConnectionManager>,
}
