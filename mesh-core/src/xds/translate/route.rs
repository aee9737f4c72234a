//! `RouteConfiguration` (RDS) translation.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as pb;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::google::protobuf::Any;
use http::{HeaderName, HeaderValue};
use prost::Name;

use super::fault::fault;
use super::matcher::{header_matcher, query_matcher, regex};
use super::{
    decode_any, duration, err, fraction, opt_nonzero_duration, type_name, At, FieldError,
    TranslateError,
};
use crate::config::*;
use crate::xds::ResourceType;

/// The filter name Envoy and gRPC use for fault injection overrides.
const FAULT_FILTER_NAMES: [&str; 2] = ["envoy.filters.http.fault", "envoy.fault"];

impl TryFrom<&pb::RouteConfiguration> for RouteConfig {
    type Error = TranslateError;

    fn try_from(rc: &pb::RouteConfiguration) -> Result<Self, Self::Error> {
        route_config(rc)
            .and_then(|x| super::ledger::check_resource(rc).map(|()| x))
            .map_err(|e| e.into_error(ResourceType::RouteConfiguration, &rc.name))
    }
}

impl TryFrom<pb::RouteConfiguration> for RouteConfig {
    type Error = TranslateError;

    fn try_from(rc: pb::RouteConfiguration) -> Result<Self, Self::Error> {
        RouteConfig::try_from(&rc)
    }
}

pub(crate) fn route_config(rc: &pb::RouteConfiguration) -> Result<RouteConfig, FieldError> {
    if rc.name.is_empty() {
        return err("name is empty").at("name");
    }
    if rc.vhds.is_some() {
        return err("VHDS is not supported").at("vhds");
    }
    let virtual_hosts = rc
        .virtual_hosts
        .iter()
        .enumerate()
        .map(|(i, vh)| virtual_host(vh).at_index("virtual_hosts", i))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RouteConfig {
        name: rc.name.clone(),
        virtual_hosts,
        ignore_port_in_host_matching: rc.ignore_port_in_host_matching,
        request_headers: mutation(
            &rc.request_headers_to_add,
            &rc.request_headers_to_remove,
            "request",
        )?,
        response_headers: mutation(
            &rc.response_headers_to_add,
            &rc.response_headers_to_remove,
            "response",
        )?,
    })
}

fn virtual_host(vh: &pb::VirtualHost) -> Result<VirtualHost, FieldError> {
    if vh.domains.is_empty() {
        return err("at least one domain is required").at("domains");
    }
    let domains = vh
        .domains
        .iter()
        .enumerate()
        .map(|(i, d)| {
            DomainMatcher::parse(d)
                .map_err(FieldError::new)
                .at_index("domains", i)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let retry_policy = vh
        .retry_policy
        .as_ref()
        .map(retry_policy)
        .transpose()
        .at("retry_policy")?;
    let overrides = per_filter(&vh.typed_per_filter_config)?;
    let routes = vh
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| route(r, retry_policy.as_ref()).at_index("routes", i))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VirtualHost {
        name: vh.name.clone(),
        domains,
        routes,
        retry_policy,
        request_headers: mutation(
            &vh.request_headers_to_add,
            &vh.request_headers_to_remove,
            "request",
        )?,
        response_headers: mutation(
            &vh.response_headers_to_add,
            &vh.response_headers_to_remove,
            "response",
        )?,
        fault: overrides.fault,
        rbac: overrides.rbac,
    })
}

fn route(r: &pb::Route, vh_retry: Option<&RetryPolicy>) -> Result<Route, FieldError> {
    let matcher = route_match(
        r.r#match
            .as_ref()
            .ok_or_else(|| FieldError::new("match is required"))?,
    )
    .at("match")?;
    let overrides = per_filter(&r.typed_per_filter_config)?;
    use pb::route::Action;
    let action = match &r.action {
        Some(Action::Route(ra)) => RouteAction::Forward(forward(ra, vh_retry).at("route")?),
        Some(Action::Redirect(rd)) => redirect(rd).at("redirect")?,
        Some(Action::DirectResponse(dr)) => direct_response(dr).at("direct_response")?,
        Some(Action::NonForwardingAction(_)) => RouteAction::NonForwarding,
        Some(Action::FilterAction(_)) => {
            return err("filter_action is not supported").at("filter_action")
        }
        None => {
            return err(
                "one of route, redirect, direct_response or non_forwarding_action is required",
            )
        }
    };
    Ok(Route {
        name: r.name.clone(),
        matcher,
        action,
        request_headers: mutation(
            &r.request_headers_to_add,
            &r.request_headers_to_remove,
            "request",
        )?,
        response_headers: mutation(
            &r.response_headers_to_add,
            &r.response_headers_to_remove,
            "response",
        )?,
        fault: overrides.fault,
        rbac: overrides.rbac,
    })
}

fn route_match(m: &pb::RouteMatch) -> Result<RouteMatch, FieldError> {
    use pb::route_match::PathSpecifier as P;
    let path = match &m.path_specifier {
        Some(P::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(P::Path(p)) => PathMatch::Exact(p.clone()),
        Some(P::SafeRegex(r)) => PathMatch::Regex(regex(r).at("safe_regex")?),
        Some(P::PathSeparatedPrefix(p)) => {
            if p.contains(['?', '#']) || (p.len() > 1 && p.ends_with('/')) {
                return err(format!("{p:?} must not contain ? or # or end with /"))
                    .at("path_separated_prefix");
            }
            PathMatch::SeparatedPrefix(p.clone())
        }
        Some(P::ConnectMatcher(_)) => {
            return err("connect_matcher is not supported").at("connect_matcher")
        }
        Some(P::PathMatchPolicy(p)) => {
            return err(format!("path_match_policy {:?} is not supported", p.name))
                .at("path_match_policy")
        }
        None => return err("one of prefix, path, safe_regex or path_separated_prefix is required"),
    };
    let headers = m
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| header_matcher(h).at_index("headers", i))
        .collect::<Result<_, _>>()?;
    let query_params = m
        .query_parameters
        .iter()
        .enumerate()
        .map(|(i, q)| query_matcher(q).at_index("query_parameters", i))
        .collect::<Result<_, _>>()?;
    let fraction = match &m.runtime_fraction {
        None => None,
        Some(rf) => Some(
            fraction(rf.default_value.as_ref(), Fraction::ALWAYS)
                .at("default_value")
                .at("runtime_fraction")?,
        ),
    };
    Ok(RouteMatch {
        path,
        case_sensitive: m.case_sensitive.map(|b| b.value).unwrap_or(true),
        headers,
        query_params,
        fraction,
        grpc_only: m.grpc.is_some(),
    })
}

fn direct_response(dr: &pb::DirectResponseAction) -> Result<RouteAction, FieldError> {
    if !(200..600).contains(&dr.status) {
        return err(format!("status {} is outside 200..600", dr.status)).at("status");
    }
    if dr.body.is_some() && dr.body_format.is_some() {
        // Envoy reads body_format's text_format_source only when body is unset.
        return err("body and body_format.text_format_source are mutually exclusive here")
            .at("body_format");
    }
    let mut content_type = None;
    let body = if let Some(b) = &dr.body {
        data_source(b).at("body")?
    } else if let Some(f) = &dr.body_format {
        use core::substitution_format_string::Format;
        let text = match &f.format {
            Some(Format::TextFormatSource(src)) => data_source(src).at("text_format_source")?,
            Some(_) => {
                return err("only text_format_source is supported (no text_format or json_format)")
                    .at("body_format")
            }
            None => bytes::Bytes::new(),
        };
        // Envoy substitutes %COMMAND% operators in a format string; the mesh does not, so a
        // body with one is refused rather than sent with the operator in it.
        if text.contains(&b'%') {
            return err("format operators (%...%) are not supported; write the body literally")
                .at("text_format_source")
                .at("body_format");
        }
        if !f.content_type.is_empty() {
            content_type = Some(
                http::HeaderValue::from_str(&f.content_type)
                    .map_err(|_| {
                        FieldError::new(format!("{:?} is not a header value", f.content_type))
                    })
                    .at("content_type")
                    .at("body_format")?,
            );
        }
        text
    } else {
        bytes::Bytes::new()
    };
    if content_type.is_none() && !body.is_empty() {
        content_type = Some(http::HeaderValue::from_static("text/plain"));
    }
    Ok(RouteAction::DirectResponse {
        status: dr.status as u16,
        body,
        content_type,
    })
}

/// An inline body (`inline_bytes` or `inline_string`); files and variables are refused.
fn data_source(d: &core::DataSource) -> Result<bytes::Bytes, FieldError> {
    use core::data_source::Specifier as S;
    match &d.specifier {
        None => Ok(bytes::Bytes::new()),
        Some(S::InlineString(s)) => Ok(bytes::Bytes::from(s.clone().into_bytes())),
        Some(S::InlineBytes(b)) => Ok(bytes::Bytes::from(b.clone())),
        Some(S::Filename(_)) => {
            err("bodies from files are not supported; inline the body").at("filename")
        }
        Some(S::EnvironmentVariable(_)) => {
            err("bodies from environment variables are not supported").at("environment_variable")
        }
    }
}

fn redirect(rd: &pb::RedirectAction) -> Result<RouteAction, FieldError> {
    use pb::redirect_action::{PathRewriteSpecifier as P, SchemeRewriteSpecifier as S};
    let status = match rd.response_code {
        0 => 301,
        1 => 302,
        2 => 303,
        3 => 307,
        4 => 308,
        other => return err(format!("unknown response_code {other}")).at("response_code"),
    };
    let scheme = match &rd.scheme_rewrite_specifier {
        Some(S::HttpsRedirect(true)) => Some("https".to_owned()),
        Some(S::HttpsRedirect(false)) | None => None,
        Some(S::SchemeRedirect(s)) if s.is_empty() => None,
        Some(S::SchemeRedirect(s)) => Some(s.to_ascii_lowercase()),
    };
    let path = match &rd.path_rewrite_specifier {
        Some(P::PathRedirect(p)) => RedirectPath::Replace(p.clone()),
        Some(P::PrefixRewrite(p)) => RedirectPath::Prefix(p.clone()),
        Some(P::RegexRewrite(rr)) => RedirectPath::Regex(RegexRewrite {
            pattern: regex(
                rr.pattern
                    .as_ref()
                    .ok_or_else(|| FieldError::new("pattern is required"))
                    .at("regex_rewrite")?,
            )
            .at("pattern")
            .at("regex_rewrite")?,
            substitution: rr.substitution.clone(),
        }),
        Some(P::PathRewrite(_)) => {
            return err("path_rewrite (URI templates) is not supported").at("path_rewrite")
        }
        None => RedirectPath::Keep,
    };
    let port = match rd.port_redirect {
        0 => None,
        p => Some(
            u16::try_from(p)
                .map_err(|_| FieldError::new(format!("{p} is not a port")))
                .at("port_redirect")?,
        ),
    };
    Ok(RouteAction::Redirect(Redirect {
        status,
        scheme,
        host: (!rd.host_redirect.is_empty()).then(|| rd.host_redirect.clone()),
        port,
        path,
        strip_query: rd.strip_query,
    }))
}

/// Where a route sends requests: one cluster, a cluster named by a header, or weighted
/// clusters.
fn cluster_specifier(ra: &pb::RouteAction) -> Result<ClusterSpecifier, FieldError> {
    use pb::route_action::ClusterSpecifier as C;
    let cluster = match &ra.cluster_specifier {
        Some(C::Cluster(name)) if name.is_empty() => {
            return err("cluster name is empty").at("cluster")
        }
        Some(C::Cluster(name)) => ClusterSpecifier::Cluster(name.clone()),
        Some(C::ClusterHeader(h)) => ClusterSpecifier::Header(
            HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| FieldError::new(format!("{h:?} is not a valid header name")))
                .at("cluster_header")?,
        ),
        Some(C::WeightedClusters(w)) => {
            ClusterSpecifier::Weighted(weighted(w).at("weighted_clusters")?)
        }
        Some(C::ClusterSpecifierPlugin(_)) | Some(C::InlineClusterSpecifierPlugin(_)) => {
            return err("cluster specifier plugins are not supported").at("cluster_specifier")
        }
        None => return err("one of cluster, cluster_header or weighted_clusters is required"),
    };
    Ok(cluster)
}

/// A route's request mirror policies.
fn mirrors(ra: &pb::RouteAction) -> Result<Vec<MirrorPolicy>, FieldError> {
    ra.request_mirror_policies
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if m.cluster.is_empty() {
                return err("cluster is required (cluster_header is not supported)")
                    .at_index("request_mirror_policies", i);
            }
            Ok(MirrorPolicy {
                cluster: m.cluster.clone(),
                fraction: fraction(
                    m.runtime_fraction
                        .as_ref()
                        .and_then(|f| f.default_value.as_ref()),
                    Fraction::ALWAYS,
                )
                .at("runtime_fraction")
                .at_index("request_mirror_policies", i)?,
                shadow_suffix: !m.disable_shadow_host_suffix_append,
            })
        })
        .collect::<Result<_, _>>()
}

fn forward(
    ra: &pb::RouteAction,
    vh_retry: Option<&RetryPolicy>,
) -> Result<ForwardAction, FieldError> {
    let cluster = cluster_specifier(ra)?;
    let timeout = match &ra.timeout {
        None => Some(DEFAULT_ROUTE_TIMEOUT),
        Some(d) => opt_nonzero_duration(Some(d)).at("timeout")?,
    };
    let retry_policy = match &ra.retry_policy {
        Some(rp) => Some(retry_policy(rp).at("retry_policy")?),
        None => vh_retry.cloned(),
    };
    let hash_policy = ra
        .hash_policy
        .iter()
        .enumerate()
        .filter_map(|(i, h)| hash_policy(h).at_index("hash_policy", i).transpose())
        .collect::<Result<_, _>>()?;
    let mirrors = mirrors(ra)?;
    if !ra.prefix_rewrite.is_empty() && ra.regex_rewrite.is_some() {
        return err("prefix_rewrite and regex_rewrite are mutually exclusive").at("regex_rewrite");
    }
    let regex_rewrite = match &ra.regex_rewrite {
        None => None,
        Some(rr) => Some(RegexRewrite {
            pattern: regex(
                rr.pattern
                    .as_ref()
                    .ok_or_else(|| FieldError::new("pattern is required"))?,
            )
            .at("pattern")
            .at("regex_rewrite")?,
            substitution: rr.substitution.clone(),
        }),
    };
    use pb::route_action::HostRewriteSpecifier as H;
    let host_rewrite = match &ra.host_rewrite_specifier {
        Some(H::HostRewriteLiteral(h)) if !h.is_empty() => Some(h.clone()),
        _ => None,
    };
    let max_stream_duration = opt_nonzero_duration(
        ra.max_stream_duration
            .as_ref()
            .and_then(|m| m.max_stream_duration.as_ref()),
    )
    .at("max_stream_duration")
    .at("max_stream_duration")?;
    // The stream may not outlive max_stream_duration, whatever the route timeout says; the
    // timeout layer bounds the whole exchange, so the smaller of the two is the bound.
    let timeout = match (timeout, max_stream_duration) {
        (Some(t), Some(m)) => Some(t.min(m)),
        (t, m) => t.or(m),
    };
    Ok(ForwardAction {
        cluster,
        timeout,
        idle_timeout: None,
        max_stream_duration,
        retry_policy,
        hash_policy,
        mirrors,
        prefix_rewrite: (!ra.prefix_rewrite.is_empty()).then(|| ra.prefix_rewrite.clone()),
        regex_rewrite,
        host_rewrite,
    })
}

fn weighted(w: &pb::WeightedCluster) -> Result<WeightedClusters, FieldError> {
    if w.clusters.is_empty() {
        return err("at least one cluster is required").at("clusters");
    }
    let mut clusters = Vec::with_capacity(w.clusters.len());
    let mut total: u64 = 0;
    for (i, c) in w.clusters.iter().enumerate() {
        if c.name.is_empty() {
            return err("name is required (cluster_header is not supported)")
                .at("name")
                .at_index("clusters", i);
        }
        let weight = c.weight.map(|v| v.value).unwrap_or(0);
        total += u64::from(weight);
        if weight == 0 {
            continue;
        }
        clusters.push(ClusterWeight {
            name: c.name.clone(),
            weight,
            request_headers: mutation(
                &c.request_headers_to_add,
                &c.request_headers_to_remove,
                "request",
            )
            .at_index("clusters", i)?,
            response_headers: mutation(
                &c.response_headers_to_add,
                &c.response_headers_to_remove,
                "response",
            )
            .at_index("clusters", i)?,
            fault: {
                let o = per_filter(&c.typed_per_filter_config).at_index("clusters", i)?;
                if !o.rbac.is_empty() {
                    return err(
                        "per-cluster RBAC overrides are not supported; put them on the route",
                    )
                    .at("typed_per_filter_config")
                    .at_index("clusters", i);
                }
                o.fault
            },
        });
    }
    if total == 0 {
        return err("total weight is 0");
    }
    if total > u64::from(u32::MAX) {
        return err(format!("total weight {total} exceeds {}", u32::MAX));
    }
    Ok(WeightedClusters { clusters, total })
}

pub(crate) fn retry_policy(rp: &pb::RetryPolicy) -> Result<RetryPolicy, FieldError> {
    let (retry_on, unknown) = RetryOn::parse(&rp.retry_on);
    if !unknown.is_empty() {
        // Envoy and gRPC both ignore conditions they do not know.
        tracing::debug!(?unknown, "ignoring unknown retry_on conditions");
    }
    let backoff = match &rp.retry_back_off {
        None => RetryBackoff::default(),
        Some(b) => {
            let base = duration(
                b.base_interval
                    .as_ref()
                    .ok_or_else(|| FieldError::new("base_interval is required"))?,
            )
            .at("base_interval")
            .at("retry_back_off")?;
            if base.is_zero() {
                return err("base_interval must be greater than 0").at("retry_back_off");
            }
            let max = match &b.max_interval {
                Some(m) => duration(m).at("max_interval").at("retry_back_off")?,
                None => base * 10,
            };
            if max < base {
                return err("max_interval is less than base_interval").at("retry_back_off");
            }
            RetryBackoff { base, max }
        }
    };
    let retriable_status_codes = rp
        .retriable_status_codes
        .iter()
        .map(|c| match u16::try_from(*c) {
            Ok(c) if (100..600).contains(&c) => Ok(c),
            _ => err(format!("{c} is not an HTTP status")),
        })
        .collect::<Result<_, _>>()
        .at("retriable_status_codes")?;
    let mut previous_hosts = false;
    for (i, p) in rp.retry_host_predicate.iter().enumerate() {
        use pb::retry_policy::retry_host_predicate::ConfigType;
        let known = match &p.config_type {
            Some(ConfigType::TypedConfig(a)) => type_name(a).ends_with(".PreviousHostsPredicate"),
            None => p.name == "envoy.retry_host_predicates.previous_hosts",
        };
        if !known {
            return err(format!(
                "retry host predicate {:?} is not supported (only previous_hosts)",
                p.name
            ))
            .at_index("retry_host_predicate", i);
        }
        previous_hosts = true;
    }
    Ok(RetryPolicy {
        retry_on,
        num_retries: rp.num_retries.map(|v| v.value).unwrap_or(1),
        per_try_timeout: opt_nonzero_duration(rp.per_try_timeout.as_ref()).at("per_try_timeout")?,
        backoff,
        retriable_status_codes,
        previous_hosts,
        host_selection_max_attempts: rp.host_selection_retry_max_attempts.clamp(1, 1000) as u32,
    })
}

fn hash_policy(h: &pb::route_action::HashPolicy) -> Result<Option<HashPolicy>, FieldError> {
    use pb::route_action::hash_policy::PolicySpecifier as P;
    let kind = match &h.policy_specifier {
        Some(P::Header(hd)) => HashPolicyKind::Header(
            HeaderName::from_bytes(hd.header_name.as_bytes())
                .map_err(|_| {
                    FieldError::new(format!("{:?} is not a valid header name", hd.header_name))
                })
                .at("header_name")
                .at("header")?,
        ),
        Some(P::Cookie(c)) => HashPolicyKind::Cookie(c.name.clone()),
        Some(P::ConnectionProperties(c)) if c.source_ip => HashPolicyKind::SourceIp,
        Some(P::QueryParameter(q)) => HashPolicyKind::QueryParameter(q.name.clone()),
        // gRPC ignores hash policies it does not implement; so do we.
        _ => return Ok(None),
    };
    Ok(Some(HashPolicy {
        kind,
        terminal: h.terminal,
    }))
}

/// Header changes; `side` is `request` or `response`, for the field names in errors.
pub(crate) fn mutation(
    add: &[core::HeaderValueOption],
    remove: &[String],
    side: &'static str,
) -> Result<HeaderMutation, FieldError> {
    let (add_field, remove_field) = if side == "request" {
        ("request_headers_to_add", "request_headers_to_remove")
    } else {
        ("response_headers_to_add", "response_headers_to_remove")
    };
    let mut out = HeaderMutation::default();
    for (i, r) in remove.iter().enumerate() {
        out.remove.push(header_name(r).at_index(remove_field, i)?);
    }
    for (i, opt) in add.iter().enumerate() {
        let h = opt
            .header
            .as_ref()
            .ok_or_else(|| FieldError::new("header is required"))
            .at_index(add_field, i)?;
        let name = header_name(&h.key).at("key").at_index(add_field, i)?;
        let raw = if h.raw_value.is_empty() {
            h.value.as_bytes()
        } else {
            &h.raw_value
        };
        let value = HeaderValue::from_bytes(raw)
            .map_err(|_| FieldError::new(format!("invalid value for header {:?}", h.key)))
            .at("value")
            .at_index(add_field, i)?;
        #[allow(deprecated)]
        let action = match (opt.append.map(|b| b.value), opt.append_action) {
            (Some(true), _) => AppendAction::Append,
            (Some(false), _) => AppendAction::Overwrite,
            (None, 0) => AppendAction::Append,
            (None, 1) => AppendAction::AddIfAbsent,
            (None, 2 | 3) => AppendAction::Overwrite,
            (None, other) => {
                return err(format!("unknown append_action {other}")).at_index(add_field, i)
            }
        };
        out.add.push(HeaderAdd {
            name,
            value,
            action,
        });
    }
    Ok(out)
}

fn header_name(name: &str) -> Result<HeaderName, FieldError> {
    if name.starts_with(':') || name.eq_ignore_ascii_case("host") {
        return err(format!("header {name:?} cannot be modified"));
    }
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| FieldError::new(format!("{name:?} is not a valid header name")))
}

/// What a route's (or virtual host's) `typed_per_filter_config` says.
#[derive(Default)]
struct Overrides {
    fault: Option<FaultConfig>,
    rbac: Vec<RbacOverride>,
}

/// The per-filter configs of a route or virtual host: the fault filter's override (an empty
/// fault when the filter is disabled here), RBAC overrides by filter name (`RBACPerRoute`;
/// its `rbac` absent, or the filter disabled, switches RBAC off on the route, as in Envoy).
///
/// Entries for other filters are refused, since the route would lose what they configure
/// (authentication, rate limits, session persistence...), unless the entry is a
/// `FilterConfig` marked `is_optional` or `disabled`.
fn per_filter(cfg: &HashMap<String, Any>) -> Result<Overrides, FieldError> {
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::RbacPerRoute;
    let mut names: Vec<&String> = cfg.keys().collect();
    names.sort();
    let mut out = Overrides::default();
    for name in names {
        let any = &cfg[name];
        let at = |e: FieldError| Err::<(), _>(e).at_key("typed_per_filter_config", name);
        let (any, optional) = if type_name(any) == pb::FilterConfig::full_name() {
            let fc: pb::FilterConfig = decode_any(any).at_key("typed_per_filter_config", name)?;
            if fc.disabled {
                // The filter is off on this route; its config (if any) is not used.
                if FAULT_FILTER_NAMES.contains(&name.as_str()) {
                    out.fault = Some(FaultConfig::default());
                } else {
                    out.rbac.push(RbacOverride {
                        filter: name.clone(),
                        config: None,
                    });
                }
                continue;
            }
            match fc.config {
                Some(c) => (c, fc.is_optional),
                None => continue,
            }
        } else {
            (any.clone(), false)
        };
        if type_name(&any) == HttpFault::full_name() || FAULT_FILTER_NAMES.contains(&name.as_str())
        {
            let f: HttpFault = decode_any(&any).at_key("typed_per_filter_config", name)?;
            out.fault = Some(fault(&f).at_key("typed_per_filter_config", name)?);
        } else if type_name(&any) == RbacPerRoute::full_name() {
            let per: RbacPerRoute = decode_any(&any).at_key("typed_per_filter_config", name)?;
            let config = match &per.rbac {
                None => None,
                Some(r) => Some(match super::rbac::rbac_filter(r).at("rbac") {
                    Ok(c) => c,
                    Err(e) => return at(e).map(|()| out),
                }),
            };
            out.rbac.push(RbacOverride {
                filter: name.clone(),
                config,
            });
        } else if !optional {
            return err(format!(
                "per-route config of type {} is not supported (the mesh implements per-route fault injection and RBAC); mark it is_optional in a FilterConfig if the route may run without it",
                type_name(&any)
            ))
            .at_key("typed_per_filter_config", name);
        }
    }
    Ok(out)
}
