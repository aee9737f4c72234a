//! TLS transport sockets: `UpstreamTlsContext` and `DownstreamTlsContext`.

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as pb;

use super::matcher::string_matcher;
use super::{decode_any, err, type_name, At, FieldError};
use crate::config::{CertSource, DownstreamTls, SanMatcher, SanType, UpstreamTls};

/// What a transport socket turned out to be.
pub(crate) enum Socket<T> {
    Plaintext,
    Tls(T),
}

fn socket_any(
    ts: &core::TransportSocket,
) -> Result<Option<&envoy_types::pb::google::protobuf::Any>, FieldError> {
    match &ts.config_type {
        Some(core::transport_socket::ConfigType::TypedConfig(any)) => {
            if type_name(any).ends_with("RawBuffer") {
                return Ok(None);
            }
            Ok(Some(any))
        }
        None if ts.name == "envoy.transport_sockets.raw_buffer" || ts.name == "raw_buffer" => {
            Ok(None)
        }
        None => err(format!(
            "transport socket {:?} has no typed_config",
            ts.name
        ))
        .at("typed_config"),
    }
}

pub(crate) fn upstream(ts: &core::TransportSocket) -> Result<Socket<UpstreamTls>, FieldError> {
    let Some(any) = socket_any(ts)? else {
        return Ok(Socket::Plaintext);
    };
    let ctx: pb::UpstreamTlsContext = decode_any(any).at("typed_config")?;
    let common = ctx
        .common_tls_context
        .as_ref()
        .ok_or_else(|| FieldError::new("common_tls_context is required"))
        .at("typed_config")?;
    let (identity, validation, san_matchers, alpn) = common_ctx(common)
        .at("common_tls_context")
        .at("typed_config")?;
    Ok(Socket::Tls(UpstreamTls {
        sni: ctx.sni,
        identity,
        validation,
        san_matchers,
        alpn,
    }))
}

pub(crate) fn downstream(ts: &core::TransportSocket) -> Result<Socket<DownstreamTls>, FieldError> {
    let Some(any) = socket_any(ts)? else {
        return Ok(Socket::Plaintext);
    };
    let ctx: pb::DownstreamTlsContext = decode_any(any).at("typed_config")?;
    let common = ctx
        .common_tls_context
        .as_ref()
        .ok_or_else(|| FieldError::new("common_tls_context is required"))
        .at("typed_config")?;
    let (identity, validation, san_matchers, alpn) = common_ctx(common)
        .at("common_tls_context")
        .at("typed_config")?;
    if identity.is_none() {
        return err("a server certificate is required (tls_certificate_provider_instance or SDS)")
            .at("common_tls_context")
            .at("typed_config");
    }
    let require_client_certificate = ctx
        .require_client_certificate
        .map(|b| b.value)
        .unwrap_or(false);
    if require_client_certificate && validation.is_none() {
        return err("require_client_certificate needs a validation context")
            .at("require_client_certificate")
            .at("typed_config");
    }
    let tls = DownstreamTls {
        identity,
        validation,
        require_client_certificate,
        san_matchers,
        alpn,
    };
    workload_only(&tls).at("typed_config")?;
    Ok(Socket::Tls(tls))
}

type Common = (
    Option<CertSource>,
    Option<CertSource>,
    Vec<SanMatcher>,
    Vec<String>,
);

#[allow(deprecated)]
fn common_ctx(c: &pb::CommonTlsContext) -> Result<Common, FieldError> {
    if let Some(p) = &c.tls_params {
        // The mesh speaks TLS 1.2 and 1.3 (rustls). A range that is exactly that, or open on
        // either side, is honoured; anything narrower or older is refused.
        use pb::tls_parameters::TlsProtocol as V;
        if ![V::TlsAuto as i32, V::TlSv12 as i32].contains(&p.tls_minimum_protocol_version) {
            return err("the mesh speaks TLS 1.2 and 1.3: a minimum of 1.2 (or AUTO) is supported, not older versions and not 1.3 alone")
                .at("tls_minimum_protocol_version")
                .at("tls_params");
        }
        if ![V::TlsAuto as i32, V::TlSv13 as i32].contains(&p.tls_maximum_protocol_version) {
            return err(
                "only TLS 1.2 and 1.3 together are supported; a maximum below TLS 1.3 is not",
            )
            .at("tls_maximum_protocol_version")
            .at("tls_params");
        }
    }
    use pb::common_tls_context::ValidationContextType as V;
    let identity = if let Some(p) = &c.tls_certificate_provider_instance {
        Some(CertSource::Provider {
            instance: p.instance_name.clone(),
            certificate_name: p.certificate_name.clone(),
        })
    } else if let Some(p) = &c.tls_certificate_certificate_provider_instance {
        Some(CertSource::Provider {
            instance: p.instance_name.clone(),
            certificate_name: p.certificate_name.clone(),
        })
    } else if let Some(s) = c.tls_certificate_sds_secret_configs.first() {
        Some(CertSource::Sds {
            name: s.name.clone(),
        })
    } else if let Some(first) = c.tls_certificates.first() {
        if c.tls_certificates.len() > 1 {
            return err("one certificate is supported (the mesh does not choose between several)")
                .at_index("tls_certificates", 1);
        }
        let pem = |d: &Option<core::DataSource>, field: &'static str| {
            d.as_ref()
                .ok_or_else(|| FieldError::new(format!("{field} is required")))
                .and_then(data_source)
                .at(field)
                .at_index("tls_certificates", 0)
        };
        Some(CertSource::KeyPair {
            certificate_chain: Box::new(pem(&first.certificate_chain, "certificate_chain")?),
            private_key: Box::new(pem(&first.private_key, "private_key")?),
        })
    } else {
        None
    };
    let mut sans = Vec::new();
    let validation = match &c.validation_context_type {
        None => None,
        Some(V::ValidationContext(v)) => validation_ctx(v, &mut sans).at("validation_context")?,
        Some(V::ValidationContextSdsSecretConfig(s)) => Some(CertSource::Sds {
            name: s.name.clone(),
        }),
        Some(V::CombinedValidationContext(cv)) => {
            let from_default = match &cv.default_validation_context {
                Some(v) => validation_ctx(v, &mut sans)
                    .at("default_validation_context")
                    .at("combined_validation_context")?,
                None => None,
            };
            if let Some(p) = &cv.validation_context_certificate_provider_instance {
                Some(CertSource::Provider {
                    instance: p.instance_name.clone(),
                    certificate_name: p.certificate_name.clone(),
                })
            } else if let Some(s) = &cv.validation_context_sds_secret_config {
                Some(CertSource::Sds {
                    name: s.name.clone(),
                })
            } else {
                from_default
            }
        }
        Some(V::ValidationContextCertificateProviderInstance(p)) => Some(CertSource::Provider {
            instance: p.instance_name.clone(),
            certificate_name: p.certificate_name.clone(),
        }),
        Some(V::ValidationContextCertificateProvider(_)) => {
            return err("certificate providers by plugin config are not supported; use an instance")
                .at("validation_context_certificate_provider")
        }
    };
    Ok((identity, validation, sans, c.alpn_protocols.clone()))
}

fn validation_ctx(
    v: &pb::CertificateValidationContext,
    sans: &mut Vec<SanMatcher>,
) -> Result<Option<CertSource>, FieldError> {
    for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
        let san_type = match m.san_type {
            1 => SanType::Email,
            2 => SanType::Dns,
            3 => SanType::Uri,
            4 => SanType::IpAddress,
            other => {
                return err(format!("san_type {other} is not supported"))
                    .at("san_type")
                    .at_index("match_typed_subject_alt_names", i)
            }
        };
        let matcher = string_matcher(
            m.matcher
                .as_ref()
                .ok_or_else(|| FieldError::new("matcher is required"))?,
        )
        .at("matcher")
        .at_index("match_typed_subject_alt_names", i)?;
        sans.push(SanMatcher { san_type, matcher });
    }
    #[allow(deprecated)]
    for (i, m) in v.match_subject_alt_names.iter().enumerate() {
        sans.push(SanMatcher {
            san_type: SanType::Any,
            matcher: string_matcher(m).at_index("match_subject_alt_names", i)?,
        });
    }
    if let Some(p) = &v.ca_certificate_provider_instance {
        return Ok(Some(CertSource::Provider {
            instance: p.instance_name.clone(),
            certificate_name: p.certificate_name.clone(),
        }));
    }
    match (&v.trusted_ca, &v.system_root_certs) {
        (Some(_), Some(_)) => {
            err("trusted_ca and system_root_certs are exclusive").at("system_root_certs")
        }
        (Some(ca), None) => Ok(Some(data_source(ca).at("trusted_ca")?)),
        (None, Some(_)) => Ok(Some(CertSource::System)),
        (None, None) => Ok(None),
    }
}

/// PEM from a `DataSource`: a file the client reads, or inline bytes or text.
fn data_source(d: &core::DataSource) -> Result<CertSource, FieldError> {
    use core::data_source::Specifier;
    match &d.specifier {
        Some(Specifier::Filename(path)) if !path.is_empty() => {
            Ok(CertSource::File { path: path.clone() })
        }
        Some(Specifier::InlineBytes(b)) => Ok(CertSource::Inline { pem: b.clone() }),
        Some(Specifier::InlineString(s)) => Ok(CertSource::Inline {
            pem: s.clone().into_bytes(),
        }),
        Some(Specifier::EnvironmentVariable(_)) => {
            err("certificates from environment variables are not supported")
                .at("environment_variable")
        }
        _ => err("a filename, inline_bytes or inline_string is required"),
    }
}

/// Server listeners present the workload identity and verify clients with its trust bundle:
/// certificates named by the resource itself would silently not be the ones used.
fn workload_only(tls: &DownstreamTls) -> Result<(), FieldError> {
    if tls.identity.as_ref().is_some_and(|c| !c.is_workload()) {
        return err("a server presents the workload certificate (tls_certificate_provider_instance or SDS); tls_certificates are not supported on listeners")
            .at("tls_certificates")
            .at("common_tls_context");
    }
    if tls.validation.as_ref().is_some_and(|c| !c.is_workload()) {
        return err("clients are verified with the workload trust bundle (ca_certificate_provider_instance or SDS); trusted_ca and system_root_certs are not supported on listeners")
            .at("validation_context")
            .at("common_tls_context");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::{Message, Name};

    fn socket<M: Message + Name>(ctx: &M) -> core::TransportSocket {
        core::TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(core::transport_socket::ConfigType::TypedConfig(
                envoy_types::pb::google::protobuf::Any {
                    type_url: M::type_url(),
                    value: ctx.encode_to_vec(),
                },
            )),
        }
    }

    fn file(path: &str) -> Option<core::DataSource> {
        Some(core::DataSource {
            specifier: Some(core::data_source::Specifier::Filename(path.into())),
            ..Default::default()
        })
    }

    fn common(validation: pb::CertificateValidationContext) -> pb::CommonTlsContext {
        pb::CommonTlsContext {
            tls_certificates: vec![pb::TlsCertificate {
                certificate_chain: file("/etc/client.pem"),
                private_key: Some(core::DataSource {
                    specifier: Some(core::data_source::Specifier::InlineString("KEY".into())),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            validation_context_type: Some(
                pb::common_tls_context::ValidationContextType::ValidationContext(validation),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn upstream_contexts_keep_their_own_trust_and_certificate() {
        let ctx = pb::UpstreamTlsContext {
            common_tls_context: Some(common(pb::CertificateValidationContext {
                trusted_ca: file("/etc/ca.pem"),
                ..Default::default()
            })),
            sni: "api.example.com".into(),
            ..Default::default()
        };
        let Ok(Socket::Tls(tls)) = upstream(&socket(&ctx)) else {
            panic!("translates")
        };
        assert_eq!(tls.sni, "api.example.com");
        assert_eq!(
            tls.validation,
            Some(CertSource::File {
                path: "/etc/ca.pem".into()
            })
        );
        assert_eq!(
            tls.identity,
            Some(CertSource::KeyPair {
                certificate_chain: Box::new(CertSource::File {
                    path: "/etc/client.pem".into()
                }),
                private_key: Box::new(CertSource::Inline {
                    pem: b"KEY".to_vec()
                }),
            })
        );

        let system = pb::UpstreamTlsContext {
            common_tls_context: Some(pb::CommonTlsContext {
                validation_context_type: Some(
                    pb::common_tls_context::ValidationContextType::ValidationContext(
                        pb::CertificateValidationContext {
                            system_root_certs: Some(Default::default()),
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let Ok(Socket::Tls(tls)) = upstream(&socket(&system)) else {
            panic!("translates")
        };
        assert_eq!(tls.validation, Some(CertSource::System));

        let mut env = ctx.clone();
        env.common_tls_context.as_mut().unwrap().tls_certificates[0].private_key =
            Some(core::DataSource {
                specifier: Some(core::data_source::Specifier::EnvironmentVariable(
                    "KEY".into(),
                )),
                ..Default::default()
            });
        let Err(e) = upstream(&socket(&env)) else {
            panic!("refused")
        };
        assert_eq!(
            format!("{}: {}", e.path(), e.message),
            "typed_config.common_tls_context.tls_certificates[0].private_key.environment_variable: certificates from environment variables are not supported"
        );
    }

    #[test]
    fn listeners_refuse_certificates_other_than_the_workload_identity() {
        let ctx = pb::DownstreamTlsContext {
            common_tls_context: Some(common(pb::CertificateValidationContext {
                trusted_ca: file("/etc/ca.pem"),
                ..Default::default()
            })),
            ..Default::default()
        };
        let Err(e) = downstream(&socket(&ctx)) else {
            panic!("refused")
        };
        let text = format!("{}: {}", e.path(), e.message);
        assert!(
            text.starts_with("typed_config.common_tls_context.tls_certificates: a server presents the workload certificate"),
            "{text}"
        );
    }
}
