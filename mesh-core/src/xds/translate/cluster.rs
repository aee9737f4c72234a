//! `Cluster` (CDS) translation.

use super::tls::{upstream, Socket};
use super::{decode_any, duration, err, type_name, At, FieldError, TranslateError};
use crate::config::*;
use crate::xds::ResourceType;
use envoy_types::pb::envoy::config::cluster::v3 as pb;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use prost::Name;
use std::time::Duration;

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
    let discovery = super::discovery::discovery(c)?;

    let (lb_policy, locality_weighted, slow_start) = super::lb::lb(c, &discovery)?;

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
