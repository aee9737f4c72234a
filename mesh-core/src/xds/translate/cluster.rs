//! `Cluster` (CDS) translation.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as pb;
use envoy_types::pb::envoy::extensions::load_balancing_policies as lbp;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use prost::Name;

use super::endpoint::assignment;
use super::tls::{upstream, Socket};
use super::{decode_any, duration, err, type_name, At, FieldError, TranslateError};
use crate::config::*;
use crate::xds::ResourceType;

/// gRPC's cap on ring sizes.
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;

impl TryFrom<&pb::Cluster> for Cluster {
    type Error = TranslateError;

    fn try_from(c: &pb::Cluster) -> Result<Self, Self::Error> {
        cluster(c)
            .and_then(|x| super::ledger::check_resource(c).map(|()| x))
            .map_err(|e| e.into_error(ResourceType::Cluster, &c.name))
    }
}

impl TryFrom<pb::Cluster> for Cluster {
    type Error = TranslateError;

    fn try_from(c: pb::Cluster) -> Result<Self, Self::Error> {
        Cluster::try_from(&c)
    }
}

fn cluster(c: &pb::Cluster) -> Result<Cluster, FieldError> {
    if c.name.is_empty() {
        return err("name is empty").at("name");
    }
    use pb::cluster::ClusterDiscoveryType as D;
    let discovery = match &c.cluster_discovery_type {
        Some(D::Type(3)) => {
            let eds = c.eds_cluster_config.as_ref();
            if let Some(cs) = eds.and_then(|e| e.eds_config.as_ref()) {
                use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier as S;
                if !matches!(
                    cs.config_source_specifier,
                    Some(S::Ads(_)) | Some(S::Self_(_)) | None
                ) {
                    return err("only ads or self config sources are supported")
                        .at("eds_config")
                        .at("eds_cluster_config");
                }
            }
            let service_name = eds
                .map(|e| e.service_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| c.name.clone());
            Discovery::Eds { service_name }
        }
        Some(D::Type(0)) | None => {
            let cla = c
                .load_assignment
                .as_ref()
                .ok_or_else(|| FieldError::new("a STATIC cluster needs load_assignment"))
                .at("load_assignment")?;
            let mut cla = cla.clone();
            if cla.cluster_name.is_empty() {
                cla.cluster_name = c.name.clone();
            }
            Discovery::Static(Arc::new(assignment(&cla).at("load_assignment")?))
        }
        Some(D::Type(t @ (1 | 2))) => {
            #[allow(deprecated)]
            let settings = DnsSettings {
                refresh_rate: c.dns_refresh_rate.as_ref(),
                respect_ttl: c.respect_dns_ttl,
                family: c.dns_lookup_family,
                resolver: c.typed_dns_resolver_config.as_ref(),
                logical: *t == 2,
            };
            Discovery::Dns(Arc::new(dns(c, settings, &[])?))
        }
        // Extensions are chosen by their config's type, as Envoy does (names vary:
        // `envoy.clusters.dns`, `envoy.cluster.dns`).
        Some(D::ClusterType(ct))
            if ct.typed_config.as_ref().map(type_name)
                == Some("envoy.extensions.clusters.aggregate.v3.ClusterConfig") =>
        {
            use envoy_types::pb::envoy::extensions::clusters::aggregate::v3::ClusterConfig;
            let any = ct
                .typed_config
                .as_ref()
                .ok_or_else(|| FieldError::new("typed_config is required"))
                .at("cluster_type")?;
            let agg: ClusterConfig = decode_any(any).at("typed_config").at("cluster_type")?;
            if agg.clusters.is_empty() {
                return err("at least one cluster is required")
                    .at("clusters")
                    .at("typed_config")
                    .at("cluster_type");
            }
            if let Some(i) = agg
                .clusters
                .iter()
                .position(|n| n.is_empty() || *n == c.name)
            {
                return err("a cluster name must be non-empty and not the aggregate itself")
                    .at_index("clusters", i)
                    .at("typed_config")
                    .at("cluster_type");
            }
            Discovery::Aggregate(agg.clusters.into())
        }
        Some(D::ClusterType(ct))
            if ct.typed_config.as_ref().map(type_name)
                == Some("envoy.extensions.clusters.dns.v3.DnsCluster") =>
        {
            use envoy_types::pb::envoy::extensions::clusters::dns::v3::DnsCluster;
            let any = ct
                .typed_config
                .as_ref()
                .ok_or_else(|| FieldError::new("typed_config is required"))
                .at("cluster_type")?;
            let d: DnsCluster = decode_any(any).at("typed_config").at("cluster_type")?;
            let settings = DnsSettings {
                refresh_rate: d.dns_refresh_rate.as_ref(),
                respect_ttl: d.respect_dns_ttl,
                family: d.dns_lookup_family,
                resolver: d.typed_dns_resolver_config.as_ref(),
                logical: d.all_addresses_in_single_endpoint,
            };
            Discovery::Dns(Arc::new(dns(
                c,
                settings,
                &["typed_config", "cluster_type"],
            )?))
        }
        Some(D::Type(t)) => {
            let name = pb::cluster::DiscoveryType::try_from(*t)
                .map(|t| t.as_str_name())
                .unwrap_or("unknown");
            return err(format!(
                "cluster type {name} is not supported; use EDS, STATIC, STRICT_DNS or LOGICAL_DNS"
            ))
            .at("type");
        }
        Some(D::ClusterType(ct)) => {
            return err(format!(
                "custom cluster type {:?} is not supported",
                ct.name
            ))
            .at("cluster_type")
        }
    };

    let mut slow_start = None;
    let (lb_policy, mut locality_weighted) = match &c.load_balancing_policy {
        // An aggregate cluster balances with its clusters' policies (gRFC A75); Envoy asks
        // for CLUSTER_PROVIDED on it.
        Some(p) if matches!(discovery, Discovery::Aggregate(_)) && !p.policies.is_empty() => {
            return err("an aggregate cluster uses its clusters' policies; its own is not used")
                .at("load_balancing_policy")
        }
        _ if matches!(discovery, Discovery::Aggregate(_)) => match c.lb_policy {
            0 | 6 => (LbPolicy::RoundRobin, false),
            _ => {
                return err("an aggregate cluster uses its clusters' policies: lb_policy must be CLUSTER_PROVIDED (or unset)")
                    .at("lb_policy")
            }
        },
        Some(p) if !p.policies.is_empty() => {
            load_balancing_policy(p, &mut slow_start).at("load_balancing_policy")?
        }
        _ => {
            use pb::cluster::LbConfig as C;
            let policy = legacy_lb_policy(c)?;
            let legacy = |sc: Option<&pb::cluster::SlowStartConfig>, field: &'static str| {
                sc.map(|s| {
                    slow_start_config(
                        s.slow_start_window.as_ref(),
                        s.aggression.as_ref(),
                        s.min_weight_percent.as_ref(),
                    )
                })
                .transpose()
                .at("slow_start_config")
                .at(field)
                .map(Option::flatten)
            };
            slow_start = match (&c.lb_config, &policy) {
                (Some(C::RoundRobinLbConfig(rr)), LbPolicy::RoundRobin) => {
                    legacy(rr.slow_start_config.as_ref(), "round_robin_lb_config")?
                }
                (Some(C::LeastRequestLbConfig(lr)), LbPolicy::LeastRequest { .. }) => {
                    legacy(lr.slow_start_config.as_ref(), "least_request_lb_config")?
                }
                (Some(C::RoundRobinLbConfig(_)), _) => {
                    return err("round_robin_lb_config needs lb_policy ROUND_ROBIN")
                        .at("round_robin_lb_config")
                }
                _ => None,
            };
            (policy, false)
        }
    };
    if let Some(common) = &c.common_lb_config {
        use pb::cluster::common_lb_config::LocalityConfigSpecifier as L;
        if let Some(L::LocalityWeightedLbConfig(_)) = common.locality_config_specifier {
            locality_weighted = true;
        }
    }

    let circuit_breakers = circuit_breakers(c.circuit_breakers.as_ref()).at("circuit_breakers")?;
    let outlier_detection = c
        .outlier_detection
        .as_ref()
        .map(outlier)
        .transpose()
        .at("outlier_detection")?;
    let connect_timeout = match &c.connect_timeout {
        None => Duration::from_secs(5),
        Some(d) => {
            let d = duration(d).at("connect_timeout")?;
            if d.is_zero() {
                return err("connect_timeout must be greater than 0").at("connect_timeout");
            }
            d
        }
    };
    let (protocol, http2, max_requests_per_connection) = protocol(c)?;
    let tls = match &c.transport_socket {
        None => None,
        Some(ts) => match upstream(ts).at("transport_socket")? {
            Socket::Plaintext => None,
            Socket::Tls(t) => Some(t),
        },
    };
    Ok(Cluster {
        name: c.name.clone(),
        discovery,
        lb_policy,
        locality_weighted,
        circuit_breakers,
        outlier_detection,
        connect_timeout,
        protocol,
        http2,
        max_requests_per_connection,
        tls,
        slow_start,
    })
}

/// `slow_start_config` (the cluster's and the load-balancing policies' messages have the same
/// fields). No window: no slow start, as in Envoy.
/// The `slow_start_config` of a typed RoundRobin or LeastRequest policy.
fn typed_slow_start(
    sc: Option<
        &envoy_types::pb::envoy::extensions::load_balancing_policies::common::v3::SlowStartConfig,
    >,
) -> Result<Option<SlowStart>, FieldError> {
    let Some(sc) = sc else {
        return Ok(None);
    };
    slow_start_config(
        sc.slow_start_window.as_ref(),
        sc.aggression.as_ref(),
        sc.min_weight_percent.as_ref(),
    )
    .at("slow_start_config")
}

fn slow_start_config(
    window: Option<&envoy_types::pb::google::protobuf::Duration>,
    aggression: Option<&envoy_types::pb::envoy::config::core::v3::RuntimeDouble>,
    min_weight_percent: Option<&envoy_types::pb::envoy::r#type::v3::Percent>,
) -> Result<Option<SlowStart>, FieldError> {
    let Some(window) = window else {
        return Ok(None);
    };
    let window = duration(window).at("slow_start_window")?;
    if window.is_zero() {
        return Ok(None);
    }
    let aggression = aggression.map_or(1.0, |a| a.default_value);
    if !(aggression.is_finite() && aggression > 0.0) {
        return err(format!("must be greater than 0 (got {aggression})")).at("aggression");
    }
    let min = min_weight_percent.map_or(10.0, |p| p.value);
    if !(0.0..=100.0).contains(&min) {
        return err(format!("must be 0-100 (got {min})")).at("min_weight_percent");
    }
    Ok(Some(SlowStart {
        window,
        aggression,
        min_weight: min / 100.0,
    }))
}

fn legacy_lb_policy(c: &pb::Cluster) -> Result<LbPolicy, FieldError> {
    use pb::cluster::LbConfig as C;
    Ok(match c.lb_policy {
        0 => LbPolicy::RoundRobin,
        1 => LbPolicy::LeastRequest {
            choice_count: match &c.lb_config {
                Some(C::LeastRequestLbConfig(l)) => l.choice_count.map(|v| v.value).unwrap_or(2),
                _ => 2,
            },
        },
        2 => {
            let (min, max) = match &c.lb_config {
                Some(C::RingHashLbConfig(r)) => (
                    r.minimum_ring_size.map(|v| v.value),
                    r.maximum_ring_size.map(|v| v.value),
                ),
                _ => (None, None),
            };
            ring_hash(min, max).at("ring_hash_lb_config")?
        }
        3 => LbPolicy::Random,
        5 => LbPolicy::Maglev {
            table_size: match &c.lb_config {
                Some(C::MaglevLbConfig(m)) => m.table_size.map(|v| v.value).unwrap_or(65537),
                _ => 65537,
            },
        },
        6 => return err("CLUSTER_PROVIDED is not supported").at("lb_policy"),
        7 => {
            return err("LOAD_BALANCING_POLICY_CONFIG needs load_balancing_policy").at("lb_policy")
        }
        other => return err(format!("unknown lb_policy {other}")).at("lb_policy"),
    })
}

fn ring_hash(min: Option<u64>, max: Option<u64>) -> Result<LbPolicy, FieldError> {
    let min = min.unwrap_or(1024);
    let max = max.unwrap_or(MAX_RING_SIZE);
    if min > max || max > MAX_RING_SIZE || min == 0 {
        return err(format!(
            "ring sizes must satisfy 0 < minimum ({min}) <= maximum ({max}) <= {MAX_RING_SIZE}"
        ));
    }
    Ok(LbPolicy::RingHash {
        min_ring_size: min,
        max_ring_size: max,
    })
}

fn locality_weighted(cfg: Option<&lbp::common::v3::LocalityLbConfig>) -> bool {
    matches!(
        cfg.and_then(|c| c.locality_config_specifier.as_ref()),
        Some(
            lbp::common::v3::locality_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(
                _
            )
        )
    )
}

/// The first policy in the list the mesh implements, as gRPC picks it.
fn load_balancing_policy(
    p: &pb::LoadBalancingPolicy,
    slow_start: &mut Option<SlowStart>,
) -> Result<(LbPolicy, bool), FieldError> {
    let mut seen = Vec::new();
    for (i, policy) in p.policies.iter().enumerate() {
        let Some(any) = policy
            .typed_extension_config
            .as_ref()
            .and_then(|t| t.typed_config.as_ref())
        else {
            continue;
        };
        let name = type_name(any);
        let at = |r: Result<(LbPolicy, bool), FieldError>| {
            r.at("typed_extension_config").at_index("policies", i)
        };
        if name == lbp::round_robin::v3::RoundRobin::full_name() {
            let rr: lbp::round_robin::v3::RoundRobin = decode_any(any).at("typed_config")?;
            *slow_start = typed_slow_start(rr.slow_start_config.as_ref())
                .at("typed_extension_config")
                .at_index("policies", i)?;
            return Ok((
                LbPolicy::RoundRobin,
                locality_weighted(rr.locality_lb_config.as_ref()),
            ));
        } else if name == lbp::least_request::v3::LeastRequest::full_name() {
            let lr: lbp::least_request::v3::LeastRequest = decode_any(any).at("typed_config")?;
            *slow_start = typed_slow_start(lr.slow_start_config.as_ref())
                .at("typed_extension_config")
                .at_index("policies", i)?;
            let choice_count = lr.choice_count.map(|v| v.value).unwrap_or(2);
            if choice_count < 2 {
                return at(err("choice_count must be at least 2"));
            }
            return Ok((
                LbPolicy::LeastRequest { choice_count },
                locality_weighted(lr.locality_lb_config.as_ref()),
            ));
        } else if name == lbp::random::v3::Random::full_name() {
            let r: lbp::random::v3::Random = decode_any(any).at("typed_config")?;
            return Ok((
                LbPolicy::Random,
                locality_weighted(r.locality_lb_config.as_ref()),
            ));
        } else if name == lbp::ring_hash::v3::RingHash::full_name() {
            let r: lbp::ring_hash::v3::RingHash = decode_any(any).at("typed_config")?;
            let policy = at(ring_hash(
                r.minimum_ring_size.map(|v| v.value),
                r.maximum_ring_size.map(|v| v.value),
            )
            .map(|p| (p, false)))?;
            return Ok((policy.0, r.locality_weighted_lb_config.is_some()));
        } else if name == lbp::maglev::v3::Maglev::full_name() {
            let m: lbp::maglev::v3::Maglev = decode_any(any).at("typed_config")?;
            return Ok((
                LbPolicy::Maglev {
                    table_size: m.table_size.map(|v| v.value).unwrap_or(65537),
                },
                m.locality_weighted_lb_config.is_some(),
            ));
        } else if name == lbp::wrr_locality::v3::WrrLocality::full_name() {
            let w: lbp::wrr_locality::v3::WrrLocality = decode_any(any).at("typed_config")?;
            let child = w
                .endpoint_picking_policy
                .as_ref()
                .ok_or_else(|| FieldError::new("endpoint_picking_policy is required"));
            let (policy, _) = at(child
                .and_then(|c| load_balancing_policy(c, slow_start).at("endpoint_picking_policy")))?;
            return Ok((policy, true));
        }
        seen.push(name.to_owned());
    }
    err(format!("no supported policy among {seen:?}")).at("policies")
}

fn thresholds(t: &pb::circuit_breakers::Thresholds) -> Thresholds {
    let d = Thresholds::default();
    Thresholds {
        max_connections: t
            .max_connections
            .map(|v| v.value)
            .unwrap_or(d.max_connections),
        max_pending_requests: t
            .max_pending_requests
            .map(|v| v.value)
            .unwrap_or(d.max_pending_requests),
        max_requests: t.max_requests.map(|v| v.value).unwrap_or(d.max_requests),
        max_retries: t.max_retries.map(|v| v.value).unwrap_or(d.max_retries),
        retry_budget: t.retry_budget.as_ref().map(|b| RetryBudget {
            budget_percent: b.budget_percent.map(|p| p.value).unwrap_or(20.0),
            min_retry_concurrency: b.min_retry_concurrency.map(|v| v.value).unwrap_or(3),
        }),
    }
}

fn circuit_breakers(cb: Option<&pb::CircuitBreakers>) -> Result<CircuitBreakers, FieldError> {
    let mut out = CircuitBreakers::default();
    let Some(cb) = cb else {
        return Ok(out);
    };
    for (i, t) in cb.thresholds.iter().enumerate() {
        if let Some(b) = &t.retry_budget {
            if let Some(p) = b.budget_percent {
                if !(0.0..=100.0).contains(&p.value) {
                    return err(format!("budget_percent {} is outside 0..=100", p.value))
                        .at("retry_budget")
                        .at_index("thresholds", i);
                }
            }
        }
        match t.priority {
            0 => out.default = thresholds(t),
            1 => out.high = Some(thresholds(t)),
            other => {
                return err(format!("unknown priority {other}"))
                    .at("priority")
                    .at_index("thresholds", i)
            }
        }
    }
    out.per_host_max_connections = cb
        .per_host_thresholds
        .iter()
        .find(|t| t.priority == 0)
        .and_then(|t| t.max_connections.map(|v| v.value));
    Ok(out)
}

fn outlier(o: &pb::OutlierDetection) -> Result<OutlierDetection, FieldError> {
    let d = OutlierDetection::default();
    let pct = |v: Option<u32>, field: &'static str, default: u32| -> Result<u32, FieldError> {
        let v = v.unwrap_or(default);
        if v > 100 {
            return err(format!("{v} is over 100")).at(field);
        }
        Ok(v)
    };
    let val = |v: Option<envoy_types::pb::google::protobuf::UInt32Value>| v.map(|v| v.value);
    let interval = match &o.interval {
        Some(i) => duration(i).at("interval")?,
        None => d.interval,
    };
    if interval.is_zero() {
        return err("interval must be greater than 0").at("interval");
    }
    let base_ejection_time = match &o.base_ejection_time {
        Some(b) => duration(b).at("base_ejection_time")?,
        None => d.base_ejection_time,
    };
    let max_ejection_time = match &o.max_ejection_time {
        Some(m) => duration(m).at("max_ejection_time")?,
        None => d.max_ejection_time.max(base_ejection_time),
    };
    if max_ejection_time < base_ejection_time {
        return err("max_ejection_time is less than base_ejection_time").at("max_ejection_time");
    }
    let enforcing_5xx = pct(
        val(o.enforcing_consecutive_5xx),
        "enforcing_consecutive_5xx",
        100,
    )?;
    let enforcing_gw = pct(
        val(o.enforcing_consecutive_gateway_failure),
        "enforcing_consecutive_gateway_failure",
        0,
    )?;
    let enforcing_sr = pct(val(o.enforcing_success_rate), "enforcing_success_rate", 100)?;
    let enforcing_fp = pct(
        val(o.enforcing_failure_percentage),
        "enforcing_failure_percentage",
        0,
    )?;
    let nonzero = |v: u32, field: &'static str| -> Result<u32, FieldError> {
        if v == 0 {
            return err("must be greater than 0").at(field);
        }
        Ok(v)
    };
    Ok(OutlierDetection {
        interval,
        base_ejection_time,
        max_ejection_time,
        max_ejection_percent: pct(val(o.max_ejection_percent), "max_ejection_percent", 10)?,
        consecutive_5xx: (enforcing_5xx > 0)
            .then(|| {
                nonzero(val(o.consecutive_5xx).unwrap_or(5), "consecutive_5xx")
                    .map(|n| (n, enforcing_5xx))
            })
            .transpose()?,
        consecutive_gateway_failure: (enforcing_gw > 0)
            .then(|| {
                nonzero(
                    val(o.consecutive_gateway_failure).unwrap_or(5),
                    "consecutive_gateway_failure",
                )
                .map(|n| (n, enforcing_gw))
            })
            .transpose()?,
        success_rate: (enforcing_sr > 0).then(|| SuccessRateEjection {
            minimum_hosts: val(o.success_rate_minimum_hosts).unwrap_or(5),
            request_volume: val(o.success_rate_request_volume).unwrap_or(100),
            stdev_factor: val(o.success_rate_stdev_factor).unwrap_or(1900),
            enforcing: enforcing_sr,
        }),
        failure_percentage: if enforcing_fp > 0 {
            Some(FailurePercentageEjection {
                threshold: pct(
                    val(o.failure_percentage_threshold),
                    "failure_percentage_threshold",
                    85,
                )?,
                minimum_hosts: val(o.failure_percentage_minimum_hosts).unwrap_or(5),
                request_volume: val(o.failure_percentage_request_volume).unwrap_or(50),
                enforcing: enforcing_fp,
            })
        } else {
            None
        },
    })
}

type Protocol = (UpstreamProtocol, Option<Http2Options>, Option<u32>);

fn h2_options(o: &envoy_types::pb::envoy::config::core::v3::Http2ProtocolOptions) -> Http2Options {
    Http2Options {
        max_concurrent_streams: o.max_concurrent_streams.map(|v| v.value),
        initial_stream_window_size: o.initial_stream_window_size.map(|v| v.value),
        initial_connection_window_size: o.initial_connection_window_size.map(|v| v.value),
    }
}

fn protocol(c: &pb::Cluster) -> Result<Protocol, FieldError> {
    const KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
    for (key, any) in &c.typed_extension_protocol_options {
        if key != KEY || type_name(any) != HttpProtocolOptions::full_name() {
            return err(format!(
                "protocol options {key:?} of type {} are not supported (only {KEY})",
                type_name(any)
            ))
            .at_key("typed_extension_protocol_options", key);
        }
    }
    if let Some(any) = c.typed_extension_protocol_options.get(KEY) {
        let opts: HttpProtocolOptions =
            decode_any(any).at_key("typed_extension_protocol_options", KEY)?;
        let max_requests = opts
            .common_http_protocol_options
            .as_ref()
            .and_then(|o| o.max_requests_per_connection.map(|v| v.value));
        use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
            explicit_http_config::ProtocolConfig as P, UpstreamProtocolOptions as U,
        };
        let (protocol, h2) = match &opts.upstream_protocol_options {
            Some(U::ExplicitHttpConfig(e)) => match &e.protocol_config {
                Some(P::Http2ProtocolOptions(h2)) => {
                    (UpstreamProtocol::Http2, Some(h2_options(h2)))
                }
                Some(P::HttpProtocolOptions(_)) | None => (UpstreamProtocol::Http1, None),
                Some(P::Http3ProtocolOptions(_)) => {
                    return err("HTTP/3 upstreams are not supported")
                        .at("explicit_http_config")
                        .at_key("typed_extension_protocol_options", KEY)
                }
            },
            Some(U::AutoConfig(a)) => (
                UpstreamProtocol::Auto,
                a.http2_protocol_options.as_ref().map(h2_options),
            ),
            Some(U::UseDownstreamProtocolConfig(_)) | None => (UpstreamProtocol::Auto, None),
        };
        return Ok((protocol, h2, max_requests));
    }
    #[allow(deprecated)]
    let legacy = match &c.http2_protocol_options {
        Some(h2) => (UpstreamProtocol::Http2, Some(h2_options(h2))),
        None => (UpstreamProtocol::Http1, None),
    };
    #[allow(deprecated)]
    let max_requests = c.max_requests_per_connection.map(|v| v.value);
    Ok((legacy.0, legacy.1, max_requests))
}

/// Where a DNS cluster's settings were read from (the cluster's own fields, or the
/// `envoy.clusters.dns` extension's).
struct DnsSettings<'a> {
    refresh_rate: Option<&'a envoy_types::pb::google::protobuf::Duration>,
    respect_ttl: bool,
    family: i32,
    resolver: Option<&'a envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig>,
    logical: bool,
}

/// Adds the path segments `at` (innermost first) to an error.
fn at_all<T>(r: Result<T, FieldError>, at: &[&'static str]) -> Result<T, FieldError> {
    at.iter().fold(r, |r, seg| r.at(*seg))
}

/// A DNS cluster: the names of its load assignment and how to resolve them (Envoy's
/// semantics: every address of every name an endpoint, or one endpoint for LOGICAL_DNS).
/// `at` is where the settings were read (empty: the cluster's own fields).
fn dns(
    c: &pb::Cluster,
    settings: DnsSettings<'_>,
    at: &[&'static str],
) -> Result<DnsDiscovery, FieldError> {
    let refresh_rate = match settings.refresh_rate {
        None => Duration::from_secs(5),
        Some(d) => {
            let d = at_all(duration(d).at("dns_refresh_rate"), at)?;
            if d < Duration::from_millis(1) {
                return at_all(err("must be at least 1ms").at("dns_refresh_rate"), at);
            }
            d
        }
    };
    use envoy_types::pb::envoy::config::cluster::v3::cluster::DnsLookupFamily as F;
    let family = match F::try_from(settings.family) {
        Ok(F::Auto) => DnsLookupFamily::Auto,
        Ok(F::V4Only) => DnsLookupFamily::V4Only,
        Ok(F::V6Only) => DnsLookupFamily::V6Only,
        Ok(F::V4Preferred) => DnsLookupFamily::V4Preferred,
        Ok(F::All) => DnsLookupFamily::All,
        Err(_) => {
            return at_all(
                err(format!("unknown dns_lookup_family {}", settings.family))
                    .at("dns_lookup_family"),
                at,
            )
        }
    };
    let mut nameservers = Vec::new();
    if let Some(r) = settings.resolver {
        use envoy_types::pb::envoy::extensions::network::dns_resolver::cares::v3::CaresDnsResolverConfig;
        let cares: CaresDnsResolverConfig = match r.typed_config.as_ref() {
            Some(any) if type_name(any) == CaresDnsResolverConfig::full_name() => at_all(
                decode_any(any)
                    .at("typed_config")
                    .at("typed_dns_resolver_config"),
                at,
            )?,
            _ => {
                return at_all(
                    err(format!(
                        "DNS resolver {:?} is not supported (only envoy.network.dns_resolver.cares with resolvers)",
                        r.name
                    ))
                    .at("typed_dns_resolver_config"),
                    at,
                )
            }
        };
        for (i, a) in cares.resolvers.iter().enumerate() {
            nameservers.push(at_all(
                super::listener::socket_address(a)
                    .at_index("resolvers", i)
                    .at("typed_config")
                    .at("typed_dns_resolver_config"),
                at,
            )?);
        }
    }
    let cla = c
        .load_assignment
        .as_ref()
        .ok_or_else(|| FieldError::new("a DNS cluster needs load_assignment"))
        .at("load_assignment")?;
    let mut localities = Vec::with_capacity(cla.endpoints.len());
    for (i, l) in cla.endpoints.iter().enumerate() {
        let mut targets = Vec::new();
        for (j, e) in l.lb_endpoints.iter().enumerate() {
            targets.push(
                dns_target(e)
                    .at_index("lb_endpoints", j)
                    .at_index("endpoints", i)
                    .at("load_assignment")?,
            );
        }
        localities.push(DnsLocality {
            locality: l
                .locality
                .as_ref()
                .map(|l| Locality {
                    region: l.region.clone(),
                    zone: l.zone.clone(),
                    sub_zone: l.sub_zone.clone(),
                })
                .unwrap_or_default(),
            weight: l.load_balancing_weight.map(|w| w.value).unwrap_or(0),
            priority: l.priority,
            targets,
        });
    }
    let names: usize = localities.iter().map(|l| l.targets.len()).sum();
    if settings.logical && names != 1 {
        return err(format!(
            "a LOGICAL_DNS cluster needs exactly one endpoint (it has {names})"
        ))
        .at("load_assignment");
    }
    Ok(DnsDiscovery {
        logical: settings.logical,
        localities,
        refresh_rate,
        respect_ttl: settings.respect_ttl,
        family,
        nameservers,
    })
}

fn dns_target(
    e: &envoy_types::pb::envoy::config::endpoint::v3::LbEndpoint,
) -> Result<DnsTarget, FieldError> {
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
        return err("endpoint is required");
    };
    let sa = match ep.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(core::address::Address::SocketAddress(sa)) => sa,
        _ => {
            return err("socket_address is required")
                .at("address")
                .at("endpoint")
        }
    };
    if sa.address.is_empty() {
        return err("a host name is required")
            .at("address")
            .at("socket_address")
            .at("address")
            .at("endpoint");
    }
    let port = match sa.port_specifier {
        Some(core::socket_address::PortSpecifier::PortValue(p)) if (1..=65535).contains(&p) => {
            p as u16
        }
        _ => {
            return err("port_value (1..65535) is required")
                .at("socket_address")
                .at("address")
                .at("endpoint")
        }
    };
    let weight = super::endpoint::endpoint_weight(e)?;
    let health = super::endpoint::health_status(e.health_status)?;
    Ok(DnsTarget {
        host: sa.address.trim_end_matches('.').to_owned(),
        port,
        weight,
        health,
    })
}
