//! A cluster's discovery type: EDS, static, DNS or aggregate.

use super::endpoint::assignment;
use super::{decode_any, duration, err, type_name, At, FieldError};
use crate::config::*;
use envoy_types::pb::envoy::config::cluster::v3 as pb;
use prost::Name;
use std::sync::Arc;
use std::time::Duration;

/// How a cluster finds its endpoints: EDS, a static assignment, DNS (STRICT_DNS,
/// LOGICAL_DNS or the DNS cluster extension) or an aggregate of other clusters.
pub(super) fn discovery(c: &pb::Cluster) -> Result<Discovery, FieldError> {
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
            aggregate(c, ct)?
        }
        Some(D::ClusterType(ct))
            if ct.typed_config.as_ref().map(type_name)
                == Some("envoy.extensions.clusters.dns.v3.DnsCluster") =>
        {
            dns_extension(c, ct)?
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
    Ok(discovery)
}

/// Where a DNS cluster's settings were read from (the cluster's own fields, or the
/// `envoy.clusters.dns` extension's).
pub(super) struct DnsSettings<'a> {
    refresh_rate: Option<&'a envoy_types::pb::google::protobuf::Duration>,
    respect_ttl: bool,
    family: i32,
    resolver: Option<&'a envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig>,
    logical: bool,
}

/// Adds the path segments `at` (innermost first) to an error.
pub(super) fn at_all<T>(r: Result<T, FieldError>, at: &[&'static str]) -> Result<T, FieldError> {
    at.iter().fold(r, |r, seg| r.at(*seg))
}

/// A DNS cluster: the names of its load assignment and how to resolve them (Envoy's
/// semantics: every address of every name an endpoint, or one endpoint for LOGICAL_DNS).
/// `at` is where the settings were read (empty: the cluster's own fields).
pub(super) fn dns(
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
    let nameservers = match settings.resolver {
        Some(r) => nameservers(r, at)?,
        None => Vec::new(),
    };
    let cla = c
        .load_assignment
        .as_ref()
        .ok_or_else(|| FieldError::new("a DNS cluster needs load_assignment"))
        .at("load_assignment")?;
    let localities = dns_localities(cla)?;
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

pub(super) fn dns_target(
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

/// The name servers of a cluster's `typed_dns_resolver_config` (c-ares with resolvers only).
fn nameservers(
    r: &envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig,
    at: &[&'static str],
) -> Result<Vec<std::net::SocketAddr>, FieldError> {
    let mut nameservers = Vec::new();
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
    Ok(nameservers)
}

/// The host names of a DNS cluster's `load_assignment`, by locality.
fn dns_localities(
    cla: &envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment,
) -> Result<Vec<DnsLocality>, FieldError> {
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
    Ok(localities)
}

/// An aggregate cluster (`envoy.extensions.clusters.aggregate.v3.ClusterConfig`): its
/// clusters, in priority order.
fn aggregate(
    c: &pb::Cluster,
    ct: &envoy_types::pb::envoy::config::cluster::v3::cluster::CustomClusterType,
) -> Result<Discovery, FieldError> {
    use envoy_types::pb::envoy::extensions::clusters::aggregate::v3::ClusterConfig;
    let agg: ClusterConfig = extension_config(ct)?;
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
    Ok(Discovery::Aggregate(agg.clusters.into()))
}

/// A cluster of the DNS cluster extension (`envoy.extensions.clusters.dns.v3.DnsCluster`).
fn dns_extension(
    c: &pb::Cluster,
    ct: &envoy_types::pb::envoy::config::cluster::v3::cluster::CustomClusterType,
) -> Result<Discovery, FieldError> {
    use envoy_types::pb::envoy::extensions::clusters::dns::v3::DnsCluster;
    let d: DnsCluster = extension_config(ct)?;
    let settings = DnsSettings {
        refresh_rate: d.dns_refresh_rate.as_ref(),
        respect_ttl: d.respect_dns_ttl,
        family: d.dns_lookup_family,
        resolver: d.typed_dns_resolver_config.as_ref(),
        logical: d.all_addresses_in_single_endpoint,
    };
    Ok(Discovery::Dns(Arc::new(dns(
        c,
        settings,
        &["typed_config", "cluster_type"],
    )?)))
}

/// The `typed_config` of a custom cluster type, decoded.
fn extension_config<T: prost::Message + Default + prost::Name>(
    ct: &envoy_types::pb::envoy::config::cluster::v3::cluster::CustomClusterType,
) -> Result<T, FieldError> {
    let any = ct
        .typed_config
        .as_ref()
        .ok_or_else(|| FieldError::new("typed_config is required"))
        .at("cluster_type")?;
    decode_any(any).at("typed_config").at("cluster_type")
}
