//! TLS to services outside the mesh's identity: a cluster whose `UpstreamTlsContext` names
//! its own trust (`trusted_ca` as a file or inline PEM, or `system_root_certs`) and perhaps
//! its own client certificate (`tls_certificates`), as Istio's DestinationRule `tls.mode`
//! SIMPLE and MUTUAL produce.
//!
//! The server's chain is verified with webpki against those roots. With SAN matchers, the
//! leaf must carry a matching SAN (DNS, URI, IP or email, as the matcher says); without
//! them, the certificate must be valid for the server name the connection uses (the SNI, or
//! the endpoint's address), which is how a browser checks a server.

use std::sync::Arc;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use super::store::{crypto_provider, IdentityStore};
use crate::config::{CertSource, SanMatcher, SanType, UpstreamTls};

/// Whether `tls` names its own trust rather than the workload trust bundle.
pub fn is_external(tls: &UpstreamTls) -> bool {
    tls.validation.as_ref().is_some_and(|v| !v.is_workload())
}

fn certs(source: &CertSource, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = source.read_pem().map_err(|e| format!("{what}: {e}"))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what} ({}): {e}", describe(source)))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} ({}): no CERTIFICATE block",
            describe(source)
        ));
    }
    Ok(certs)
}

fn describe(source: &CertSource) -> String {
    match source {
        CertSource::File { path } => path.clone(),
        CertSource::Inline { .. } => "inline PEM".into(),
        other => format!("{other:?}"),
    }
}

fn system_roots() -> Result<Vec<CertificateDer<'static>>, String> {
    static ROOTS: std::sync::OnceLock<Result<Vec<CertificateDer<'static>>, String>> =
        std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                let why: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
                return Err(format!(
                    "system_root_certs: no trusted roots found on this machine (set SSL_CERT_FILE){}",
                    if why.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", why.join("; "))
                    }
                ));
            }
            Ok(found.certs)
        })
        .clone()
}

/// A client config for a cluster with its own trust (see [`is_external`]): roots from
/// `tls.validation`, the client certificate from `tls.identity` (a key pair, or the workload
/// identity when it names a certificate provider or SDS; none when absent).
///
/// # Errors
/// A file that cannot be read, PEM that does not parse, a key that does not match its
/// certificate, or a workload certificate asked for without a workload identity. The message
/// names the file or field.
pub fn external_client_config(
    tls: &UpstreamTls,
    identity: Option<&IdentityStore>,
    alpn: Vec<Vec<u8>>,
) -> Result<ClientConfig, String> {
    let roots = match &tls.validation {
        Some(CertSource::System) => system_roots()?,
        Some(source) if !source.is_workload() => certs(source, "trusted_ca")?,
        _ => return Err("the validation context names no trust of its own".into()),
    };
    let mut store = RootCertStore::empty();
    for (i, cert) in roots.into_iter().enumerate() {
        store
            .add(cert)
            .map_err(|e| format!("trusted_ca: certificate {i} is not a usable root: {e}"))?;
    }
    let store = Arc::new(store);
    let verifier: Arc<dyn ServerCertVerifier> = if tls.san_matchers.is_empty() {
        WebPkiServerVerifier::builder_with_provider(store, crypto_provider())
            .build()
            .map_err(|e| format!("trusted_ca: {e}"))?
    } else {
        Arc::new(SanVerifier {
            roots: store,
            matchers: tls.san_matchers.clone(),
        })
    };
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &tls.identity {
        None => builder.with_no_client_auth(),
        Some(CertSource::KeyPair {
            certificate_chain,
            private_key,
        }) => {
            let chain = certs(certificate_chain, "tls_certificates[0].certificate_chain")?;
            let key_pem = private_key
                .read_pem()
                .map_err(|e| format!("tls_certificates[0].private_key: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                format!(
                    "tls_certificates[0].private_key ({}): {e}",
                    describe(private_key)
                )
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("tls_certificates[0]: {e}"))?
        }
        Some(workload) if workload.is_workload() => {
            let identity = identity.ok_or_else(|| {
                "the client certificate is the workload's, but the client has no workload identity"
                    .to_owned()
            })?;
            builder.with_client_cert_resolver(Arc::new(super::verify::Resolver(identity.clone())))
        }
        Some(other) => {
            return Err(format!(
                "tls_certificates: {} is not a certificate and key",
                describe(other)
            ))
        }
    };
    config.alpn_protocols = alpn;
    Ok(config)
}

/// Chain to the cluster's roots, then one of the leaf's SANs must match one of `matchers`.
#[derive(Debug)]
struct SanVerifier {
    roots: Arc<RootCertStore>,
    matchers: Vec<SanMatcher>,
}

/// The leaf's SANs, each with its type.
fn sans(cert: &CertificateDer<'_>) -> Vec<(SanType, String)> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((SanType::Dns, (*d).to_owned())),
            GeneralName::URI(u) => Some((SanType::Uri, (*u).to_owned())),
            GeneralName::RFC822Name(e) => Some((SanType::Email, (*e).to_owned())),
            GeneralName::IPAddress(b) => {
                let ip = match b.len() {
                    4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                    16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                    _ => None,
                }?;
                Some((SanType::IpAddress, ip.to_string()))
            }
            _ => None,
        })
        .collect()
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ee =
            webpki::EndEntityCert::try_from(end_entity).map_err(super::verify::webpki_error)?;
        ee.verify_for_usage(
            crypto_provider().signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(super::verify::webpki_error)?;
        let presented = sans(end_entity);
        let ok = self.matchers.iter().any(|m| {
            presented.iter().any(|(t, v)| {
                (m.san_type == SanType::Any || m.san_type == *t) && m.matcher.matches(v)
            })
        });
        if ok {
            return Ok(ServerCertVerified::assertion());
        }
        let shown: Vec<&str> = presented.iter().map(|(_, v)| v.as_str()).collect();
        let expected: Vec<String> = self
            .matchers
            .iter()
            .map(|m| format!("{:?} {:?}", m.san_type, m.matcher.kind))
            .collect();
        Err(rustls::Error::General(format!(
            "server certificate SANs [{}] match none of {}",
            shown.join(", "),
            expected.join(" or ")
        )))
    }

    crate::identity::store::signature_checks!();
}
