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
    Ok(Socket::Tls(DownstreamTls {
        identity,
        validation,
        require_client_certificate,
        san_matchers,
        alpn,
    }))
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
    } else if !c.tls_certificates.is_empty() {
        return err(
            "inline certificates are not supported; use a certificate provider instance or SDS",
        )
        .at("tls_certificates");
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
    if v.system_root_certs.is_some() {
        return err("system root certificates are not supported in the mesh")
            .at("system_root_certs");
    }
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
    if v.trusted_ca.is_some() {
        // The mesh verifies every peer against its workload trust bundle (from a certificate
        // provider instance or SDS); a CA given here would silently not be the one used.
        return err(
            "trusted_ca is not supported: peers are verified with the workload trust bundle (ca_certificate_provider_instance or SDS)",
        )
        .at("trusted_ca");
    }
    Ok(None)
}
