//! `ClusterLoadAssignment` (EDS) translation.

use envoy_types::pb::envoy::config::endpoint::v3 as pb;

use super::listener::socket_address;
use super::{err, fraction, At, FieldError, TranslateError};
use crate::config::*;
use crate::xds::ResourceType;

impl TryFrom<&pb::ClusterLoadAssignment> for EndpointAssignment {
    type Error = TranslateError;

    fn try_from(cla: &pb::ClusterLoadAssignment) -> Result<Self, Self::Error> {
        assignment(cla)
            .and_then(|a| super::ledger::check_resource(cla).map(|()| a))
            .map_err(|e| e.into_error(ResourceType::ClusterLoadAssignment, &cla.cluster_name))
    }
}

impl TryFrom<pb::ClusterLoadAssignment> for EndpointAssignment {
    type Error = TranslateError;

    fn try_from(cla: pb::ClusterLoadAssignment) -> Result<Self, Self::Error> {
        EndpointAssignment::try_from(&cla)
    }
}

pub(crate) fn assignment(
    cla: &pb::ClusterLoadAssignment,
) -> Result<EndpointAssignment, FieldError> {
    if cla.cluster_name.is_empty() {
        return err("cluster_name is empty").at("cluster_name");
    }
    let mut localities = Vec::with_capacity(cla.endpoints.len());
    for (i, l) in cla.endpoints.iter().enumerate() {
        let locality = l
            .locality
            .as_ref()
            .map(|l| Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                sub_zone: l.sub_zone.clone(),
            })
            .unwrap_or_default();
        let mut endpoints = Vec::with_capacity(l.lb_endpoints.len());
        for (j, e) in l.lb_endpoints.iter().enumerate() {
            endpoints.push(
                lb_endpoint(e)
                    .at_index("lb_endpoints", j)
                    .at_index("endpoints", i)?,
            );
        }
        let weight = l.load_balancing_weight.map(|w| w.value).unwrap_or(0);
        localities.push(LocalityEndpoints {
            locality,
            weight,
            priority: l.priority,
            endpoints,
        });
    }
    // Priorities must be contiguous from 0 (gRPC rejects gaps; Envoy would route nothing).
    let mut priorities: Vec<u32> = localities.iter().map(|l| l.priority).collect();
    priorities.sort_unstable();
    priorities.dedup();
    if let Some((i, p)) = priorities
        .iter()
        .enumerate()
        .find(|(i, p)| **p as usize != *i)
    {
        return err(format!(
            "priorities must be contiguous from 0, but priority {p} is used and {i} is not"
        ))
        .at("endpoints");
    }
    localities.sort_by_key(|l| l.priority);
    let mut drop_overloads = Vec::new();
    if let Some(policy) = &cla.policy {
        for (i, d) in policy.drop_overloads.iter().enumerate() {
            drop_overloads.push(DropOverload {
                category: d.category.clone(),
                fraction: fraction(d.drop_percentage.as_ref(), Fraction::per_million(0))
                    .at("drop_percentage")
                    .at_index("drop_overloads", i)
                    .at("policy")?,
            });
        }
    }
    Ok(EndpointAssignment {
        cluster_name: cla.cluster_name.clone(),
        localities,
        drop_overloads,
    })
}

fn lb_endpoint(e: &pb::LbEndpoint) -> Result<Endpoint, FieldError> {
    let ep = match &e.host_identifier {
        Some(pb::lb_endpoint::HostIdentifier::Endpoint(ep)) => ep,
        Some(pb::lb_endpoint::HostIdentifier::EndpointName(n)) => {
            return err(format!("named endpoint {n:?} is not supported")).at("endpoint_name")
        }
        None => return err("endpoint is required"),
    };
    let address = socket_address(
        ep.address
            .as_ref()
            .ok_or_else(|| FieldError::new("address is required"))
            .at("endpoint")?,
    )
    .at("address")
    .at("endpoint")?;
    let weight = endpoint_weight(e)?;
    let health = health_status(e.health_status)?;
    Ok(Endpoint {
        address,
        weight,
        health,
        hostname: ep.hostname.clone(),
    })
}

/// An endpoint's `load_balancing_weight` (default 1; 0 is refused).
pub(crate) fn endpoint_weight(e: &pb::LbEndpoint) -> Result<u32, FieldError> {
    match e.load_balancing_weight {
        None => Ok(1),
        Some(w) if w.value == 0 => {
            err("load_balancing_weight must be at least 1").at("load_balancing_weight")
        }
        Some(w) => Ok(w.value),
    }
}

/// An endpoint's `health_status`.
pub(crate) fn health_status(h: i32) -> Result<HealthStatus, FieldError> {
    Ok(match h {
        0 => HealthStatus::Unknown,
        1 => HealthStatus::Healthy,
        2 => HealthStatus::Unhealthy,
        3 => HealthStatus::Draining,
        4 => HealthStatus::Timeout,
        5 => HealthStatus::Degraded,
        other => return err(format!("unknown health_status {other}")).at("health_status"),
    })
}
