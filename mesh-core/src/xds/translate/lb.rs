//! A cluster's load balancing: policy, locality weighting, ring hash and slow start.

use super::{decode_any, duration, err, type_name, At, FieldError};
use crate::config::*;
use envoy_types::pb::envoy::config::cluster::v3 as pb;
use envoy_types::pb::envoy::extensions::load_balancing_policies as lbp;
use prost::Name;

/// A cluster's load balancing: the policy, whether localities are weighted, and slow start
/// (from `load_balancing_policy`, or the legacy `lb_policy` and `lb_config`).
pub(super) fn lb(
    c: &pb::Cluster,
    discovery: &Discovery,
) -> Result<(LbPolicy, bool, Option<SlowStart>), FieldError> {
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

    Ok((lb_policy, locality_weighted, slow_start))
}

/// gRPC's cap on ring sizes.
pub(super) const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;

/// `slow_start_config` (the cluster's and the load-balancing policies' messages have the same
/// fields). No window: no slow start, as in Envoy.
/// The `slow_start_config` of a typed RoundRobin or LeastRequest policy.
pub(super) fn typed_slow_start(
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

pub(super) fn slow_start_config(
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

pub(super) fn legacy_lb_policy(c: &pb::Cluster) -> Result<LbPolicy, FieldError> {
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

pub(super) fn ring_hash(min: Option<u64>, max: Option<u64>) -> Result<LbPolicy, FieldError> {
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

pub(super) fn locality_weighted(cfg: Option<&lbp::common::v3::LocalityLbConfig>) -> bool {
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
pub(super) fn load_balancing_policy(
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
