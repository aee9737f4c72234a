//! Route configurations: a service's VirtualService rules as Envoy routes (matches, weighted
//! destinations, retries, timeouts, faults, mirrors, header operations, hash policies).

use super::common::*;
use crate::istio::index::{cluster_name, merged_policy, Service};
use crate::istio::{Doc, HttpRoute, Seg, StringMatch};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common_fault;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::envoy::r#type::v3 as types;
use envoy_types::pb::google::protobuf::{Any, BoolValue};
use std::time::Duration;

/// The path of a VirtualService's `http[i]` rule, with `extra` below it.
fn rule_path(i: usize, extra: &[Seg<'static>]) -> Vec<Seg<'static>> {
    let mut p = vec![Seg::Key("spec"), Seg::Key("http"), Seg::Idx(i)];
    p.extend_from_slice(extra);
    p
}

pub(super) fn string_match(m: &StringMatch) -> Option<matcher::StringMatcher> {
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

pub(super) fn percent(p: Option<&crate::istio::Percent>, default: f64) -> types::FractionalPercent {
    let v = p.map(|p| p.value).unwrap_or(default).clamp(0.0, 100.0);
    types::FractionalPercent {
        numerator: (v * 10_000.0).round() as u32,
        denominator: types::fractional_percent::DenominatorType::Million as i32,
    }
}

/// gRPC status names as Istio accepts them.
pub(super) fn grpc_code(v: &serde_yaml_ng::Value) -> Option<u32> {
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
    pub(super) fn route_config(&mut self, svc: &Service, name: &str) -> rpb::RouteConfiguration {
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

        let index = self.index;
        let vs = index.config.virtual_services.iter().find(|vs| {
            vs.spec
                .hosts
                .iter()
                .any(|h| index.resolve_host(h, vs.meta.ns()) == Some(svc.host.as_str()))
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

    /// The routes of a VirtualService's `http[i]` rule for `svc` (one per match).
    pub(super) fn routes_for(
        &mut self,
        svc: &Service,
        vs: &Doc<crate::istio::VirtualServiceSpec>,
        i: usize,
        http: &HttpRoute,
    ) -> Vec<rpb::Route> {
        let path = |extra: &[Seg<'static>]| rule_path(i, extra);
        let origin = vs.origin.clone();
        let Some((cluster_specifier, first_dest)) = self.destinations(svc, vs, i, http) else {
            return Vec::new();
        };
        let timeout = http
            .timeout
            .as_ref()
            .and_then(|t| self.duration(&origin, &path(&[Seg::Key("timeout")]), t))
            .unwrap_or(Duration::ZERO);
        let retry_policy = self.retry_policy(http, &origin, i);
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
        let hash_policy = self.hash_policy(&first_dest, svc, vs);
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

    /// The clusters of a rule's `route` destinations with their weights, and the first
    /// destination (whose DestinationRule decides the hash policy); `None` (and errors) when
    /// the rule routes nowhere.
    fn destinations(
        &mut self,
        svc: &Service,
        vs: &Doc<crate::istio::VirtualServiceSpec>,
        i: usize,
        http: &HttpRoute,
    ) -> Option<(
        rpb::route_action::ClusterSpecifier,
        crate::istio::Destination,
    )> {
        let path = |extra: &[Seg<'static>]| rule_path(i, extra);
        let origin = &vs.origin;
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
            return None;
        }
        if weighted.iter().all(|(_, w)| *w == 0) {
            self.errors.push(origin.at(
                &path(&[Seg::Key("route")]),
                format!(
                    "VirtualService {}: http[{i}].route: the weights add up to 0",
                    vs.meta.name
                ),
            ));
            return None;
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
        Some((cluster_specifier, first_dest?))
    }

    /// A rule's retry policy: Istio's default (2 attempts) when it sets none, no retries for
    /// `attempts: 0`.
    fn retry_policy(
        &mut self,
        http: &HttpRoute,
        origin: &crate::istio::Origin,
        i: usize,
    ) -> Option<rpb::RetryPolicy> {
        match &http.retries {
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
                            origin,
                            &rule_path(i, &[Seg::Key("retries"), Seg::Key("perTryTimeout")]),
                            t,
                        )
                    })
                    .map(pb_duration),
                retriable_status_codes: vec![503],
                retry_host_predicate: vec![previous_hosts()],
                host_selection_retry_max_attempts: 5,
                ..Default::default()
            }),
        }
    }

    /// The hash policy of a rule: the consistent hash of the DestinationRule (and subset) of
    /// its first destination, at the port the destination picks.
    fn hash_policy(
        &self,
        first_dest: &crate::istio::Destination,
        svc: &Service,
        vs: &Doc<crate::istio::VirtualServiceSpec>,
    ) -> Vec<rpb::route_action::HashPolicy> {
        let Some(ch) = self.consistent_hash(first_dest, svc, vs) else {
            return Vec::new();
        };
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
    }

    /// The consistent hash of the DestinationRule (and subset) of a destination, at the port
    /// [`destination_cluster`](Self::destination_cluster) picks for it (it reports the bad cases).
    fn consistent_hash(
        &self,
        d: &crate::istio::Destination,
        svc: &Service,
        vs: &Doc<crate::istio::VirtualServiceSpec>,
    ) -> Option<crate::istio::ConsistentHash> {
        let index = self.index;
        let host = index.resolve_host(&d.host, vs.meta.ns())?;
        let dr = index.destination_rule(host)?;
        // The port `destination_cluster` picks (it reports the bad cases).
        let ports = index.ports(host);
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
    }

    pub(super) fn fault(
        &mut self,
        f: &crate::istio::Fault,
        origin: &crate::istio::Origin,
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
    pub(super) fn destination_cluster(
        &mut self,
        d: &crate::istio::Destination,
        svc: &Service,
        vs: &Doc<crate::istio::VirtualServiceSpec>,
        path: &[Seg<'_>],
    ) -> Option<String> {
        let index = self.index;
        let Some(host) = index.resolve_host(&d.host, vs.meta.ns()) else {
            self.errors.push(vs.origin.at(
                path,
                format!("VirtualService {}: destination host {:?} is not a known service (add a ServiceEntry)", vs.meta.name, d.host),
            ));
            return None;
        };
        let ports = index.ports(host);
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
            let known = index
                .destination_rule(host)
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
}

pub(super) const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

pub(super) fn previous_hosts() -> rpb::retry_policy::RetryHostPredicate {
    rpb::retry_policy::RetryHostPredicate {
        name: "envoy.retry_host_predicates.previous_hosts".into(),
        config_type: Some(rpb::retry_policy::retry_host_predicate::ConfigType::TypedConfig(Any {
            type_url: "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate".into(),
            value: Vec::new(),
        })),
    }
}

/// Istio's default retry policy: 2 attempts on connection failures and 503.
pub(super) fn default_retry() -> rpb::RetryPolicy {
    rpb::RetryPolicy {
        retry_on: DEFAULT_RETRY_ON.into(),
        num_retries: u32v(2),
        retriable_status_codes: vec![503],
        retry_host_predicate: vec![previous_hosts()],
        host_selection_retry_max_attempts: 5,
        ..Default::default()
    }
}

pub(super) fn route_match(m: &crate::istio::HttpMatch) -> rpb::RouteMatch {
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

pub(super) fn header_ops(
    ops: Option<&crate::istio::HeaderOps>,
) -> (Vec<core::HeaderValueOption>, Vec<String>) {
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
