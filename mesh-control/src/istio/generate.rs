//! Istio resources → the xDS resources Istio generates for proxyless clients.
//!
//! For each service `HOST:PORT` (from ServiceEntries): a client `Listener` named `HOST:PORT`
//! with an `api_listener` whose routes come by RDS under the same name, a
//! `RouteConfiguration` built from the VirtualServices for the host, `Cluster`s named
//! `outbound|PORT|SUBSET|HOST` (one per DestinationRule subset plus the whole service) and a
//! `ClusterLoadAssignment` for each. With mTLS, clusters carry an `UpstreamTlsContext` whose
//! SAN matchers are the SPIFFE IDs of the endpoints. Each workload port also gets a server
//! listener (named by the `server_listener_resource_name_template`) with a
//! `DownstreamTlsContext` per PeerAuthentication and RBAC per AuthorizationPolicy.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cpb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as epb;
use envoy_types::pb::envoy::config::listener::v3 as lpb;
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common_fault;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as rbac_filter;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as upstream_http;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::envoy::r#type::v3 as types;
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration as PbDuration, UInt32Value};
use prost::{Message, Name};

use super::{
    Config, ConfigError, Doc, HttpRoute, Seg, StringMatch, TrafficPolicy, WorkloadEntrySpec,
};

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

/// What [`generate`] produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Generated {
    /// Every resource, ready for the cache.
    pub resources: Vec<Any>,
    /// Client listener names (`HOST:PORT`).
    pub listeners: Vec<String>,
    /// Server listener names.
    pub server_listeners: Vec<String>,
    /// Resources each client sees its own way: endpoint assignments under locality load
    /// balancing (see [`super::locality`]). Publish with
    /// [`ResourceCache::set_resources_per_node`](crate::ads::ResourceCache::set_resources_per_node).
    pub per_node: Vec<crate::ads::PerNode>,
}

fn any<M: Message + Name>(m: &M) -> Any {
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

fn pb_duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn u32v(v: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value: v })
}

/// A workload serving a service port.
#[derive(Clone, Debug)]
pub(crate) struct Workload {
    pub(crate) address: String,
    pub(crate) port: u32,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) locality: String,
    pub(crate) weight: u32,
    pub(crate) namespace: String,
    pub(crate) service_account: String,
}

/// One `HOST:PORT` of a ServiceEntry.
#[derive(Clone, Debug)]
pub(crate) struct Service {
    pub(crate) host: String,
    pub(crate) namespace: String,
    pub(crate) port: u32,
    pub(crate) protocol: String,
    pub(crate) workloads: Vec<Workload>,
    /// `resolution: DNS` (`Some(false)`: STRICT_DNS, every address an endpoint) or
    /// `DNS_ROUND_ROBIN` (`Some(true)`: LOGICAL_DNS, the first address), as Istio maps them.
    pub(crate) dns: Option<bool>,
}

impl Service {
    fn http2(&self) -> bool {
        matches!(
            self.protocol.to_ascii_uppercase().as_str(),
            "HTTP2" | "GRPC" | "GRPC-WEB"
        )
    }
}

pub(crate) fn cluster_name(port: u32, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// The services of a configuration, with their workloads.
pub(crate) fn services(config: &Config, errors: &mut Vec<ConfigError>) -> Vec<Service> {
    let mut out = Vec::new();
    for se in &config.service_entries {
        let ns = se.meta.ns().to_owned();
        let dns = match se.spec.resolution.as_deref() {
            None | Some("STATIC") | Some("NONE") => None,
            Some("DNS") => Some(false),
            Some("DNS_ROUND_ROBIN") => Some(true),
            Some(r) => {
                errors.push(se.origin.at(
                    &[Seg::Key("spec"), Seg::Key("resolution")],
                    format!(
                        "ServiceEntry {}: resolution {r} is not supported (STATIC, DNS or DNS_ROUND_ROBIN)",
                        se.meta.name
                    ),
                ));
                None
            }
        };
        // Workloads: inline endpoints plus WorkloadEntries chosen by the selector.
        let mut entries: Vec<(
            &WorkloadEntrySpec,
            String,
            Vec<Seg<'static>>,
            &super::Origin,
        )> = se
            .spec
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                (
                    e,
                    ns.clone(),
                    vec![Seg::Key("spec"), Seg::Key("endpoints"), Seg::Idx(i)],
                    &se.origin,
                )
            })
            .collect();
        if let Some(sel) = &se.spec.workload_selector {
            for we in &config.workload_entries {
                if we.meta.ns() == ns
                    && sel
                        .labels()
                        .iter()
                        .all(|(k, v)| we.spec.labels.get(k) == Some(v))
                {
                    entries.push((
                        &we.spec,
                        ns.clone(),
                        vec![Seg::Key("spec"), Seg::Key("address")],
                        &we.origin,
                    ));
                }
            }
        }
        for (pi, port) in se.spec.ports.iter().enumerate() {
            if port.number == 0 || port.number > 65535 {
                errors.push(se.origin.at(
                    &[
                        Seg::Key("spec"),
                        Seg::Key("ports"),
                        Seg::Idx(pi),
                        Seg::Key("number"),
                    ],
                    format!(
                        "ServiceEntry {}: port {} is out of range",
                        se.meta.name, port.number
                    ),
                ));
                continue;
            }
            let mut workloads = Vec::new();
            // A DNS service without endpoints resolves its hosts (Istio's rule).
            let hosts_as_endpoints: Vec<WorkloadEntrySpec> = if dns.is_some() && entries.is_empty()
            {
                se.spec
                    .hosts
                    .iter()
                    .map(|h| WorkloadEntrySpec {
                        address: h.clone(),
                        ..Default::default()
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let host_paths: Vec<_> = hosts_as_endpoints
                .iter()
                .map(|e| {
                    (
                        e,
                        ns.clone(),
                        vec![Seg::Key("spec"), Seg::Key("hosts")],
                        &se.origin,
                    )
                })
                .collect();
            for (e, ns, path, origin) in entries.iter().chain(host_paths.iter()) {
                if dns.is_none() && e.address.parse::<std::net::IpAddr>().is_err() {
                    errors.push(origin.at(
                        path,
                        format!("endpoint address {:?} is not an IP address (with resolution STATIC; use DNS or DNS_ROUND_ROBIN for host names)", e.address),
                    ));
                    continue;
                }
                let target = e
                    .ports
                    .get(&port.name)
                    .copied()
                    .or(port.target_port)
                    .unwrap_or(port.number);
                workloads.push(Workload {
                    address: e.address.clone(),
                    port: target,
                    labels: e.labels.clone(),
                    locality: e.locality.clone(),
                    weight: e.weight.unwrap_or(1).max(1),
                    namespace: ns.clone(),
                    service_account: e
                        .service_account
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                });
            }
            for host in &se.spec.hosts {
                out.push(Service {
                    host: host.clone(),
                    namespace: ns.clone(),
                    port: port.number,
                    protocol: port.protocol.clone(),
                    workloads: workloads.clone(),
                    dns,
                });
            }
        }
    }
    out
}

/// Resolves a host as written in a rule (FQDN or short name in the rule's namespace).
pub(crate) fn resolve_host<'a>(services: &'a [Service], host: &str, ns: &str) -> Option<&'a str> {
    let candidates = [
        host.to_owned(),
        format!("{host}.{ns}.svc.cluster.local"),
        format!("{host}.svc.cluster.local"),
        format!("{host}.cluster.local"),
    ];
    candidates.iter().find_map(|c| {
        services
            .iter()
            .find(|s| &s.host == c)
            .map(|s| s.host.as_str())
    })
}

/// The DestinationRule for a host.
pub(crate) fn destination_rule<'a>(
    config: &'a Config,
    services: &[Service],
    host: &str,
) -> Option<&'a Doc<super::DestinationRuleSpec>> {
    config
        .destination_rules
        .iter()
        .find(|dr| resolve_host(services, &dr.spec.host, dr.meta.ns()) == Some(host))
}

/// A policy as it applies to one service port: the `portLevelSettings` entry for the port
/// replaces the policy's sections that it sets (Istio's `getPortLevelTrafficPolicy`).
fn at_port(policy: &TrafficPolicy, port: u32) -> TrafficPolicy {
    let mut p = policy.clone();
    p.port_level_settings.clear();
    if let Some(pl) = policy
        .port_level_settings
        .iter()
        .find(|pl| pl.port.as_ref().is_some_and(|s| s.number == port))
    {
        if pl.load_balancer.is_some() {
            p.load_balancer = pl.load_balancer.clone();
        }
        if pl.connection_pool.is_some() {
            p.connection_pool = pl.connection_pool.clone();
        }
        if pl.outlier_detection.is_some() {
            p.outlier_detection = pl.outlier_detection.clone();
        }
        if pl.tls.is_some() {
            p.tls = pl.tls.clone();
        }
    }
    p
}

/// The policy for a cluster of a service port: the host policy at the port, then the subset
/// policy at the port overriding it section by section (Istio's `MergeSubsetTrafficPolicy`).
pub(crate) fn merged_policy(
    base: Option<&TrafficPolicy>,
    subset: Option<&TrafficPolicy>,
    port: u32,
) -> TrafficPolicy {
    let mut p = base.map(|b| at_port(b, port)).unwrap_or_default();
    if let Some(s) = subset.map(|s| at_port(s, port)) {
        if s.load_balancer.is_some() {
            p.load_balancer = s.load_balancer;
        }
        if s.connection_pool.is_some() {
            p.connection_pool = s.connection_pool;
        }
        if s.outlier_detection.is_some() {
            p.outlier_detection = s.outlier_detection;
        }
        if s.tls.is_some() {
            p.tls = s.tls;
        }
    }
    p
}

/// Checks what the schema cannot: every `portLevelSettings` entry names its port (Istio
/// requires it), and every `tls` block is one meshctl can honour exactly.
fn check_rule(dr: &Doc<super::DestinationRuleSpec>, errors: &mut Vec<ConfigError>) {
    let mut places: Vec<(Vec<Seg<'static>>, &TrafficPolicy)> = Vec::new();
    if let Some(p) = &dr.spec.traffic_policy {
        places.push((vec![Seg::Key("spec"), Seg::Key("trafficPolicy")], p));
    }
    for (i, s) in dr.spec.subsets.iter().enumerate() {
        if let Some(p) = &s.traffic_policy {
            places.push((
                vec![
                    Seg::Key("spec"),
                    Seg::Key("subsets"),
                    Seg::Idx(i),
                    Seg::Key("trafficPolicy"),
                ],
                p,
            ));
        }
    }
    let mut error = |path: &[Seg<'_>], message: String| {
        errors.push(dr.origin.at(
            path,
            format!(
                "DestinationRule {}: {}: {message}",
                dr.meta.name,
                super::path_text(path)
            ),
        ));
    };
    // Outlier detection reaches a policy from itself or the host policy it is merged with.
    let host_od = dr
        .spec
        .traffic_policy
        .as_ref()
        .is_some_and(|p| p.outlier_detection.is_some());
    for (path, policy) in places {
        let mut tls_blocks = Vec::new();
        let mut lb_blocks = Vec::new();
        let od = host_od || policy.outlier_detection.is_some();
        if let Some(tls) = &policy.tls {
            tls_blocks.push(([path.as_slice(), &[Seg::Key("tls")]].concat(), tls));
        }
        if let Some(lb) = &policy.load_balancer {
            lb_blocks.push((
                [path.as_slice(), &[Seg::Key("loadBalancer")]].concat(),
                lb,
                od,
            ));
        }
        for (j, pl) in policy.port_level_settings.iter().enumerate() {
            let at = [
                path.as_slice(),
                &[Seg::Key("portLevelSettings"), Seg::Idx(j)],
            ]
            .concat();
            if pl.port.as_ref().is_none_or(|p| p.number == 0) {
                error(
                    &[at.as_slice(), &[Seg::Key("port")]].concat(),
                    "a port number is required".into(),
                );
            }
            if let Some(tls) = &pl.tls {
                tls_blocks.push(([at.as_slice(), &[Seg::Key("tls")]].concat(), tls));
            }
            if let Some(lb) = &pl.load_balancer {
                let od = od || pl.outlier_detection.is_some();
                lb_blocks.push((
                    [at.as_slice(), &[Seg::Key("loadBalancer")]].concat(),
                    lb,
                    od,
                ));
            }
        }
        for (at, lb, od) in lb_blocks {
            check_warmup(&at, lb, &mut error);
            if let Some(setting) = &lb.locality_lb_setting {
                let base = [at.as_slice(), &[Seg::Key("localityLbSetting")]].concat();
                super::locality::check(setting, od, &mut |rel, index, message| {
                    let mut path = base.clone();
                    for (k, key) in rel.iter().enumerate() {
                        path.push(Seg::Key(key));
                        if k == 0 {
                            if let Some(i) = index {
                                path.push(Seg::Idx(i));
                            }
                        }
                    }
                    error(&path, message);
                });
            }
        }
        for (at, tls) in tls_blocks {
            let field = |name: &'static str| [at.as_slice(), &[Seg::Key(name)]].concat();
            let mode = tls.mode.as_deref().unwrap_or("DISABLE");
            let external = matches!(mode, "SIMPLE" | "MUTUAL");
            if !matches!(mode, "DISABLE" | "SIMPLE" | "MUTUAL" | "ISTIO_MUTUAL") {
                error(
                    &field("mode"),
                    format!("{mode:?} is not a TLS mode (DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL)"),
                );
                continue;
            }
            // Settings that only SIMPLE and MUTUAL read would be silently unused otherwise.
            let set = [
                ("caCertificates", tls.ca_certificates.is_some()),
                ("sni", tls.sni.is_some()),
                ("subjectAltNames", !tls.subject_alt_names.is_empty()),
            ];
            for (name, is_set) in set {
                if is_set && !external {
                    error(
                        &field(name),
                        format!("applies to modes SIMPLE and MUTUAL only (mode is {mode})"),
                    );
                }
            }
            for (name, is_set) in [
                ("clientCertificate", tls.client_certificate.is_some()),
                ("privateKey", tls.private_key.is_some()),
            ] {
                if mode == "MUTUAL" && !is_set {
                    error(&field(name), "is required with mode MUTUAL".into());
                }
                if mode != "MUTUAL" && is_set {
                    error(
                        &field(name),
                        format!("applies to mode MUTUAL only (mode is {mode})"),
                    );
                }
            }
        }
    }
}

/// `loadBalancer.warmup` / `warmupDurationSecs`: slow start exists for ROUND_ROBIN and
/// LEAST_REQUEST only (as in Istio and Envoy), needs a duration of at least 1 ms, a minimum
/// percent of 0-100 and a positive aggression.
fn check_warmup(
    at: &[Seg<'static>],
    lb: &super::LoadBalancer,
    error: &mut impl FnMut(&[Seg<'_>], String),
) {
    let field = |name: &'static str| [at, &[Seg::Key(name)]].concat();
    let named = if lb.warmup.is_some() {
        "warmup"
    } else if lb.warmup_duration_secs.is_some() {
        "warmupDurationSecs"
    } else {
        return;
    };
    let policy = match (&lb.consistent_hash, lb.simple.as_deref()) {
        (Some(_), _) => Some("consistentHash"),
        (None, None | Some("ROUND_ROBIN" | "LEAST_REQUEST" | "LEAST_CONN")) => None,
        (None, Some(other)) => Some(other),
    };
    if let Some(policy) = policy {
        error(
            &field(named),
            format!(
                "slow start applies to ROUND_ROBIN and LEAST_REQUEST only (the policy is {policy})"
            ),
        );
    }
    let mut window = |path: Vec<Seg<'static>>, d: Option<&String>| match d {
        None => error(&path, "is required".into()),
        Some(d) => match parse_duration(d) {
            Some(w) if w >= Duration::from_millis(1) => {}
            Some(_) => error(&path, format!("{d:?} is shorter than 1ms")),
            None => error(&path, format!("invalid duration {d:?} (use e.g. 30s, 2m)")),
        },
    };
    match &lb.warmup {
        Some(w) => {
            let at = field("warmup");
            let sub = |name: &'static str| [at.as_slice(), &[Seg::Key(name)]].concat();
            window(sub("duration"), w.duration.as_ref());
            if let Some(p) = w.minimum_percent.filter(|p| !(0.0..=100.0).contains(p)) {
                error(&sub("minimumPercent"), format!("must be 0-100 (got {p})"));
            }
            if let Some(a) = w.aggression.filter(|a| !(a.is_finite() && *a > 0.0)) {
                error(
                    &sub("aggression"),
                    format!("must be greater than 0 (got {a})"),
                );
            }
        }
        None => window(
            field("warmupDurationSecs"),
            lb.warmup_duration_secs.as_ref(),
        ),
    }
}

/// The slow-start config of a load balancer block (`warmup` before the deprecated
/// `warmupDurationSecs`), as Istio builds it; `None` without one or when it does not parse
/// (`check_rule` reports that).
fn slow_start(lb: &super::LoadBalancer) -> Option<cpb::cluster::SlowStartConfig> {
    let (window, min, aggression) = match &lb.warmup {
        Some(w) => (w.duration.as_deref()?, w.minimum_percent, w.aggression),
        None => (lb.warmup_duration_secs.as_deref()?, None, None),
    };
    let window = parse_duration(window).filter(|w| !w.is_zero())?;
    Some(cpb::cluster::SlowStartConfig {
        slow_start_window: Some(pb_duration(window)),
        aggression: aggression.map(|a| core::RuntimeDouble {
            default_value: a,
            runtime_key: "upstream.istio.slowstart.aggression".into(),
        }),
        min_weight_percent: min.map(|value| envoy_types::pb::envoy::r#type::v3::Percent { value }),
    })
}

/// The PeerAuthentication mode for a workload: selector match in its namespace, then
/// namespace-wide, then mesh-wide (`istio-system`), else PERMISSIVE (Istio's default).
pub(crate) fn peer_mode(config: &Config, ns: &str, labels: &BTreeMap<String, String>) -> String {
    let mode = |pa: &Doc<super::PeerAuthenticationSpec>| {
        pa.spec.mtls.as_ref().and_then(|m| m.mode.clone())
    };
    let selected = config.peer_authentications.iter().find(|pa| {
        pa.meta.ns() == ns
            && pa.spec.selector.as_ref().is_some_and(|s| {
                !s.labels().is_empty() && s.labels().iter().all(|(k, v)| labels.get(k) == Some(v))
            })
    });
    let ns_wide = || {
        config.peer_authentications.iter().find(|pa| {
            pa.meta.ns() == ns
                && pa
                    .spec
                    .selector
                    .as_ref()
                    .is_none_or(|s| s.labels().is_empty())
        })
    };
    let mesh_wide = || {
        config.peer_authentications.iter().find(|pa| {
            pa.meta.ns() == "istio-system"
                && pa
                    .spec
                    .selector
                    .as_ref()
                    .is_none_or(|s| s.labels().is_empty())
        })
    };
    selected
        .and_then(mode)
        .or_else(|| ns_wide().and_then(mode))
        .or_else(|| mesh_wide().and_then(mode))
        .unwrap_or_else(|| "PERMISSIVE".into())
}

struct Ctx<'a> {
    config: &'a Config,
    services: Vec<Service>,
    opts: &'a Options,
    errors: Vec<ConfigError>,
}

/// Generates the xDS resources for `config`.
///
/// # Errors
/// Every reference that cannot be resolved (unknown host or subset, bad duration, ...), as
/// `file:line: message`. Nothing is generated when there is any error.
pub fn generate(config: &Config, opts: &Options) -> Result<Generated, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let services = services(config, &mut errors);
    let mut ctx = Ctx {
        config,
        services,
        opts,
        errors,
    };
    for dr in &config.destination_rules {
        check_rule(dr, &mut ctx.errors);
    }
    let mut out = Generated::default();
    let services = ctx.services.clone();
    for svc in &services {
        let dr = destination_rule(config, &services, &svc.host);
        let mut subsets: Vec<(String, BTreeMap<String, String>, Option<TrafficPolicy>)> =
            vec![(String::new(), BTreeMap::new(), None)];
        if let Some(dr) = dr {
            for s in &dr.spec.subsets {
                subsets.push((s.name.clone(), s.labels.clone(), s.traffic_policy.clone()));
            }
        }
        for (subset, labels, subset_policy) in &subsets {
            let policy = merged_policy(
                dr.and_then(|d| d.spec.traffic_policy.as_ref()),
                subset_policy.as_ref(),
                svc.port,
            );
            let workloads: Vec<&Workload> = svc
                .workloads
                .iter()
                .filter(|w| labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                .collect();
            let name = cluster_name(svc.port, subset, &svc.host);
            let mut cluster = ctx.cluster(svc, &name, &policy, &workloads, dr);
            let setting = policy
                .load_balancer
                .as_ref()
                .and_then(|lb| lb.locality_lb_setting.as_ref());
            let plan = super::locality::LocalityPlan::new(
                setting,
                policy.outlier_detection.is_some(),
                &workloads,
            );
            if let Some(plan) = &plan {
                if plan.weights_localities() {
                    cluster
                        .common_lb_config
                        .get_or_insert_with(Default::default)
                        .locality_config_specifier = Some(
                        cpb::cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(
                            Default::default(),
                        ),
                    );
                }
            }
            match svc.dns {
                // DNS services: the names go in the cluster, resolved by the client.
                Some(logical) => {
                    if logical && workloads.len() > 1 {
                        if let Some(se) = config
                            .service_entries
                            .iter()
                            .find(|se| se.spec.hosts.contains(&svc.host))
                        {
                            ctx.errors.push(se.origin.at(
                                &[Seg::Key("spec"), Seg::Key("resolution")],
                                format!(
                                    "ServiceEntry {}: resolution DNS_ROUND_ROBIN needs exactly one endpoint (it has {})",
                                    se.meta.name,
                                    workloads.len()
                                ),
                            ));
                        }
                    }
                    let explicit = setting.is_some_and(|s| {
                        !(s.distribute.is_empty()
                            && s.failover.is_empty()
                            && s.failover_priority.is_empty())
                    });
                    if let (true, Some(dr)) = (explicit, dr) {
                        ctx.errors.push(dr.origin.at(
                            &[Seg::Key("spec")],
                            format!(
                                "DestinationRule {}: localityLbSetting applies to services with endpoints (resolution STATIC or NONE), not to {} (resolution DNS): its addresses are resolved by each client",
                                dr.meta.name, svc.host
                            ),
                        ));
                    }
                    let kind = if logical {
                        cpb::cluster::DiscoveryType::LogicalDns
                    } else {
                        cpb::cluster::DiscoveryType::StrictDns
                    };
                    cluster.cluster_discovery_type =
                        Some(cpb::cluster::ClusterDiscoveryType::Type(kind as i32));
                    cluster.eds_cluster_config = None;
                    cluster.load_assignment = Some(assignment(&name, &workloads));
                    out.resources.push(any(&cluster));
                }
                None => {
                    out.resources.push(any(&cluster));
                    out.resources.push(any(&assignment(&name, &workloads)));
                    if let Some(plan) = plan {
                        out.per_node.push(crate::ads::PerNode {
                            type_url: <epb::ClusterLoadAssignment as Name>::type_url(),
                            name: name.clone(),
                            view: std::sync::Arc::new(plan),
                        });
                    }
                }
            }
        }
        let listener_name = format!("{}:{}", svc.host, svc.port);
        out.resources
            .push(any(&client_listener(&listener_name, !svc.http2())));
        out.resources
            .push(any(&ctx.route_config(svc, &listener_name)));
        out.listeners.push(listener_name);
    }
    // Server listeners, one per workload port.
    let mut ports: BTreeMap<u32, Vec<&Service>> = BTreeMap::new();
    // DNS services are outside the mesh's workloads: they get no server listener.
    for svc in services.iter().filter(|s| s.dns.is_none()) {
        for w in &svc.workloads {
            ports.entry(w.port).or_default().push(svc);
        }
    }
    for (port, svcs) in ports {
        let address = format!("0.0.0.0:{port}");
        let name = opts.server_listener_template.replace("%s", &address);
        let listener = ctx.server_listener(&name, port, &svcs);
        out.resources.push(any(&listener));
        out.server_listeners.push(name);
    }
    if ctx.errors.is_empty() {
        Ok(out)
    } else {
        Err(ctx.errors)
    }
}

/// WebSocket upgrades, which Istio's sidecars allow on HTTP/1.1 ports (gRPC ports have none).
fn websocket(on: bool) -> Vec<hcm::http_connection_manager::UpgradeConfig> {
    on.then(|| hcm::http_connection_manager::UpgradeConfig {
        upgrade_type: "websocket".into(),
        ..Default::default()
    })
    .into_iter()
    .collect()
}

fn client_listener(name: &str, http1: bool) -> lpb::Listener {
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

fn ads_source() -> core::ConfigSource {
    core::ConfigSource {
        resource_api_version: core::ApiVersion::V3 as i32,
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn fault_filter() -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: "envoy.filters.http.fault".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
            &fault::HttpFault::default(),
        ))),
        ..Default::default()
    }
}

fn router_filter() -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
            &Router::default(),
        ))),
        ..Default::default()
    }
}

fn assignment(name: &str, workloads: &[&Workload]) -> epb::ClusterLoadAssignment {
    let mut by_locality: BTreeMap<&str, Vec<&Workload>> = BTreeMap::new();
    for w in workloads {
        by_locality.entry(w.locality.as_str()).or_default().push(w);
    }
    epb::ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: by_locality
            .into_iter()
            .map(|(loc, ws)| {
                let mut parts = loc.splitn(3, '/');
                epb::LocalityLbEndpoints {
                    locality: Some(core::Locality {
                        region: parts.next().unwrap_or_default().to_owned(),
                        zone: parts.next().unwrap_or_default().to_owned(),
                        sub_zone: parts.next().unwrap_or_default().to_owned(),
                    }),
                    load_balancing_weight: u32v(ws.iter().map(|w| w.weight).sum::<u32>().max(1)),
                    lb_endpoints: ws
                        .iter()
                        .map(|w| epb::LbEndpoint {
                            host_identifier: Some(epb::lb_endpoint::HostIdentifier::Endpoint(
                                epb::Endpoint {
                                    address: Some(socket(&w.address, w.port)),
                                    ..Default::default()
                                },
                            )),
                            load_balancing_weight: u32v(w.weight),
                            health_status: core::HealthStatus::Healthy as i32,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }
            })
            .collect(),
        ..Default::default()
    }
}

fn socket(address: &str, port: u32) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: address.to_owned(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn exact(s: &str) -> matcher::StringMatcher {
    matcher::StringMatcher {
        match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(s.to_owned())),
        ..Default::default()
    }
}

fn string_match(m: &StringMatch) -> Option<matcher::StringMatcher> {
    use matcher::string_matcher::MatchPattern as P;
    let pattern = if let Some(e) = &m.exact {
        P::Exact(e.clone())
    } else if let Some(p) = &m.prefix {
        P::Prefix(p.clone())
    } else if let Some(r) = &m.regex {
        P::SafeRegex(matcher::RegexMatcher {
            regex: r.clone(),
            ..Default::default()
        })
    } else {
        return None;
    };
    Some(matcher::StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    })
}

fn percent(p: Option<&super::Percent>, default: f64) -> types::FractionalPercent {
    let v = p.map(|p| p.value).unwrap_or(default).clamp(0.0, 100.0);
    types::FractionalPercent {
        numerator: (v * 10_000.0).round() as u32,
        denominator: types::fractional_percent::DenominatorType::Million as i32,
    }
}

/// gRPC status names as Istio accepts them.
fn grpc_code(v: &serde_yaml_ng::Value) -> Option<u32> {
    use mesh_core::config::GRPC_STATUS_NAMES as NAMES;
    match v {
        serde_yaml_ng::Value::Number(n) => n.as_u64().filter(|c| *c <= 16).map(|c| c as u32),
        serde_yaml_ng::Value::String(s) => NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(s))
            .map(|p| p as u32),
        _ => None,
    }
}

impl Ctx<'_> {
    fn duration(&mut self, origin: &super::Origin, path: &[Seg<'_>], s: &str) -> Option<Duration> {
        let d = parse_duration(s);
        if d.is_none() {
            self.errors.push(origin.at(
                path,
                format!("invalid duration {s:?} (use e.g. 500ms, 2s, 1m)"),
            ));
        }
        d
    }

    fn spiffe(&self, ns: &str, sa: &str) -> String {
        format!("spiffe://{}/ns/{ns}/sa/{sa}", self.opts.trust_domain)
    }

    /// Istio's generator for proxyless gRPC applies TLS only when the DestinationRule asks
    /// for it (`tls.mode: ISTIO_MUTUAL`): it cannot know whether a client or server uses xDS
    /// credentials, so there is no auto mTLS. `meshctl validate` warns when a STRICT server
    /// would then refuse such clients.
    fn mtls_on(&self, policy: &TrafficPolicy) -> bool {
        policy.tls.as_ref().and_then(|t| t.mode.as_deref()) == Some("ISTIO_MUTUAL")
    }

    fn cluster(
        &mut self,
        svc: &Service,
        name: &str,
        policy: &TrafficPolicy,
        workloads: &[&Workload],
        dr: Option<&Doc<super::DestinationRuleSpec>>,
    ) -> cpb::Cluster {
        let origin = dr.map(|d| d.origin.clone());
        let tp = [Seg::Key("spec"), Seg::Key("trafficPolicy")];
        let lb = policy.load_balancer.as_ref();
        let lb_policy = match (
            lb.and_then(|l| l.simple.as_deref()),
            lb.and_then(|l| l.consistent_hash.as_ref()),
        ) {
            (_, Some(_)) => cpb::cluster::LbPolicy::RingHash,
            // Without a choice, what Istio's generator for proxyless gRPC sends: gRPC clients
            // reject a Cluster whose legacy `lb_policy` is LEAST_REQUEST.
            (Some("ROUND_ROBIN") | None, _) => cpb::cluster::LbPolicy::RoundRobin,
            (Some("RANDOM"), _) => cpb::cluster::LbPolicy::Random,
            (Some("LEAST_REQUEST") | Some("LEAST_CONN"), _) => cpb::cluster::LbPolicy::LeastRequest,
            (Some(other), _) => {
                if let Some(o) = &origin {
                    self.errors.push(o.at(
                        &[tp[0], tp[1], Seg::Key("loadBalancer"), Seg::Key("simple")],
                        format!(
                            "DestinationRule {}: unsupported loadBalancer.simple {other:?}",
                            dr.map_or("", |d| d.meta.name.as_str())
                        ),
                    ));
                }
                cpb::cluster::LbPolicy::LeastRequest
            }
        };
        let lb_config = lb.and_then(slow_start).and_then(|ss| match lb_policy {
            cpb::cluster::LbPolicy::RoundRobin => Some(cpb::cluster::LbConfig::RoundRobinLbConfig(
                cpb::cluster::RoundRobinLbConfig {
                    slow_start_config: Some(ss),
                },
            )),
            cpb::cluster::LbPolicy::LeastRequest => Some(
                cpb::cluster::LbConfig::LeastRequestLbConfig(cpb::cluster::LeastRequestLbConfig {
                    slow_start_config: Some(ss),
                    ..Default::default()
                }),
            ),
            // Refused by `check_rule`.
            _ => None,
        });
        let pool = policy.connection_pool.as_ref();
        let max = u32::MAX;
        let thresholds = cpb::circuit_breakers::Thresholds {
            max_connections: u32v(
                pool.and_then(|p| p.tcp.as_ref())
                    .and_then(|t| t.max_connections)
                    .unwrap_or(max),
            ),
            max_pending_requests: u32v(
                pool.and_then(|p| p.http.as_ref())
                    .and_then(|h| h.http1_max_pending_requests)
                    .unwrap_or(max),
            ),
            max_requests: u32v(
                pool.and_then(|p| p.http.as_ref())
                    .and_then(|h| h.http2_max_requests)
                    .unwrap_or(max),
            ),
            max_retries: u32v(
                pool.and_then(|p| p.http.as_ref())
                    .and_then(|h| h.max_retries)
                    .unwrap_or(max),
            ),
            ..Default::default()
        };
        let connect_timeout = pool
            .and_then(|p| p.tcp.as_ref())
            .and_then(|t| t.connect_timeout.clone())
            .and_then(|s| {
                let o = origin.clone()?;
                self.duration(
                    &o,
                    &[
                        tp[0],
                        tp[1],
                        Seg::Key("connectionPool"),
                        Seg::Key("tcp"),
                        Seg::Key("connectTimeout"),
                    ],
                    &s,
                )
            })
            .unwrap_or(Duration::from_secs(10));
        let outlier = policy.outlier_detection.as_ref().map(|od| {
            let o = origin.clone();
            let mut d = |field: &'static str, v: &Option<String>| {
                v.as_ref().and_then(|s| {
                    let o = o.as_ref()?;
                    self.duration(
                        o,
                        &[tp[0], tp[1], Seg::Key("outlierDetection"), Seg::Key(field)],
                        s,
                    )
                })
            };
            cpb::OutlierDetection {
                consecutive_5xx: od.consecutive_5xx_errors.and_then(u32v),
                enforcing_consecutive_5xx: od.consecutive_5xx_errors.map(|_| 100).and_then(u32v),
                consecutive_gateway_failure: od.consecutive_gateway_errors.and_then(u32v),
                enforcing_consecutive_gateway_failure: od
                    .consecutive_gateway_errors
                    .map(|_| 100)
                    .and_then(u32v),
                interval: d("interval", &od.interval).map(pb_duration),
                base_ejection_time: d("baseEjectionTime", &od.base_ejection_time).map(pb_duration),
                max_ejection_percent: od.max_ejection_percent.and_then(u32v),
                // Istio turns the success-rate detector off.
                enforcing_success_rate: u32v(0),
                ..Default::default()
            }
        });
        let mut typed_extension_protocol_options = std::collections::HashMap::new();
        if svc.http2() {
            let opts = upstream_http::HttpProtocolOptions {
                upstream_protocol_options: Some(upstream_http::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                    upstream_http::http_protocol_options::ExplicitHttpConfig {
                        protocol_config: Some(
                            upstream_http::http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                                core::Http2ProtocolOptions::default(),
                            ),
                        ),
                    },
                )),
                ..Default::default()
            };
            typed_extension_protocol_options.insert(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_owned(),
                any(&opts),
            );
        }
        let external = policy
            .tls
            .as_ref()
            .filter(|t| matches!(t.mode.as_deref(), Some("SIMPLE" | "MUTUAL")));
        let transport_socket = if let Some(tls) = external {
            Some(self.external_tls(svc, tls))
        } else {
            self.mtls_on(policy).then(|| {
                let sans: BTreeSet<String> = workloads
                    .iter()
                    .map(|w| self.spiffe(&w.namespace, &w.service_account))
                    .collect();
                let ctx = tls::UpstreamTlsContext {
                    common_tls_context: Some(
                        self.common_tls(sans.iter().map(|s| exact(s)).collect(), svc.http2()),
                    ),
                    sni: name.replace('|', "_."),
                    ..Default::default()
                };
                core::TransportSocket {
                    name: "envoy.transport_sockets.tls".into(),
                    config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(&ctx))),
                }
            })
        };
        cpb::Cluster {
            name: name.to_owned(),
            cluster_discovery_type: Some(cpb::cluster::ClusterDiscoveryType::Type(
                cpb::cluster::DiscoveryType::Eds as i32,
            )),
            eds_cluster_config: Some(cpb::cluster::EdsClusterConfig {
                eds_config: Some(ads_source()),
                service_name: name.to_owned(),
            }),
            connect_timeout: Some(pb_duration(connect_timeout)),
            lb_policy: lb_policy as i32,
            lb_config,
            circuit_breakers: Some(cpb::CircuitBreakers {
                thresholds: vec![thresholds],
                ..Default::default()
            }),
            outlier_detection: outlier,
            typed_extension_protocol_options,
            transport_socket,
            ..Default::default()
        }
    }

    /// DestinationRule `tls.mode` SIMPLE or MUTUAL: TLS to a server outside the mesh's
    /// identity, with the files the rule names (read by the client, as Envoy reads them).
    /// Without `caCertificates`, the system's roots; without `sni`, the service host; without
    /// `subjectAltNames`, the certificate must be valid for the SNI.
    fn external_tls(&self, svc: &Service, t: &super::Tls) -> core::TransportSocket {
        let file = |path: &str| core::DataSource {
            specifier: Some(core::data_source::Specifier::Filename(path.to_owned())),
            ..Default::default()
        };
        let sans = t
            .subject_alt_names
            .iter()
            .map(|san| {
                let san_type = if san.contains("://") {
                    tls::subject_alt_name_matcher::SanType::Uri
                } else if san.parse::<std::net::IpAddr>().is_ok() {
                    tls::subject_alt_name_matcher::SanType::IpAddress
                } else {
                    tls::subject_alt_name_matcher::SanType::Dns
                };
                tls::SubjectAltNameMatcher {
                    san_type: san_type as i32,
                    matcher: Some(exact(san)),
                    oid: String::new(),
                }
            })
            .collect();
        let mut validation = tls::CertificateValidationContext {
            match_typed_subject_alt_names: sans,
            ..Default::default()
        };
        match (&t.ca_certificates, self.opts.flavour) {
            (Some(ca), _) => validation.trusted_ca = Some(file(ca)),
            // Envoy reads the system bundle as a file (Debian's path, as Istio's sidecars do).
            (None, Flavour::Envoy) => {
                validation.trusted_ca = Some(file("/etc/ssl/certs/ca-certificates.crt"));
            }
            (None, Flavour::ProxylessGrpc) => {
                validation.system_root_certs = Some(Default::default());
            }
        }
        let tls_certificates = match (&t.client_certificate, &t.private_key) {
            (Some(cert), Some(key)) => vec![tls::TlsCertificate {
                certificate_chain: Some(file(cert)),
                private_key: Some(file(key)),
                ..Default::default()
            }],
            _ => Vec::new(),
        };
        let alpn_protocols = if svc.http2() {
            vec!["h2".into()]
        } else {
            vec!["h2".into(), "http/1.1".into()]
        };
        let ctx = tls::UpstreamTlsContext {
            common_tls_context: Some(tls::CommonTlsContext {
                tls_certificates,
                validation_context_type: Some(
                    tls::common_tls_context::ValidationContextType::ValidationContext(validation),
                ),
                alpn_protocols,
                ..Default::default()
            }),
            sni: t.sni.clone().unwrap_or_else(|| svc.host.clone()),
            ..Default::default()
        };
        core::TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(&ctx))),
        }
    }

    fn common_tls(&self, sans: Vec<matcher::StringMatcher>, h2: bool) -> tls::CommonTlsContext {
        let instance = &self.opts.cert_provider_instance;
        let sans = sans
            .into_iter()
            .map(|m| tls::SubjectAltNameMatcher {
                san_type: tls::subject_alt_name_matcher::SanType::Uri as i32,
                matcher: Some(m),
                oid: String::new(),
            })
            .collect();
        let alpn_protocols = if h2 {
            vec!["h2".into()]
        } else {
            vec!["h2".into(), "http/1.1".into()]
        };
        match self.opts.flavour {
            Flavour::ProxylessGrpc => {
                let validation = tls::CertificateValidationContext {
                    ca_certificate_provider_instance: Some(
                        tls::CertificateProviderPluginInstance {
                            instance_name: instance.clone(),
                            certificate_name: "ROOTCA".into(),
                        },
                    ),
                    match_typed_subject_alt_names: sans,
                    ..Default::default()
                };
                tls::CommonTlsContext {
                    tls_certificate_provider_instance: Some(
                        tls::CertificateProviderPluginInstance {
                            instance_name: instance.clone(),
                            certificate_name: "default".into(),
                        },
                    ),
                    validation_context_type: Some(
                        tls::common_tls_context::ValidationContextType::ValidationContext(
                            validation,
                        ),
                    ),
                    alpn_protocols,
                    ..Default::default()
                }
            }
            Flavour::Envoy => {
                let sds = |name: &str| tls::SdsSecretConfig {
                    name: name.into(),
                    sds_config: Some(ads_source()),
                };
                tls::CommonTlsContext {
                    tls_certificate_sds_secret_configs: vec![sds("default")],
                    validation_context_type: Some(
                        tls::common_tls_context::ValidationContextType::CombinedValidationContext(
                            tls::common_tls_context::CombinedCertificateValidationContext {
                                default_validation_context: Some(
                                    tls::CertificateValidationContext {
                                        match_typed_subject_alt_names: sans,
                                        ..Default::default()
                                    },
                                ),
                                validation_context_sds_secret_config: Some(sds("ROOTCA")),
                                ..Default::default()
                            },
                        ),
                    ),
                    alpn_protocols,
                    ..Default::default()
                }
            }
        }
    }

    fn route_config(&mut self, svc: &Service, name: &str) -> rpb::RouteConfiguration {
        // Domains: the host, its short forms in its namespace, each with and without port.
        let mut domains = vec![svc.host.clone()];
        let suffix = format!(".{}.svc.cluster.local", svc.namespace);
        if let Some(short) = svc.host.strip_suffix(&suffix) {
            domains.push(short.to_owned());
            domains.push(format!("{short}.{}", svc.namespace));
            domains.push(format!("{short}.{}.svc", svc.namespace));
        }
        let with_port: Vec<String> = domains
            .iter()
            .map(|d| format!("{d}:{}", svc.port))
            .collect();
        domains.extend(with_port);

        let config = self.config;
        let services = self.services.clone();
        let vs = config.virtual_services.iter().find(|vs| {
            vs.spec
                .hosts
                .iter()
                .any(|h| resolve_host(&services, h, vs.meta.ns()) == Some(svc.host.as_str()))
        });
        let mut routes = Vec::new();
        match vs {
            Some(vs) => {
                for (i, http) in vs.spec.http.iter().enumerate() {
                    routes.extend(self.routes_for(svc, vs, i, http));
                }
            }
            None => routes.push(rpb::Route {
                name: "default".into(),
                r#match: Some(prefix_match("/")),
                action: Some(rpb::route::Action::Route(rpb::RouteAction {
                    cluster_specifier: Some(rpb::route_action::ClusterSpecifier::Cluster(
                        cluster_name(svc.port, "", &svc.host),
                    )),
                    timeout: Some(pb_duration(Duration::ZERO)),
                    retry_policy: Some(default_retry()),
                    ..Default::default()
                })),
                ..Default::default()
            }),
        }
        rpb::RouteConfiguration {
            name: name.to_owned(),
            virtual_hosts: vec![rpb::VirtualHost {
                name: name.to_owned(),
                domains,
                routes,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn routes_for(
        &mut self,
        svc: &Service,
        vs: &Doc<super::VirtualServiceSpec>,
        i: usize,
        http: &HttpRoute,
    ) -> Vec<rpb::Route> {
        let path = |extra: &[Seg<'static>]| {
            let mut p = vec![Seg::Key("spec"), Seg::Key("http"), Seg::Idx(i)];
            p.extend_from_slice(extra);
            p
        };
        let origin = vs.origin.clone();
        let mut weighted = Vec::new();
        let mut first_dest = None;
        for (j, rd) in http.route.iter().enumerate() {
            let Some(cluster) = self.destination_cluster(
                &rd.destination,
                svc,
                vs,
                &path(&[Seg::Key("route"), Seg::Idx(j), Seg::Key("destination")]),
            ) else {
                continue;
            };
            if first_dest.is_none() {
                first_dest = Some(rd.destination.clone());
            }
            let weight = rd
                .weight
                .unwrap_or(if http.route.len() == 1 { 100 } else { 0 });
            weighted.push((cluster, weight));
        }
        if http.route.is_empty() {
            self.errors.push(origin.at(
                &path(&[]),
                format!("VirtualService {}: http[{i}] has no route", vs.meta.name),
            ));
        }
        if weighted.is_empty() {
            return Vec::new();
        }
        if weighted.iter().all(|(_, w)| *w == 0) {
            self.errors.push(origin.at(
                &path(&[Seg::Key("route")]),
                format!(
                    "VirtualService {}: http[{i}].route: the weights add up to 0",
                    vs.meta.name
                ),
            ));
            return Vec::new();
        }
        let cluster_specifier = if weighted.len() == 1 {
            rpb::route_action::ClusterSpecifier::Cluster(weighted[0].0.clone())
        } else {
            rpb::route_action::ClusterSpecifier::WeightedClusters(rpb::WeightedCluster {
                clusters: weighted
                    .iter()
                    .map(|(name, w)| rpb::weighted_cluster::ClusterWeight {
                        name: name.clone(),
                        weight: u32v(*w),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        };
        let timeout = http
            .timeout
            .as_ref()
            .and_then(|t| self.duration(&origin, &path(&[Seg::Key("timeout")]), t))
            .unwrap_or(Duration::ZERO);
        let retry_policy = match &http.retries {
            None => Some(default_retry()),
            Some(r) if r.attempts == 0 => None,
            Some(r) => Some(rpb::RetryPolicy {
                retry_on: r
                    .retry_on
                    .clone()
                    .unwrap_or_else(|| DEFAULT_RETRY_ON.into()),
                num_retries: u32v(r.attempts),
                per_try_timeout: r
                    .per_try_timeout
                    .as_ref()
                    .and_then(|t| {
                        self.duration(
                            &origin,
                            &path(&[Seg::Key("retries"), Seg::Key("perTryTimeout")]),
                            t,
                        )
                    })
                    .map(pb_duration),
                retriable_status_codes: vec![503],
                retry_host_predicate: vec![previous_hosts()],
                host_selection_retry_max_attempts: 5,
                ..Default::default()
            }),
        };
        let mirrors = match &http.mirror {
            None => Vec::new(),
            Some(m) => self
                .destination_cluster(m, svc, vs, &path(&[Seg::Key("mirror")]))
                .map(|cluster| rpb::route_action::RequestMirrorPolicy {
                    cluster,
                    runtime_fraction: Some(core::RuntimeFractionalPercent {
                        default_value: Some(percent(http.mirror_percentage.as_ref(), 100.0)),
                        runtime_key: String::new(),
                    }),
                    ..Default::default()
                })
                .into_iter()
                .collect(),
        };
        let hash_policy = first_dest
            .and_then(|d| {
                let services = self.services.clone();
                let host = resolve_host(&services, &d.host, vs.meta.ns())?.to_owned();
                let dr = destination_rule(self.config, &services, &host)?;
                // The port `destination_cluster` picks (it reports the bad cases).
                let ports: Vec<u32> = services
                    .iter()
                    .filter(|s| s.host == host)
                    .map(|s| s.port)
                    .collect();
                let port = d
                    .port
                    .as_ref()
                    .map(|p| p.number)
                    .unwrap_or(match ports[..] {
                        [only] => only,
                        _ => svc.port,
                    });
                let subset_policy = d
                    .subset
                    .as_ref()
                    .and_then(|s| dr.spec.subsets.iter().find(|x| &x.name == s))
                    .and_then(|s| s.traffic_policy.as_ref());
                merged_policy(dr.spec.traffic_policy.as_ref(), subset_policy, port)
                    .load_balancer
                    .and_then(|lb| lb.consistent_hash)
            })
            .map(|ch| {
                use rpb::route_action::hash_policy::{
                    ConnectionProperties, Cookie, Header, PolicySpecifier, QueryParameter,
                };
                let spec = if let Some(h) = ch.http_header_name {
                    PolicySpecifier::Header(Header {
                        header_name: h,
                        regex_rewrite: None,
                    })
                } else if let Some(c) = ch.http_cookie {
                    PolicySpecifier::Cookie(Cookie {
                        name: c.name,
                        ..Default::default()
                    })
                } else if let Some(q) = ch.http_query_parameter_name {
                    PolicySpecifier::QueryParameter(QueryParameter { name: q })
                } else {
                    PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true })
                };
                vec![rpb::route_action::HashPolicy {
                    terminal: false,
                    policy_specifier: Some(spec),
                }]
            })
            .unwrap_or_default();
        let action = rpb::RouteAction {
            cluster_specifier: Some(cluster_specifier),
            timeout: Some(pb_duration(timeout)),
            retry_policy,
            request_mirror_policies: mirrors,
            hash_policy,
            prefix_rewrite: http
                .rewrite
                .as_ref()
                .and_then(|r| r.uri.clone())
                .unwrap_or_default(),
            host_rewrite_specifier: http
                .rewrite
                .as_ref()
                .and_then(|r| r.authority.clone())
                .map(rpb::route_action::HostRewriteSpecifier::HostRewriteLiteral),
            ..Default::default()
        };
        let mut typed_per_filter_config = std::collections::HashMap::new();
        if let Some(f) = &http.fault {
            if let Some(cfg) = self.fault(f, &origin, &path(&[Seg::Key("fault")])) {
                typed_per_filter_config.insert("envoy.filters.http.fault".to_owned(), any(&cfg));
            }
        }
        let headers = http.headers.as_ref();
        let (req_add, req_remove) = header_ops(headers.and_then(|h| h.request.as_ref()));
        let (resp_add, resp_remove) = header_ops(headers.and_then(|h| h.response.as_ref()));
        let matches: Vec<rpb::RouteMatch> = if http.matches.is_empty() {
            vec![prefix_match("/")]
        } else {
            http.matches.iter().map(route_match).collect()
        };
        let base = http
            .name
            .clone()
            .unwrap_or_else(|| format!("{}.{}", vs.meta.name, i));
        matches
            .into_iter()
            .map(|m| rpb::Route {
                name: base.clone(),
                r#match: Some(m),
                action: Some(rpb::route::Action::Route(action.clone())),
                typed_per_filter_config: typed_per_filter_config.clone(),
                request_headers_to_add: req_add.clone(),
                request_headers_to_remove: req_remove.clone(),
                response_headers_to_add: resp_add.clone(),
                response_headers_to_remove: resp_remove.clone(),
                ..Default::default()
            })
            .collect()
    }

    fn fault(
        &mut self,
        f: &super::Fault,
        origin: &super::Origin,
        path: &[Seg<'_>],
    ) -> Option<fault::HttpFault> {
        let mut out = fault::HttpFault::default();
        if let Some(d) = &f.delay {
            let mut p = path.to_vec();
            p.extend([Seg::Key("delay"), Seg::Key("fixedDelay")]);
            let dur = self.duration(origin, &p, &d.fixed_delay)?;
            out.delay = Some(common_fault::FaultDelay {
                percentage: Some(percent(d.percentage.as_ref(), 100.0)),
                fault_delay_secifier: Some(
                    common_fault::fault_delay::FaultDelaySecifier::FixedDelay(pb_duration(dur)),
                ),
            });
        }
        if let Some(a) = &f.abort {
            let mut p = path.to_vec();
            p.push(Seg::Key("abort"));
            let error_type = if let Some(s) = a.http_status {
                fault::fault_abort::ErrorType::HttpStatus(s)
            } else if let Some(g) = &a.grpc_status {
                match grpc_code(g) {
                    Some(c) => fault::fault_abort::ErrorType::GrpcStatus(c),
                    None => {
                        self.errors
                            .push(origin.at(&p, format!("unknown gRPC status {g:?}")));
                        return None;
                    }
                }
            } else {
                self.errors
                    .push(origin.at(&p, "abort needs httpStatus or grpcStatus"));
                return None;
            };
            out.abort = Some(fault::FaultAbort {
                percentage: Some(percent(a.percentage.as_ref(), 100.0)),
                error_type: Some(error_type),
                ..Default::default()
            });
        }
        Some(out)
    }

    /// The cluster of a destination, or an error naming what is unknown.
    fn destination_cluster(
        &mut self,
        d: &super::Destination,
        svc: &Service,
        vs: &Doc<super::VirtualServiceSpec>,
        path: &[Seg<'_>],
    ) -> Option<String> {
        let services = self.services.clone();
        let Some(host) = resolve_host(&services, &d.host, vs.meta.ns()) else {
            self.errors.push(vs.origin.at(
                path,
                format!("VirtualService {}: destination host {:?} is not a known service (add a ServiceEntry)", vs.meta.name, d.host),
            ));
            return None;
        };
        let ports: Vec<u32> = services
            .iter()
            .filter(|s| s.host == host)
            .map(|s| s.port)
            .collect();
        let port = match d.port.as_ref().map(|p| p.number) {
            Some(p) if ports.contains(&p) => p,
            Some(p) => {
                self.errors.push(vs.origin.at(
                    path,
                    format!("VirtualService {}: {host} has no port {p}", vs.meta.name),
                ));
                return None;
            }
            None if ports.len() == 1 => ports[0],
            None if ports.contains(&svc.port) => svc.port,
            None => {
                self.errors.push(vs.origin.at(
                    path,
                    format!(
                        "VirtualService {}: {host} has several ports; set destination.port",
                        vs.meta.name
                    ),
                ));
                return None;
            }
        };
        let subset = d.subset.clone().unwrap_or_default();
        if !subset.is_empty() {
            let known = destination_rule(self.config, &services, host)
                .is_some_and(|dr| dr.spec.subsets.iter().any(|s| s.name == subset));
            if !known {
                self.errors.push(vs.origin.at(
                    path,
                    format!("VirtualService {}: subset {subset:?} of {host} is not defined by any DestinationRule", vs.meta.name),
                ));
                return None;
            }
        }
        Some(cluster_name(port, &subset, host))
    }

    fn server_listener(&mut self, name: &str, port: u32, svcs: &[&Service]) -> lpb::Listener {
        let workloads: Vec<&Workload> = svcs
            .iter()
            .flat_map(|s| s.workloads.iter())
            .filter(|w| w.port == port)
            .collect();
        let (ns, labels) = workloads
            .first()
            .map(|w| (w.namespace.clone(), w.labels.clone()))
            .unwrap_or_else(|| ("default".into(), BTreeMap::new()));
        let mode = peer_mode(self.config, &ns, &labels);
        let h2 = svcs.iter().any(|s| s.http2());
        let mut http_filters = Vec::new();
        for (action, filter_name) in [
            ("DENY", "envoy.filters.http.rbac.deny"),
            ("ALLOW", "envoy.filters.http.rbac.allow"),
        ] {
            if let Some(r) = self.rbac(action, &ns, &labels) {
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
        let manager = hcm::HttpConnectionManager {
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
        };
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

    /// Istio's compilation of AuthorizationPolicies with `action` for a workload.
    fn rbac(
        &mut self,
        action: &str,
        ns: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<rbac::Rbac> {
        let config = self.config;
        let applies = |ap: &&Doc<super::AuthorizationPolicySpec>| {
            ap.spec.action.as_deref().unwrap_or("ALLOW") == action
                && (ap.meta.ns() == ns || ap.meta.ns() == "istio-system")
                && ap
                    .spec
                    .selector
                    .as_ref()
                    .is_none_or(|s| s.labels().iter().all(|(k, v)| labels.get(k) == Some(v)))
        };
        let policies: Vec<&Doc<super::AuthorizationPolicySpec>> = config
            .authorization_policies
            .iter()
            .filter(applies)
            .collect();
        if policies.is_empty() {
            return None;
        }
        let mut out = std::collections::HashMap::new();
        for ap in policies {
            for (i, rule) in ap.spec.rules.iter().enumerate() {
                let principals = if rule.from.is_empty() {
                    vec![any_principal()]
                } else {
                    vec![or_ids(
                        rule.from.iter().map(|f| self.source(&f.source)).collect(),
                    )]
                };
                let permissions = if rule.to.is_empty() {
                    vec![any_permission()]
                } else {
                    vec![or_rules(
                        rule.to.iter().map(|t| operation(&t.operation)).collect(),
                    )]
                };
                out.insert(
                    format!("ns[{}]-policy[{}]-rule[{i}]", ap.meta.ns(), ap.meta.name),
                    rbac::Policy {
                        permissions,
                        principals,
                        ..Default::default()
                    },
                );
            }
        }
        Some(rbac::Rbac {
            action: if action == "DENY" {
                rbac::rbac::Action::Deny
            } else {
                rbac::rbac::Action::Allow
            } as i32,
            policies: out,
            ..Default::default()
        })
    }

    fn source(&self, s: &super::Source) -> rbac::Principal {
        let mut ands = Vec::new();
        if !s.principals.is_empty() {
            ands.push(or_ids(
                s.principals
                    .iter()
                    .map(|p| {
                        if p == "*" {
                            return authenticated(None);
                        }
                        authenticated(Some(istio_string(&format!("spiffe://{p}"))))
                    })
                    .collect(),
            ));
        }
        if !s.namespaces.is_empty() {
            ands.push(or_ids(
                s.namespaces
                    .iter()
                    .map(|n| {
                        authenticated(Some(matcher::StringMatcher {
                            match_pattern: Some(matcher::string_matcher::MatchPattern::SafeRegex(
                                matcher::RegexMatcher {
                                    regex: format!("spiffe://[^/]+/ns/{}/.*", regex_escape(n)),
                                    ..Default::default()
                                },
                            )),
                            ..Default::default()
                        }))
                    })
                    .collect(),
            ));
        }
        match ands.len() {
            0 => any_principal(),
            1 => ands.pop().expect("one element"),
            _ => rbac::Principal {
                identifier: Some(rbac::principal::Identifier::AndIds(rbac::principal::Set {
                    ids: ands,
                })),
            },
        }
    }
}

const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

fn previous_hosts() -> rpb::retry_policy::RetryHostPredicate {
    rpb::retry_policy::RetryHostPredicate {
        name: "envoy.retry_host_predicates.previous_hosts".into(),
        config_type: Some(rpb::retry_policy::retry_host_predicate::ConfigType::TypedConfig(Any {
            type_url: "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate".into(),
            value: Vec::new(),
        })),
    }
}

/// Istio's default retry policy: 2 attempts on connection failures and 503.
fn default_retry() -> rpb::RetryPolicy {
    rpb::RetryPolicy {
        retry_on: DEFAULT_RETRY_ON.into(),
        num_retries: u32v(2),
        retriable_status_codes: vec![503],
        retry_host_predicate: vec![previous_hosts()],
        host_selection_retry_max_attempts: 5,
        ..Default::default()
    }
}

fn prefix_match(p: &str) -> rpb::RouteMatch {
    rpb::RouteMatch {
        path_specifier: Some(rpb::route_match::PathSpecifier::Prefix(p.into())),
        ..Default::default()
    }
}

fn route_match(m: &super::HttpMatch) -> rpb::RouteMatch {
    use rpb::route_match::PathSpecifier as P;
    let path = match &m.uri {
        Some(StringMatch { exact: Some(e), .. }) => P::Path(e.clone()),
        Some(StringMatch {
            prefix: Some(p), ..
        }) => P::Prefix(p.clone()),
        Some(StringMatch { regex: Some(r), .. }) => P::SafeRegex(matcher::RegexMatcher {
            regex: r.clone(),
            ..Default::default()
        }),
        _ => P::Prefix("/".into()),
    };
    let mut headers: Vec<rpb::HeaderMatcher> = m
        .headers
        .iter()
        .filter_map(|(name, sm)| {
            Some(rpb::HeaderMatcher {
                name: name.to_ascii_lowercase(),
                header_match_specifier: Some(
                    rpb::header_matcher::HeaderMatchSpecifier::StringMatch(string_match(sm)?),
                ),
                ..Default::default()
            })
        })
        .collect();
    if let Some(method) = m.method.as_ref().and_then(string_match) {
        headers.push(rpb::HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(rpb::header_matcher::HeaderMatchSpecifier::StringMatch(
                method,
            )),
            ..Default::default()
        });
    }
    rpb::RouteMatch {
        path_specifier: Some(path),
        case_sensitive: m.ignore_uri_case.then_some(BoolValue { value: false }),
        headers,
        query_parameters: m
            .query_params
            .iter()
            .filter_map(|(name, sm)| {
                Some(rpb::QueryParameterMatcher {
                    name: name.clone(),
                    query_parameter_match_specifier: Some(
                        rpb::query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                            string_match(sm)?,
                        ),
                    ),
                })
            })
            .collect(),
        ..Default::default()
    }
}

fn header_ops(ops: Option<&super::HeaderOps>) -> (Vec<core::HeaderValueOption>, Vec<String>) {
    let Some(ops) = ops else {
        return (Vec::new(), Vec::new());
    };
    let opt = |k: &String, v: &String, action: core::header_value_option::HeaderAppendAction| {
        core::HeaderValueOption {
            header: Some(core::HeaderValue {
                key: k.clone(),
                value: v.clone(),
                raw_value: Vec::new(),
            }),
            append_action: action as i32,
            ..Default::default()
        }
    };
    use core::header_value_option::HeaderAppendAction as A;
    let mut add: Vec<core::HeaderValueOption> = ops
        .set
        .iter()
        .map(|(k, v)| opt(k, v, A::OverwriteIfExistsOrAdd))
        .collect();
    add.extend(
        ops.add
            .iter()
            .map(|(k, v)| opt(k, v, A::AppendIfExistsOrAdd)),
    );
    (add, ops.remove.clone())
}

fn any_principal() -> rbac::Principal {
    rbac::Principal {
        identifier: Some(rbac::principal::Identifier::Any(true)),
    }
}

fn any_permission() -> rbac::Permission {
    rbac::Permission {
        rule: Some(rbac::permission::Rule::Any(true)),
    }
}

fn authenticated(m: Option<matcher::StringMatcher>) -> rbac::Principal {
    rbac::Principal {
        identifier: Some(rbac::principal::Identifier::Authenticated(
            rbac::principal::Authenticated { principal_name: m },
        )),
    }
}

fn or_ids(ids: Vec<rbac::Principal>) -> rbac::Principal {
    rbac::Principal {
        identifier: Some(rbac::principal::Identifier::OrIds(rbac::principal::Set {
            ids,
        })),
    }
}

fn or_rules(rules: Vec<rbac::Permission>) -> rbac::Permission {
    rbac::Permission {
        rule: Some(rbac::permission::Rule::OrRules(rbac::permission::Set {
            rules,
        })),
    }
}

fn and_rules(rules: Vec<rbac::Permission>) -> rbac::Permission {
    rbac::Permission {
        rule: Some(rbac::permission::Rule::AndRules(rbac::permission::Set {
            rules,
        })),
    }
}

/// Istio's string forms: `*` any, `x*` prefix, `*x` suffix, else exact.
fn istio_string(s: &str) -> matcher::StringMatcher {
    use matcher::string_matcher::MatchPattern as P;
    let pattern = if s == "*" {
        P::SafeRegex(matcher::RegexMatcher {
            regex: ".*".into(),
            ..Default::default()
        })
    } else if let Some(p) = s.strip_suffix('*') {
        P::Prefix(p.into())
    } else if let Some(p) = s.strip_prefix('*') {
        P::Suffix(p.into())
    } else {
        P::Exact(s.into())
    };
    matcher::StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    }
}

fn operation(op: &super::Operation) -> rbac::Permission {
    let mut ands = Vec::new();
    if !op.paths.is_empty() {
        ands.push(or_rules(
            op.paths
                .iter()
                .map(|p| rbac::Permission {
                    rule: Some(rbac::permission::Rule::UrlPath(matcher::PathMatcher {
                        rule: Some(matcher::path_matcher::Rule::Path(istio_string(p))),
                    })),
                })
                .collect(),
        ));
    }
    if !op.methods.is_empty() {
        ands.push(or_rules(
            op.methods
                .iter()
                .map(|m| rbac::Permission {
                    rule: Some(rbac::permission::Rule::Header(rpb::HeaderMatcher {
                        name: ":method".into(),
                        header_match_specifier: Some(
                            rpb::header_matcher::HeaderMatchSpecifier::StringMatch(exact(m)),
                        ),
                        ..Default::default()
                    })),
                })
                .collect(),
        ));
    }
    match ands.len() {
        0 => any_permission(),
        1 => ands.pop().expect("one element"),
        _ => and_rules(ands),
    }
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
