//! What every part of generation uses: the options, the output, the context that collects
//! errors, and the small builders of protos several parts need.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use prost::{Message, Name};

use crate::istio::index::Index;
use crate::istio::{ConfigError, Seg, TrafficPolicy};

/// Generation settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// SPIFFE trust domain (default `cluster.local`).
    pub trust_domain: String,
    /// Server listener names; `%s` is `0.0.0.0:PORT` (Istio's:
    /// `xds.istio.io/grpc/lds/inbound/%s`).
    pub server_listener_template: String,
    /// Bootstrap certificate provider instance holding the workload certificate and roots.
    pub cert_provider_instance: String,
    /// Who the resources are for: proxyless gRPC clients take certificates from their
    /// bootstrap's certificate provider instances, Envoy takes them over SDS.
    pub flavour: Flavour,
}

/// The kind of client resources are generated for (they differ only in where TLS
/// certificates come from, as with Istio's generators).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Flavour {
    /// Proxyless gRPC (and the mesh's own client): `tls_certificate_provider_instance` /
    /// `ca_certificate_provider_instance` naming the bootstrap's instance.
    #[default]
    ProxylessGrpc,
    /// Envoy: the SDS secrets `default` (workload certificate) and `ROOTCA` over ADS, as
    /// istiod serves sidecars.
    Envoy,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            server_listener_template: "xds.istio.io/grpc/lds/inbound/%s".into(),
            cert_provider_instance: "default".into(),
            flavour: Flavour::ProxylessGrpc,
        }
    }
}

/// What [`generate`](crate::istio::generate()) produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Generated {
    /// Every resource, ready for the cache.
    pub resources: Vec<Any>,
    /// Client listener names (`HOST:PORT`).
    pub listeners: Vec<String>,
    /// Server listener names.
    pub server_listeners: Vec<String>,
    /// Resources each client sees its own way: endpoint assignments under locality load
    /// balancing (see [`crate::istio::locality`]). Publish with
    /// [`ResourceCache::set_resources_per_node`](crate::ads::ResourceCache::set_resources_per_node).
    pub per_node: Vec<crate::ads::PerNode>,
}

pub(super) fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// Parses Istio durations (`1h`, `2s`, `500ms`, `1.5s`, `100us`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    if n < 0.0 || !n.is_finite() {
        return None;
    }
    let secs = match unit {
        "h" => n * 3600.0,
        "m" => n * 60.0,
        "s" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "ns" => n / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

pub(super) fn pb_duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub(super) fn u32v(v: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value: v })
}

/// What generation reads (the index, the options) and the errors it collects.
pub(super) struct Ctx<'a> {
    pub(super) index: &'a Index<'a>,
    pub(super) opts: &'a Options,
    pub(super) errors: Vec<ConfigError>,
}

impl Ctx<'_> {
    pub(super) fn duration(
        &mut self,
        origin: &crate::istio::Origin,
        path: &[Seg<'_>],
        s: &str,
    ) -> Option<Duration> {
        let d = parse_duration(s);
        if d.is_none() {
            self.errors.push(origin.at(
                path,
                format!("invalid duration {s:?} (use e.g. 500ms, 2s, 1m)"),
            ));
        }
        d
    }

    pub(super) fn spiffe(&self, ns: &str, sa: &str) -> String {
        format!("spiffe://{}/ns/{ns}/sa/{sa}", self.opts.trust_domain)
    }

    /// Istio's generator for proxyless gRPC applies TLS only when the DestinationRule asks
    /// for it (`tls.mode: ISTIO_MUTUAL`): it cannot know whether a client or server uses xDS
    /// credentials, so there is no auto mTLS. `meshctl validate` warns when a STRICT server
    /// would then refuse such clients.
    pub(super) fn mtls_on(&self, policy: &TrafficPolicy) -> bool {
        policy.tls.as_ref().and_then(|t| t.mode.as_deref()) == Some("ISTIO_MUTUAL")
    }
}

pub(super) fn ads_source() -> core::ConfigSource {
    core::ConfigSource {
        resource_api_version: core::ApiVersion::V3 as i32,
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

pub(super) fn socket(address: &str, port: u32) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: address.to_owned(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

pub(super) fn exact(s: &str) -> matcher::StringMatcher {
    matcher::StringMatcher {
        match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(s.to_owned())),
        ..Default::default()
    }
}

pub(super) fn prefix_match(p: &str) -> rpb::RouteMatch {
    rpb::RouteMatch {
        path_specifier: Some(rpb::route_match::PathSpecifier::Prefix(p.into())),
        ..Default::default()
    }
}
