//! Clusters: one per service and DestinationRule subset, with the rule's traffic policy
//! (load balancing, slow start, connection pool, outlier detection, TLS) and the endpoint
//! assignment of its workloads.

use super::common::*;
use crate::istio::index::{Service, Workload};
use crate::istio::{ConfigError, Doc, Seg, TrafficPolicy};
use envoy_types::pb::envoy::config::cluster::v3 as cpb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as epb;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as upstream_http;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Checks what the schema cannot: every `portLevelSettings` entry names its port (Istio
/// requires it), and every `tls` block is one meshctl can honour exactly.
pub(super) fn check_rule(
    dr: &Doc<crate::istio::DestinationRuleSpec>,
    errors: &mut Vec<ConfigError>,
) {
    let mut places: Vec<(Vec<Seg<'static>>, &TrafficPolicy)> = Vec::new();
    if let Some(p) = &dr.spec.traffic_policy {
        places.push((vec![Seg::Key("spec"), Seg::Key("trafficPolicy")], p));
    }
    for (i, s) in dr.spec.subsets.iter().enumerate() {
        if let Some(p) = &s.traffic_policy {
            places.push((
                vec![
                    Seg::Key("spec"),
                    Seg::Key("subsets"),
                    Seg::Idx(i),
                    Seg::Key("trafficPolicy"),
                ],
                p,
            ));
        }
    }
    let mut error = |path: &[Seg<'_>], message: String| {
        errors.push(dr.origin.at(
            path,
            format!(
                "DestinationRule {}: {}: {message}",
                dr.meta.name,
                crate::istio::origin::path_text(path)
            ),
        ));
    };
    // Outlier detection reaches a policy from itself or the host policy it is merged with.
    let host_od = dr
        .spec
        .traffic_policy
        .as_ref()
        .is_some_and(|p| p.outlier_detection.is_some());
    for (path, policy) in places {
        let mut tls_blocks = Vec::new();
        let mut lb_blocks = Vec::new();
        let od = host_od || policy.outlier_detection.is_some();
        if let Some(tls) = &policy.tls {
            tls_blocks.push(([path.as_slice(), &[Seg::Key("tls")]].concat(), tls));
        }
        if let Some(lb) = &policy.load_balancer {
            lb_blocks.push((
                [path.as_slice(), &[Seg::Key("loadBalancer")]].concat(),
                lb,
                od,
            ));
        }
        for (j, pl) in policy.port_level_settings.iter().enumerate() {
            let at = [
                path.as_slice(),
                &[Seg::Key("portLevelSettings"), Seg::Idx(j)],
            ]
            .concat();
            if pl.port.as_ref().is_none_or(|p| p.number == 0) {
                error(
                    &[at.as_slice(), &[Seg::Key("port")]].concat(),
                    "a port number is required".into(),
                );
            }
            if let Some(tls) = &pl.tls {
                tls_blocks.push(([at.as_slice(), &[Seg::Key("tls")]].concat(), tls));
            }
            if let Some(lb) = &pl.load_balancer {
                let od = od || pl.outlier_detection.is_some();
                lb_blocks.push((
                    [at.as_slice(), &[Seg::Key("loadBalancer")]].concat(),
                    lb,
                    od,
                ));
            }
        }
        for (at, lb, od) in lb_blocks {
            check_lb(&at, lb, od, &mut error);
        }
        for (at, tls) in tls_blocks {
            check_tls(&at, tls, &mut error);
        }
    }
}

/// A `loadBalancer` block: its warmup and its locality settings (`od`: outlier detection
/// reaches it).
fn check_lb(
    at: &[Seg<'static>],
    lb: &crate::istio::LoadBalancer,
    od: bool,
    error: &mut impl FnMut(&[Seg<'_>], String),
) {
    check_warmup(at, lb, error);
    if let Some(setting) = &lb.locality_lb_setting {
        let base = [at, &[Seg::Key("localityLbSetting")]].concat();
        crate::istio::locality::check(setting, od, &mut |rel, index, message| {
            let mut path = base.clone();
            for (k, key) in rel.iter().enumerate() {
                path.push(Seg::Key(key));
                if k == 0 {
                    if let Some(i) = index {
                        path.push(Seg::Idx(i));
                    }
                }
            }
            error(&path, message);
        });
    }
}

/// A `tls` block: a known mode, and only the settings that mode reads.
fn check_tls(
    at: &[Seg<'static>],
    tls: &crate::istio::Tls,
    error: &mut impl FnMut(&[Seg<'_>], String),
) {
    let field = |name: &'static str| [at, &[Seg::Key(name)]].concat();
    let mode = tls.mode.as_deref().unwrap_or("DISABLE");
    let external = matches!(mode, "SIMPLE" | "MUTUAL");
    if !matches!(mode, "DISABLE" | "SIMPLE" | "MUTUAL" | "ISTIO_MUTUAL") {
        error(
            &field("mode"),
            format!("{mode:?} is not a TLS mode (DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL)"),
        );
        return;
    }
    // Settings that only SIMPLE and MUTUAL read would be silently unused otherwise.
    let set = [
        ("caCertificates", tls.ca_certificates.is_some()),
        ("sni", tls.sni.is_some()),
        ("subjectAltNames", !tls.subject_alt_names.is_empty()),
    ];
    for (name, is_set) in set {
        if is_set && !external {
            error(
                &field(name),
                format!("applies to modes SIMPLE and MUTUAL only (mode is {mode})"),
            );
        }
    }
    for (name, is_set) in [
        ("clientCertificate", tls.client_certificate.is_some()),
        ("privateKey", tls.private_key.is_some()),
    ] {
        if mode == "MUTUAL" && !is_set {
            error(&field(name), "is required with mode MUTUAL".into());
        }
        if mode != "MUTUAL" && is_set {
            error(
                &field(name),
                format!("applies to mode MUTUAL only (mode is {mode})"),
            );
        }
    }
}

/// `loadBalancer.warmup` / `warmupDurationSecs`: slow start exists for ROUND_ROBIN and
/// LEAST_REQUEST only (as in Istio and Envoy), needs a duration of at least 1 ms, a minimum
/// percent of 0-100 and a positive aggression.
pub(super) fn check_warmup(
    at: &[Seg<'static>],
    lb: &crate::istio::LoadBalancer,
    error: &mut impl FnMut(&[Seg<'_>], String),
) {
    let field = |name: &'static str| [at, &[Seg::Key(name)]].concat();
    let named = if lb.warmup.is_some() {
        "warmup"
    } else if lb.warmup_duration_secs.is_some() {
        "warmupDurationSecs"
    } else {
        return;
    };
    let policy = match (&lb.consistent_hash, lb.simple.as_deref()) {
        (Some(_), _) => Some("consistentHash"),
        (None, None | Some("ROUND_ROBIN" | "LEAST_REQUEST" | "LEAST_CONN")) => None,
        (None, Some(other)) => Some(other),
    };
    if let Some(policy) = policy {
        error(
            &field(named),
            format!(
                "slow start applies to ROUND_ROBIN and LEAST_REQUEST only (the policy is {policy})"
            ),
        );
    }
    let mut window = |path: Vec<Seg<'static>>, d: Option<&String>| match d {
        None => error(&path, "is required".into()),
        Some(d) => match parse_duration(d) {
            Some(w) if w >= Duration::from_millis(1) => {}
            Some(_) => error(&path, format!("{d:?} is shorter than 1ms")),
            None => error(&path, format!("invalid duration {d:?} (use e.g. 30s, 2m)")),
        },
    };
    match &lb.warmup {
        Some(w) => {
            let at = field("warmup");
            let sub = |name: &'static str| [at.as_slice(), &[Seg::Key(name)]].concat();
            window(sub("duration"), w.duration.as_ref());
            if let Some(p) = w.minimum_percent.filter(|p| !(0.0..=100.0).contains(p)) {
                error(&sub("minimumPercent"), format!("must be 0-100 (got {p})"));
            }
            if let Some(a) = w.aggression.filter(|a| !(a.is_finite() && *a > 0.0)) {
                error(
                    &sub("aggression"),
                    format!("must be greater than 0 (got {a})"),
                );
            }
        }
        None => window(
            field("warmupDurationSecs"),
            lb.warmup_duration_secs.as_ref(),
        ),
    }
}

/// The slow-start config of a load balancer block (`warmup` before the deprecated
/// `warmupDurationSecs`), as Istio builds it; `None` without one or when it does not parse
/// (`check_rule` reports that).
pub(super) fn slow_start(lb: &crate::istio::LoadBalancer) -> Option<cpb::cluster::SlowStartConfig> {
    let (window, min, aggression) = match &lb.warmup {
        Some(w) => (w.duration.as_deref()?, w.minimum_percent, w.aggression),
        None => (lb.warmup_duration_secs.as_deref()?, None, None),
    };
    let window = parse_duration(window).filter(|w| !w.is_zero())?;
    Some(cpb::cluster::SlowStartConfig {
        slow_start_window: Some(pb_duration(window)),
        aggression: aggression.map(|a| core::RuntimeDouble {
            default_value: a,
            runtime_key: "upstream.istio.slowstart.aggression".into(),
        }),
        min_weight_percent: min.map(|value| envoy_types::pb::envoy::r#type::v3::Percent { value }),
    })
}

pub(super) fn assignment(name: &str, workloads: &[&Workload]) -> epb::ClusterLoadAssignment {
    let mut by_locality: BTreeMap<&str, Vec<&Workload>> = BTreeMap::new();
    for w in workloads {
        by_locality.entry(w.locality.as_str()).or_default().push(w);
    }
    epb::ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: by_locality
            .into_iter()
            .map(|(loc, ws)| {
                let mut parts = loc.splitn(3, '/');
                epb::LocalityLbEndpoints {
                    locality: Some(core::Locality {
                        region: parts.next().unwrap_or_default().to_owned(),
                        zone: parts.next().unwrap_or_default().to_owned(),
                        sub_zone: parts.next().unwrap_or_default().to_owned(),
                    }),
                    load_balancing_weight: u32v(ws.iter().map(|w| w.weight).sum::<u32>().max(1)),
                    lb_endpoints: ws
                        .iter()
                        .map(|w| epb::LbEndpoint {
                            host_identifier: Some(epb::lb_endpoint::HostIdentifier::Endpoint(
                                epb::Endpoint {
                                    address: Some(socket(&w.address, w.port)),
                                    ..Default::default()
                                },
                            )),
                            load_balancing_weight: u32v(w.weight),
                            health_status: core::HealthStatus::Healthy as i32,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }
            })
            .collect(),
        ..Default::default()
    }
}

impl Ctx<'_> {
    pub(super) fn cluster(
        &mut self,
        svc: &Service,
        name: &str,
        policy: &TrafficPolicy,
        workloads: &[&Workload],
        dr: Option<&Doc<crate::istio::DestinationRuleSpec>>,
    ) -> cpb::Cluster {
        let origin = dr.map(|d| d.origin.clone());
        let tp = [Seg::Key("spec"), Seg::Key("trafficPolicy")];
        let (lb_policy, lb_config) = self.lb_policy(policy, dr);
        let pool = policy.connection_pool.as_ref();
        let thresholds = thresholds(pool);
        let connect_timeout = pool
            .and_then(|p| p.tcp.as_ref())
            .and_then(|t| t.connect_timeout.clone())
            .and_then(|s| {
                let o = origin.clone()?;
                self.duration(
                    &o,
                    &[
                        tp[0],
                        tp[1],
                        Seg::Key("connectionPool"),
                        Seg::Key("tcp"),
                        Seg::Key("connectTimeout"),
                    ],
                    &s,
                )
            })
            .unwrap_or(Duration::from_secs(10));
        let outlier = policy
            .outlier_detection
            .as_ref()
            .map(|od| self.outlier_detection(od, dr));
        let typed_extension_protocol_options = if svc.http2() {
            http2_options()
        } else {
            Default::default()
        };
        let transport_socket = self.transport_socket(svc, name, policy, workloads);
        cpb::Cluster {
            name: name.to_owned(),
            cluster_discovery_type: Some(cpb::cluster::ClusterDiscoveryType::Type(
                cpb::cluster::DiscoveryType::Eds as i32,
            )),
            eds_cluster_config: Some(cpb::cluster::EdsClusterConfig {
                eds_config: Some(ads_source()),
                service_name: name.to_owned(),
            }),
            connect_timeout: Some(pb_duration(connect_timeout)),
            lb_policy: lb_policy as i32,
            lb_config,
            circuit_breakers: Some(cpb::CircuitBreakers {
                thresholds: vec![thresholds],
                ..Default::default()
            }),
            outlier_detection: outlier,
            typed_extension_protocol_options,
            transport_socket,
            ..Default::default()
        }
    }

    /// The load-balancing policy of a traffic policy, with its slow-start config.
    fn lb_policy(
        &mut self,
        policy: &TrafficPolicy,
        dr: Option<&Doc<crate::istio::DestinationRuleSpec>>,
    ) -> (cpb::cluster::LbPolicy, Option<cpb::cluster::LbConfig>) {
        let origin = dr.map(|d| d.origin.clone());
        let tp = [Seg::Key("spec"), Seg::Key("trafficPolicy")];
        let lb = policy.load_balancer.as_ref();
        let lb_policy = match (
            lb.and_then(|l| l.simple.as_deref()),
            lb.and_then(|l| l.consistent_hash.as_ref()),
        ) {
            (_, Some(_)) => cpb::cluster::LbPolicy::RingHash,
            // Without a choice, what Istio's generator for proxyless gRPC sends: gRPC clients
            // reject a Cluster whose legacy `lb_policy` is LEAST_REQUEST.
            (Some("ROUND_ROBIN") | None, _) => cpb::cluster::LbPolicy::RoundRobin,
            (Some("RANDOM"), _) => cpb::cluster::LbPolicy::Random,
            (Some("LEAST_REQUEST") | Some("LEAST_CONN"), _) => cpb::cluster::LbPolicy::LeastRequest,
            (Some(other), _) => {
                if let Some(o) = &origin {
                    self.errors.push(o.at(
                        &[tp[0], tp[1], Seg::Key("loadBalancer"), Seg::Key("simple")],
                        format!(
                            "DestinationRule {}: unsupported loadBalancer.simple {other:?}",
                            dr.map_or("", |d| d.meta.name.as_str())
                        ),
                    ));
                }
                cpb::cluster::LbPolicy::LeastRequest
            }
        };
        let lb_config = lb.and_then(slow_start).and_then(|ss| match lb_policy {
            cpb::cluster::LbPolicy::RoundRobin => Some(cpb::cluster::LbConfig::RoundRobinLbConfig(
                cpb::cluster::RoundRobinLbConfig {
                    slow_start_config: Some(ss),
                },
            )),
            cpb::cluster::LbPolicy::LeastRequest => Some(
                cpb::cluster::LbConfig::LeastRequestLbConfig(cpb::cluster::LeastRequestLbConfig {
                    slow_start_config: Some(ss),
                    ..Default::default()
                }),
            ),
            // Refused by `check_rule`.
            _ => None,
        });
        (lb_policy, lb_config)
    }

    /// Outlier detection as Istio maps it (the success-rate detector off).
    fn outlier_detection(
        &mut self,
        od: &crate::istio::OutlierDetection,
        dr: Option<&Doc<crate::istio::DestinationRuleSpec>>,
    ) -> cpb::OutlierDetection {
        let origin = dr.map(|d| d.origin.clone());
        let tp = [Seg::Key("spec"), Seg::Key("trafficPolicy")];
        let o = origin.clone();
        let mut d = |field: &'static str, v: &Option<String>| {
            v.as_ref().and_then(|s| {
                let o = o.as_ref()?;
                self.duration(
                    o,
                    &[tp[0], tp[1], Seg::Key("outlierDetection"), Seg::Key(field)],
                    s,
                )
            })
        };
        cpb::OutlierDetection {
            consecutive_5xx: od.consecutive_5xx_errors.and_then(u32v),
            enforcing_consecutive_5xx: od.consecutive_5xx_errors.map(|_| 100).and_then(u32v),
            consecutive_gateway_failure: od.consecutive_gateway_errors.and_then(u32v),
            enforcing_consecutive_gateway_failure: od
                .consecutive_gateway_errors
                .map(|_| 100)
                .and_then(u32v),
            interval: d("interval", &od.interval).map(pb_duration),
            base_ejection_time: d("baseEjectionTime", &od.base_ejection_time).map(pb_duration),
            max_ejection_percent: od.max_ejection_percent.and_then(u32v),
            // Istio turns the success-rate detector off.
            enforcing_success_rate: u32v(0),
            ..Default::default()
        }
    }

    /// The cluster's transport socket: TLS to an external server (`SIMPLE`/`MUTUAL`), the
    /// mesh's mTLS with the workloads' SPIFFE IDs (`ISTIO_MUTUAL`), or none.
    fn transport_socket(
        &self,
        svc: &Service,
        name: &str,
        policy: &TrafficPolicy,
        workloads: &[&Workload],
    ) -> Option<core::TransportSocket> {
        let external = policy
            .tls
            .as_ref()
            .filter(|t| matches!(t.mode.as_deref(), Some("SIMPLE" | "MUTUAL")));
        if let Some(tls) = external {
            Some(self.external_tls(svc, tls))
        } else {
            self.mtls_on(policy).then(|| {
                let sans: BTreeSet<String> = workloads
                    .iter()
                    .map(|w| self.spiffe(&w.namespace, &w.service_account))
                    .collect();
                let ctx = tls::UpstreamTlsContext {
                    common_tls_context: Some(
                        self.common_tls(sans.iter().map(|s| exact(s)).collect(), svc.http2()),
                    ),
                    sni: name.replace('|', "_."),
                    ..Default::default()
                };
                core::TransportSocket {
                    name: "envoy.transport_sockets.tls".into(),
                    config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(&ctx))),
                }
            })
        }
    }

    /// DestinationRule `tls.mode` SIMPLE or MUTUAL: TLS to a server outside the mesh's
    /// identity, with the files the rule names (read by the client, as Envoy reads them).
    /// Without `caCertificates`, the system's roots; without `sni`, the service host; without
    /// `subjectAltNames`, the certificate must be valid for the SNI.
    pub(super) fn external_tls(
        &self,
        svc: &Service,
        t: &crate::istio::Tls,
    ) -> core::TransportSocket {
        let file = |path: &str| core::DataSource {
            specifier: Some(core::data_source::Specifier::Filename(path.to_owned())),
            ..Default::default()
        };
        let sans = t
            .subject_alt_names
            .iter()
            .map(|san| {
                let san_type = if san.contains("://") {
                    tls::subject_alt_name_matcher::SanType::Uri
                } else if san.parse::<std::net::IpAddr>().is_ok() {
                    tls::subject_alt_name_matcher::SanType::IpAddress
                } else {
                    tls::subject_alt_name_matcher::SanType::Dns
                };
                tls::SubjectAltNameMatcher {
                    san_type: san_type as i32,
                    matcher: Some(exact(san)),
                    oid: String::new(),
                }
            })
            .collect();
        let mut validation = tls::CertificateValidationContext {
            match_typed_subject_alt_names: sans,
            ..Default::default()
        };
        match (&t.ca_certificates, self.opts.flavour) {
            (Some(ca), _) => validation.trusted_ca = Some(file(ca)),
            // Envoy reads the system bundle as a file (Debian's path, as Istio's sidecars do).
            (None, Flavour::Envoy) => {
                validation.trusted_ca = Some(file("/etc/ssl/certs/ca-certificates.crt"));
            }
            (None, Flavour::ProxylessGrpc) => {
                validation.system_root_certs = Some(Default::default());
            }
        }
        let tls_certificates = match (&t.client_certificate, &t.private_key) {
            (Some(cert), Some(key)) => vec![tls::TlsCertificate {
                certificate_chain: Some(file(cert)),
                private_key: Some(file(key)),
                ..Default::default()
            }],
            _ => Vec::new(),
        };
        let alpn_protocols = if svc.http2() {
            vec!["h2".into()]
        } else {
            vec!["h2".into(), "http/1.1".into()]
        };
        let ctx = tls::UpstreamTlsContext {
            common_tls_context: Some(tls::CommonTlsContext {
                tls_certificates,
                validation_context_type: Some(
                    tls::common_tls_context::ValidationContextType::ValidationContext(validation),
                ),
                alpn_protocols,
                ..Default::default()
            }),
            sni: t.sni.clone().unwrap_or_else(|| svc.host.clone()),
            ..Default::default()
        };
        core::TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(&ctx))),
        }
    }

    pub(super) fn common_tls(
        &self,
        sans: Vec<matcher::StringMatcher>,
        h2: bool,
    ) -> tls::CommonTlsContext {
        let instance = &self.opts.cert_provider_instance;
        let sans = sans
            .into_iter()
            .map(|m| tls::SubjectAltNameMatcher {
                san_type: tls::subject_alt_name_matcher::SanType::Uri as i32,
                matcher: Some(m),
                oid: String::new(),
            })
            .collect();
        let alpn_protocols = if h2 {
            vec!["h2".into()]
        } else {
            vec!["h2".into(), "http/1.1".into()]
        };
        match self.opts.flavour {
            Flavour::ProxylessGrpc => {
                let validation = tls::CertificateValidationContext {
                    ca_certificate_provider_instance: Some(
                        tls::CertificateProviderPluginInstance {
                            instance_name: instance.clone(),
                            certificate_name: "ROOTCA".into(),
                        },
                    ),
                    match_typed_subject_alt_names: sans,
                    ..Default::default()
                };
                tls::CommonTlsContext {
                    tls_certificate_provider_instance: Some(
                        tls::CertificateProviderPluginInstance {
                            instance_name: instance.clone(),
                            certificate_name: "default".into(),
                        },
                    ),
                    validation_context_type: Some(
                        tls::common_tls_context::ValidationContextType::ValidationContext(
                            validation,
                        ),
                    ),
                    alpn_protocols,
                    ..Default::default()
                }
            }
            Flavour::Envoy => {
                let sds = |name: &str| tls::SdsSecretConfig {
                    name: name.into(),
                    sds_config: Some(ads_source()),
                };
                tls::CommonTlsContext {
                    tls_certificate_sds_secret_configs: vec![sds("default")],
                    validation_context_type: Some(
                        tls::common_tls_context::ValidationContextType::CombinedValidationContext(
                            tls::common_tls_context::CombinedCertificateValidationContext {
                                default_validation_context: Some(
                                    tls::CertificateValidationContext {
                                        match_typed_subject_alt_names: sans,
                                        ..Default::default()
                                    },
                                ),
                                validation_context_sds_secret_config: Some(sds("ROOTCA")),
                                ..Default::default()
                            },
                        ),
                    ),
                    alpn_protocols,
                    ..Default::default()
                }
            }
        }
    }
}

/// The circuit-breaker thresholds of a connection pool (unset limits: none).
fn thresholds(pool: Option<&crate::istio::ConnectionPool>) -> cpb::circuit_breakers::Thresholds {
    let max = u32::MAX;
    cpb::circuit_breakers::Thresholds {
        max_connections: u32v(
            pool.and_then(|p| p.tcp.as_ref())
                .and_then(|t| t.max_connections)
                .unwrap_or(max),
        ),
        max_pending_requests: u32v(
            pool.and_then(|p| p.http.as_ref())
                .and_then(|h| h.http1_max_pending_requests)
                .unwrap_or(max),
        ),
        max_requests: u32v(
            pool.and_then(|p| p.http.as_ref())
                .and_then(|h| h.http2_max_requests)
                .unwrap_or(max),
        ),
        max_retries: u32v(
            pool.and_then(|p| p.http.as_ref())
                .and_then(|h| h.max_retries)
                .unwrap_or(max),
        ),
        ..Default::default()
    }
}

/// Upstream HTTP/2 protocol options, for HTTP2 and gRPC ports.
fn http2_options() -> std::collections::HashMap<String, Any> {
    let opts = upstream_http::HttpProtocolOptions {
            upstream_protocol_options: Some(upstream_http::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                upstream_http::http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        upstream_http::http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            core::Http2ProtocolOptions::default(),
                        ),
                    ),
                },
            )),
            ..Default::default()
        };
    std::collections::HashMap::from([(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_owned(),
        any(&opts),
    )])
}
