//! SPIFFE verification inside the rustls handshake.
//!
//! These are real verifiers: the peer's chain is verified against the current trust bundle
//! with webpki (signatures, validity period, key usage), and then its SPIFFE ID is checked:
//! against the cluster's SAN matchers for a server, against the trust domain for a client.
//! rustls only lets such verifiers in through its `dangerous()` builder, which is why that
//! call appears below; nothing here skips verification.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, DistinguishedName, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::spiffe::{peer_spiffe_id, SpiffeId};
use super::store::{crypto_provider, Identity, IdentityStore};
use crate::config::{SanMatcher, SanType};

pub(super) fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    rustls::Error::InvalidCertificate(match e {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    })
}

/// Verifies `end_entity` and `intermediates` against the bundle; returns the SPIFFE ID.
fn verify_chain(
    bundle: &Identity,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<SpiffeId, rustls::Error> {
    let anchors: Vec<_> = bundle
        .roots
        .iter()
        .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
        .collect();
    let ee = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
    ee.verify_for_usage(
        crypto_provider().signature_verification_algorithms.all,
        &anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(webpki_error)?;
    peer_spiffe_id(end_entity)
        .ok_or_else(|| rustls::Error::General("peer certificate has no spiffe:// URI SAN".into()))
}

fn san_matches(m: &SanMatcher, id: &SpiffeId) -> bool {
    matches!(m.san_type, SanType::Uri | SanType::Any) && m.matcher.matches(id.as_str())
}

/// Verifies a server: chain to the trust bundle, then its SPIFFE ID against SAN matchers.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: Arc<ArcSwap<Identity>>,
    matchers: Vec<SanMatcher>,
}

impl SpiffeServerVerifier {
    /// Verifies servers against `identity`'s trust bundle and `matchers`.
    pub fn new(identity: &IdentityStore, matchers: Vec<SanMatcher>) -> Self {
        Self {
            bundle: identity.swap().clone(),
            matchers,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = verify_chain(
            &self.bundle.load(),
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if self.matchers.is_empty() || self.matchers.iter().any(|m| san_matches(m, &id)) {
            return Ok(ServerCertVerified::assertion());
        }
        let expected: Vec<String> = self
            .matchers
            .iter()
            .map(|m| format!("{:?}", m.matcher.kind))
            .collect();
        Err(rustls::Error::General(format!(
            "server presented {id}, expected {}",
            expected.join(" or ")
        )))
    }

    crate::identity::store::signature_checks!();
}

/// Verifies clients: chain to the trust bundle, SPIFFE ID in the bundle's trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: Arc<ArcSwap<Identity>>,
    mandatory: bool,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let bundle = self.bundle.load();
        let id = verify_chain(
            &bundle,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        if id.trust_domain() != bundle.spiffe_id.trust_domain() {
            return Err(rustls::Error::General(format!(
                "client presented {id}, which is not in trust domain {}",
                bundle.spiffe_id.trust_domain()
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    crate::identity::store::signature_checks!();
}

/// Presents the current certificate (read at each handshake: rotation needs no new config).
#[derive(Debug)]
pub(super) struct Resolver(pub(super) IdentityStore);

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certified_key())
    }
}

/// A client config presenting `identity` and accepting servers whose SPIFFE ID matches one of
/// `matchers` (any ID of the trust bundle when empty). TLS 1.3 and 1.2.
///
/// # Errors
/// The crypto provider rejects the protocol versions (does not happen with ring).
pub fn client_config(
    identity: &IdentityStore,
    matchers: Vec<SanMatcher>,
    alpn: Vec<Vec<u8>>,
) -> Result<ClientConfig, rustls::Error> {
    let verifier = Arc::new(SpiffeServerVerifier {
        bundle: identity.swap().clone(),
        matchers,
    });
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(Resolver(identity.clone())));
    config.alpn_protocols = alpn;
    Ok(config)
}

/// A server config presenting `identity`; client certificates are verified against its trust
/// bundle and trust domain, and required when `require_client_cert` (STRICT).
///
/// # Errors
/// As [`client_config`].
pub fn server_config(
    identity: &IdentityStore,
    require_client_cert: bool,
    alpn: Vec<Vec<u8>>,
) -> Result<ServerConfig, rustls::Error> {
    let verifier = Arc::new(SpiffeClientVerifier {
        bundle: identity.swap().clone(),
        mandatory: require_client_cert,
    });
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Resolver(identity.clone())));
    config.alpn_protocols = alpn;
    Ok(config)
}
