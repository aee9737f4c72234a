//! The fault injection HTTP filter (`envoy.extensions.filters.http.fault.v3.HTTPFault`).

use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as pb;

use super::matcher::header_matcher;
use super::{duration, err, fraction, At, FieldError};
use crate::config::{AbortKind, FaultAbort, FaultConfig, FaultDelay, Fraction};

pub(crate) fn fault(f: &pb::HttpFault) -> Result<FaultConfig, FieldError> {
    let delay = match &f.delay {
        None => None,
        Some(d) => {
            let duration = match &d.fault_delay_secifier {
                Some(FaultDelaySecifier::FixedDelay(fd)) => {
                    duration(fd).at("fixed_delay").at("delay")?
                }
                Some(FaultDelaySecifier::HeaderDelay(_)) => {
                    return err("header_delay is not supported; use fixed_delay").at("delay")
                }
                None => return err("fixed_delay is required").at("delay"),
            };
            Some(FaultDelay {
                duration,
                fraction: fraction(d.percentage.as_ref(), Fraction::per_million(0))
                    .at("percentage")
                    .at("delay")?,
            })
        }
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => {
            use pb::fault_abort::ErrorType;
            let kind = match &a.error_type {
                Some(ErrorType::HttpStatus(s)) if (200..600).contains(s) => {
                    AbortKind::Http(*s as u16)
                }
                Some(ErrorType::HttpStatus(s)) => {
                    return err(format!("http_status {s} is outside 200..600"))
                        .at("http_status")
                        .at("abort")
                }
                Some(ErrorType::GrpcStatus(s)) if *s <= 16 => AbortKind::Grpc(*s),
                Some(ErrorType::GrpcStatus(s)) => {
                    return err(format!(
                        "grpc_status {s} is not a gRPC status code (0..=16)"
                    ))
                    .at("grpc_status")
                    .at("abort")
                }
                Some(ErrorType::HeaderAbort(_)) => {
                    return err("header_abort is not supported; use http_status or grpc_status")
                        .at("abort")
                }
                None => return err("one of http_status or grpc_status is required").at("abort"),
            };
            Some(FaultAbort {
                kind,
                fraction: fraction(a.percentage.as_ref(), Fraction::per_million(0))
                    .at("percentage")
                    .at("abort")?,
            })
        }
    };
    let headers = f
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| header_matcher(h).at_index("headers", i))
        .collect::<Result<_, _>>()?;
    Ok(FaultConfig {
        delay,
        abort,
        max_active_faults: f.max_active_faults.map(|v| v.value),
        headers,
    })
}
