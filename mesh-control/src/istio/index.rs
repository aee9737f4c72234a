//! The services, workloads and policies of an Istio configuration, indexed for generation and validation.

use crate::istio::{
    Config, ConfigError, Doc, Seg, ServiceEntrySpec, TrafficPolicy, WorkloadEntrySpec,
};
use std::collections::BTreeMap;

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
    pub(crate) fn http2(&self) -> bool {
        matches!(
            self.protocol.to_ascii_uppercase().as_str(),
            "HTTP2" | "GRPC" | "GRPC-WEB"
        )
    }
}

/// The name Istio gives a service's cluster: `outbound|PORT|SUBSET|HOST` (empty subset for
/// the whole service).
pub(crate) fn cluster_name(port: u32, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// The services of a configuration, with their workloads.
fn services(config: &Config, errors: &mut Vec<ConfigError>) -> Vec<Service> {
    let mut out = Vec::new();
    for se in &config.service_entries {
        let ns = se.meta.ns();
        let dns = resolution(se, errors);
        let mut entries = endpoints(config, se);
        // A DNS service without endpoints resolves its hosts (Istio's rule).
        let hosts_as_endpoints: Vec<WorkloadEntrySpec> = if dns.is_some() && entries.is_empty() {
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
        entries.extend(hosts_as_endpoints.iter().map(|e| Endpoint {
            spec: e,
            path: vec![Seg::Key("spec"), Seg::Key("hosts")],
            origin: &se.origin,
        }));
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
            let workloads = port_workloads(&entries, port, ns, dns.is_none(), errors);
            for host in &se.spec.hosts {
                out.push(Service {
                    host: host.clone(),
                    namespace: ns.to_owned(),
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

/// A ServiceEntry's `resolution`: `None` for STATIC and NONE, `Some(false)` for DNS,
/// `Some(true)` for DNS_ROUND_ROBIN; others are errors.
fn resolution(se: &Doc<ServiceEntrySpec>, errors: &mut Vec<ConfigError>) -> Option<bool> {
    match se.spec.resolution.as_deref() {
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
    }
}

/// An endpoint of a ServiceEntry, with where it was written.
struct Endpoint<'a> {
    spec: &'a WorkloadEntrySpec,
    path: Vec<Seg<'static>>,
    origin: &'a crate::istio::Origin,
}

/// A ServiceEntry's endpoints: inline ones plus the WorkloadEntries its selector chooses.
fn endpoints<'a>(config: &'a Config, se: &'a Doc<ServiceEntrySpec>) -> Vec<Endpoint<'a>> {
    let mut entries: Vec<Endpoint<'a>> = se
        .spec
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| Endpoint {
            spec: e,
            path: vec![Seg::Key("spec"), Seg::Key("endpoints"), Seg::Idx(i)],
            origin: &se.origin,
        })
        .collect();
    if let Some(sel) = &se.spec.workload_selector {
        for we in &config.workload_entries {
            if we.meta.ns() == se.meta.ns()
                && sel
                    .labels()
                    .iter()
                    .all(|(k, v)| we.spec.labels.get(k) == Some(v))
            {
                entries.push(Endpoint {
                    spec: &we.spec,
                    path: vec![Seg::Key("spec"), Seg::Key("address")],
                    origin: &we.origin,
                });
            }
        }
    }
    entries
}

/// The workloads serving one port of a ServiceEntry; with `static_ips`, an endpoint address
/// that is not an IP is an error.
fn port_workloads(
    entries: &[Endpoint<'_>],
    port: &crate::istio::ServicePort,
    ns: &str,
    static_ips: bool,
    errors: &mut Vec<ConfigError>,
) -> Vec<Workload> {
    let mut workloads = Vec::new();
    for Endpoint {
        spec: e,
        path,
        origin,
    } in entries
    {
        if static_ips && e.address.parse::<std::net::IpAddr>().is_err() {
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
            namespace: ns.to_owned(),
            service_account: e
                .service_account
                .clone()
                .unwrap_or_else(|| "default".into()),
        });
    }
    workloads
}

/// A configuration with its services resolved: what generation and validation both read.
/// Built once; generation and `meshctl validate` borrow it.
pub(crate) struct Index<'a> {
    /// The configuration as parsed.
    pub(crate) config: &'a Config,
    /// Every `HOST:PORT` of the ServiceEntries, with its workloads.
    pub(crate) services: Vec<Service>,
}

impl<'a> Index<'a> {
    /// Indexes `config`; problems found on the way (a WorkloadEntry no service selects, ...)
    /// go to `errors`.
    pub(crate) fn new(config: &'a Config, errors: &mut Vec<ConfigError>) -> Self {
        Self {
            config,
            services: services(config, errors),
        }
    }

    /// Resolves a host as written in a rule (FQDN or short name in the rule's namespace) to
    /// the service host it names.
    pub(crate) fn resolve_host(&self, host: &str, ns: &str) -> Option<&str> {
        let candidates = [
            host.to_owned(),
            format!("{host}.{ns}.svc.cluster.local"),
            format!("{host}.svc.cluster.local"),
            format!("{host}.cluster.local"),
        ];
        candidates.iter().find_map(|c| {
            self.services
                .iter()
                .find(|s| &s.host == c)
                .map(|s| s.host.as_str())
        })
    }

    /// The DestinationRule that applies to a service host.
    pub(crate) fn destination_rule(
        &self,
        host: &str,
    ) -> Option<&'a Doc<crate::istio::DestinationRuleSpec>> {
        self.config
            .destination_rules
            .iter()
            .find(|dr| self.resolve_host(&dr.spec.host, dr.meta.ns()) == Some(host))
    }

    /// The ports of a service host.
    pub(crate) fn ports(&self, host: &str) -> Vec<u32> {
        self.services
            .iter()
            .filter(|s| s.host == host)
            .map(|s| s.port)
            .collect()
    }

    /// The PeerAuthentication mode for a workload (see [`peer_mode`]).
    pub(crate) fn peer_mode(&self, ns: &str, labels: &BTreeMap<String, String>) -> String {
        peer_mode(self.config, ns, labels)
    }
}

/// A policy as it applies to one service port: the `portLevelSettings` entry for the port
/// replaces the policy's sections that it sets (Istio's `getPortLevelTrafficPolicy`).
pub(crate) fn at_port(policy: &TrafficPolicy, port: u32) -> TrafficPolicy {
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

/// The PeerAuthentication mode for a workload: selector match in its namespace, then
/// namespace-wide, then mesh-wide (`istio-system`), else PERMISSIVE (Istio's default).
fn peer_mode(config: &Config, ns: &str, labels: &BTreeMap<String, String>) -> String {
    let mode = |pa: &Doc<crate::istio::PeerAuthenticationSpec>| {
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
