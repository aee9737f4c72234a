//! `meshctl validate`: the checks of `istioctl analyze` that matter to the mesh.

use std::collections::BTreeMap;

use super::index::Index;
use super::{generate, Config, ConfigError, HttpMatch, Options, Seg};

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The configuration works but is probably not what was meant.
    Warning,
    /// The configuration cannot be served as written.
    Error,
}

/// One finding, at `file:line`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// Where and what.
    pub error: ConfigError,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}: {level}: {}",
            self.error.file, self.error.line, self.error.message
        )
    }
}

/// Everything wrong with `config`, errors first, each once.
pub fn validate(config: &Config, opts: &Options) -> Vec<Finding> {
    let mut out = Findings(Vec::new());
    // Everything generation rejects (unknown hosts and subsets, bad durations...).
    if let Err(errors) = generate(config, opts) {
        errors.into_iter().for_each(|e| out.error(e));
    }
    let mut scratch = Vec::new();
    let index = Index::new(config, &mut scratch);
    route_rules(config, &mut out);
    host_conflicts(&index, &mut out);
    destination_rules(&index, &mut out);
    hosts_without_endpoints(&index, &mut out);
    tls_conflicts(&index, &mut out);
    proxyless_limits(config, &mut out);
    modes_and_actions(config, &mut out);
    let mut out = out.0;
    out.sort_by(|a, b| {
        (b.severity, &a.error.file, a.error.line, &a.error.message).cmp(&(
            a.severity,
            &b.error.file,
            b.error.line,
            &b.error.message,
        ))
    });
    out.dedup();
    out
}

/// The findings of the checks, in the order found.
struct Findings(Vec<Finding>);

impl Findings {
    fn error(&mut self, error: ConfigError) {
        self.0.push(Finding {
            severity: Severity::Error,
            error,
        });
    }

    fn warning(&mut self, error: ConfigError) {
        self.0.push(Finding {
            severity: Severity::Warning,
            error,
        });
    }
}

/// VirtualService routes: weights that add up to 100, rules that an earlier rule shadows.
fn route_rules(config: &Config, out: &mut Findings) {
    for vs in &config.virtual_services {
        let name = &vs.meta.name;
        for (i, http) in vs.spec.http.iter().enumerate() {
            let route_path = [
                Seg::Key("spec"),
                Seg::Key("http"),
                Seg::Idx(i),
                Seg::Key("route"),
            ];
            if http.route.len() > 1 || http.route.iter().any(|r| r.weight.is_some()) {
                let total: u32 = http.route.iter().map(|r| r.weight.unwrap_or(0)).sum();
                if total != 100 {
                    out.error(vs.origin.at(
                    &route_path,
                    format!("VirtualService {name}: http[{i}] route weights add up to {total}, not 100"),
                ));
                }
            }
            // Shadowing: an earlier rule that matches everything this one matches.
            for (j, earlier) in vs.spec.http[..i].iter().enumerate() {
                if covers(&earlier.matches, &http.matches) {
                    out.warning(vs.origin.at(
                    &[Seg::Key("spec"), Seg::Key("http"), Seg::Idx(i)],
                    format!("VirtualService {name}: http[{i}] is never used: http[{j}] matches every request it matches"),
                ));
                    break;
                }
            }
        }
    }
}

/// Two VirtualServices for one host conflict.
fn host_conflicts(index: &Index<'_>, out: &mut Findings) {
    let config = index.config;
    let mut vs_by_host: BTreeMap<String, &str> = BTreeMap::new();
    for vs in &config.virtual_services {
        for (h, host) in vs.spec.hosts.iter().enumerate() {
            let resolved = index
                .resolve_host(host, vs.meta.ns())
                .unwrap_or(host)
                .to_owned();
            if let Some(first) = vs_by_host.insert(resolved.clone(), &vs.meta.name) {
                out.error(vs.origin.at(
                &[Seg::Key("spec"), Seg::Key("hosts"), Seg::Idx(h)],
                format!("VirtualService {}: host {resolved} is already routed by VirtualService {first}", vs.meta.name),
            ));
            }
        }
    }
}

/// DestinationRules: one per host, a known host, subsets defined once that select endpoints.
fn destination_rules(index: &Index<'_>, out: &mut Findings) {
    let config = index.config;
    let mut dr_by_host: BTreeMap<String, &str> = BTreeMap::new();
    for dr in &config.destination_rules {
        let resolved = index
            .resolve_host(&dr.spec.host, dr.meta.ns())
            .unwrap_or(&dr.spec.host)
            .to_owned();
        if let Some(first) = dr_by_host.insert(resolved.clone(), &dr.meta.name) {
            out.error(dr.origin.at(
                &[Seg::Key("spec"), Seg::Key("host")],
                format!(
                    "DestinationRule {}: host {resolved} already has DestinationRule {first}",
                    dr.meta.name
                ),
            ));
        }
        if index.resolve_host(&dr.spec.host, dr.meta.ns()).is_none() {
            out.warning(dr.origin.at(
                &[Seg::Key("spec"), Seg::Key("host")],
                format!(
                    "DestinationRule {}: host {:?} is not a known service",
                    dr.meta.name, dr.spec.host
                ),
            ));
        }
        let mut names = BTreeMap::new();
        for (s, subset) in dr.spec.subsets.iter().enumerate() {
            let path = [Seg::Key("spec"), Seg::Key("subsets"), Seg::Idx(s)];
            if names.insert(subset.name.clone(), s).is_some() {
                out.error(dr.origin.at(
                    &path,
                    format!(
                        "DestinationRule {}: subset {:?} is defined twice",
                        dr.meta.name, subset.name
                    ),
                ));
            }
            let host = index.resolve_host(&dr.spec.host, dr.meta.ns());
            let has_endpoints = index
                .services
                .iter()
                .filter(|svc| Some(svc.host.as_str()) == host)
                .any(|svc| {
                    svc.workloads.iter().any(|w| {
                        subset
                            .labels
                            .iter()
                            .all(|(k, v)| w.labels.get(k) == Some(v))
                    })
                });
            if host.is_some() && !has_endpoints {
                out.warning(dr.origin.at(
                    &path,
                    format!(
                        "DestinationRule {}: subset {:?} selects no endpoints",
                        dr.meta.name, subset.name
                    ),
                ));
            }
        }
    }
}

/// ServiceEntry hosts without endpoints.
fn hosts_without_endpoints(index: &Index<'_>, out: &mut Findings) {
    let config = index.config;
    for se in &config.service_entries {
        let host_has = |h: &str| {
            index
                .services
                .iter()
                .any(|s| s.host == h && !s.workloads.is_empty())
        };
        for (i, h) in se.spec.hosts.iter().enumerate() {
            if !host_has(h) {
                out.warning(se.origin.at(
                    &[Seg::Key("spec"), Seg::Key("hosts"), Seg::Idx(i)],
                    format!("ServiceEntry {}: host {h} has no endpoints", se.meta.name),
                ));
            }
        }
    }
}

/// Conflicting TLS: the client is told to use mTLS where the server refuses it, or not told where the server requires it.
fn tls_conflicts(index: &Index<'_>, out: &mut Findings) {
    let config = index.config;
    for svc in &index.services {
        let dr = index.destination_rule(&svc.host);
        let istio_mutual = dr.is_some_and(|dr| {
            dr.spec
                .traffic_policy
                .as_ref()
                .and_then(|p| p.tls.as_ref())
                .and_then(|t| t.mode.as_deref())
                == Some("ISTIO_MUTUAL")
        });
        let strict = svc
            .workloads
            .iter()
            .any(|w| index.peer_mode(&w.namespace, &w.labels) == "STRICT");
        // Proxyless clients use mTLS only when a DestinationRule says ISTIO_MUTUAL (there is
        // no auto mTLS), so a STRICT server refuses them otherwise.
        if strict && !istio_mutual {
            let (origin, path, what) = match dr {
                Some(dr) => (
                    &dr.origin,
                    vec![Seg::Key("spec"), Seg::Key("trafficPolicy")],
                    format!("DestinationRule {}", dr.meta.name),
                ),
                None => match config
                    .service_entries
                    .iter()
                    .find(|se| se.spec.hosts.contains(&svc.host))
                {
                    Some(se) => (
                        &se.origin,
                        vec![Seg::Key("spec"), Seg::Key("hosts")],
                        format!("ServiceEntry {}: no DestinationRule", se.meta.name),
                    ),
                    None => continue,
                },
            };
            out.warning(origin.at(
            &path,
            format!(
                "{what}: the workloads of {} are STRICT (mTLS only), but clients are not told to use mTLS; add trafficPolicy.tls.mode: ISTIO_MUTUAL or every call is refused",
                svc.host
            ),
        ));
        }
        if let Some(dr) = dr {
            let wants_mtls = dr
                .spec
                .traffic_policy
                .as_ref()
                .and_then(|p| p.tls.as_ref())
                .and_then(|t| t.mode.as_deref())
                == Some("ISTIO_MUTUAL");
            let refuses = svc
                .workloads
                .iter()
                .any(|w| index.peer_mode(&w.namespace, &w.labels) == "DISABLE");
            if wants_mtls && refuses {
                out.error(dr.origin.at(
                &[Seg::Key("spec"), Seg::Key("trafficPolicy"), Seg::Key("tls")],
                format!(
                    "DestinationRule {}: tls ISTIO_MUTUAL to {}, but its workloads' PeerAuthentication is DISABLE",
                    dr.meta.name, svc.host
                ),
            ));
            }
        }
    }
}

/// What would make a proxyless gRPC client NACK, or what it ignores.
fn proxyless_limits(config: &Config, out: &mut Findings) {
    for se in &config.service_entries {
        if se.spec.resolution.as_deref() == Some("DNS") {
            out.warning(se.origin.at(
            &[Seg::Key("spec"), Seg::Key("resolution")],
            format!(
                "ServiceEntry {}: resolution DNS becomes STRICT_DNS clusters, which the mesh's client and Envoy resolve but proxyless gRPC clients (grpcio, grpc-js) NACK; DNS_ROUND_ROBIN (LOGICAL_DNS) is closer to what they accept",
                se.meta.name
            ),
        ));
        }
    }
    for dr in &config.destination_rules {
        let mut modes = Vec::new();
        let mut policy_modes = |p: &super::TrafficPolicy| {
            modes.extend(p.tls.iter().filter_map(|t| t.mode.clone()));
            for pl in &p.port_level_settings {
                modes.extend(pl.tls.iter().filter_map(|t| t.mode.clone()));
            }
        };
        if let Some(p) = &dr.spec.traffic_policy {
            policy_modes(p);
        }
        for s in &dr.spec.subsets {
            if let Some(p) = &s.traffic_policy {
                policy_modes(p);
            }
        }
        let mut warmups = 0;
        let mut policy_warmups = |p: &super::TrafficPolicy| {
            let lbs = p.load_balancer.iter().chain(
                p.port_level_settings
                    .iter()
                    .filter_map(|pl| pl.load_balancer.as_ref()),
            );
            warmups += lbs
                .filter(|lb| lb.warmup.is_some() || lb.warmup_duration_secs.is_some())
                .count();
        };
        if let Some(p) = &dr.spec.traffic_policy {
            policy_warmups(p);
        }
        for s in &dr.spec.subsets {
            if let Some(p) = &s.traffic_policy {
                policy_warmups(p);
            }
        }
        if warmups > 0 {
            out.warning(dr.origin.at(
            &[Seg::Key("spec")],
            format!(
                "DestinationRule {}: loadBalancer warmup (slow start) is applied by the mesh's client and Envoy; proxyless gRPC clients (grpcio, grpc-js) have no slow start and send new endpoints their full share at once",
                dr.meta.name
            ),
        ));
        }
        if let Some(mode) = modes
            .iter()
            .find(|m| matches!(m.as_str(), "SIMPLE" | "MUTUAL"))
        {
            out.warning(dr.origin.at(
            &[Seg::Key("spec")],
            format!(
                "DestinationRule {}: tls mode {mode} names its own CA and certificate files, which the mesh's client and Envoy read but proxyless gRPC clients (grpcio, grpc-js) NACK: they take TLS only from certificate-provider instances (gRFC A29)",
                dr.meta.name
            ),
        ));
        }
    }
}

/// PeerAuthentication modes and AuthorizationPolicy actions that are not Istio's.
fn modes_and_actions(config: &Config, out: &mut Findings) {
    for pa in &config.peer_authentications {
        if let Some(mode) = pa.spec.mtls.as_ref().and_then(|m| m.mode.as_deref()) {
            if !matches!(mode, "STRICT" | "PERMISSIVE" | "DISABLE" | "UNSET") {
                out.error(pa.origin.at(
                    &[Seg::Key("spec"), Seg::Key("mtls"), Seg::Key("mode")],
                    format!(
                        "PeerAuthentication {}: mode {mode:?} is not STRICT, PERMISSIVE or DISABLE",
                        pa.meta.name
                    ),
                ));
            }
        }
    }
    for ap in &config.authorization_policies {
        if let Some(action) = &ap.spec.action {
            if action != "ALLOW" && action != "DENY" {
                out.error(ap.origin.at(
                    &[Seg::Key("spec"), Seg::Key("action")],
                    format!(
                        "AuthorizationPolicy {}: action {action:?} is not ALLOW or DENY",
                        ap.meta.name
                    ),
                ));
            }
        }
    }
}

/// Whether every request matched by `later` is matched by `earlier` (conservatively: only
/// catch-alls and identical match lists count).
fn covers(earlier: &[HttpMatch], later: &[HttpMatch]) -> bool {
    let catch_all = |m: &HttpMatch| {
        m.headers.is_empty()
            && m.query_params.is_empty()
            && m.method.is_none()
            && m.uri
                .as_ref()
                .is_none_or(|u| u.prefix.as_deref() == Some("/"))
    };
    earlier.is_empty() || earlier.iter().any(catch_all) || (!later.is_empty() && earlier == later)
}
