//! TLS contexts of clusters and listeners (`UpstreamTlsContext`, `DownstreamTlsContext`).

use super::matcher::StringMatcher;

/// Where a certificate (or a trust bundle) comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertSource {
    /// A bootstrap `certificate_providers` instance (gRPC's `file_watcher` and friends).
    Provider {
        /// Instance name in the bootstrap.
        instance: String,
        /// Certificate name inside the instance (usually empty).
        certificate_name: String,
    },
    /// An SDS secret from the control plane.
    Sds {
        /// Secret name.
        name: String,
    },
    /// A PEM file on disk (validation context `trusted_ca.filename`, certificate chain...).
    File {
        /// Path.
        path: String,
    },
    /// PEM bytes inline in the resource.
    Inline {
        /// The PEM data.
        pem: Vec<u8>,
    },
    /// The operating system's trust store (`system_root_certs`).
    System,
    /// A certificate chain and its private key (`tls_certificates`), each a
    /// [`CertSource::File`] or [`CertSource::Inline`].
    KeyPair {
        /// The PEM certificate chain, leaf first.
        certificate_chain: Box<CertSource>,
        /// The PEM private key.
        private_key: Box<CertSource>,
    },
}

impl CertSource {
    /// The workload identity's own sources (certificate provider instance or SDS), as
    /// opposed to certificates named by the resource itself (files, inline, system roots).
    pub fn is_workload(&self) -> bool {
        matches!(self, Self::Provider { .. } | Self::Sds { .. })
    }

    /// The PEM bytes of a file or inline source.
    ///
    /// # Errors
    /// The file cannot be read, or the source holds no PEM of its own.
    pub fn read_pem(&self) -> Result<Vec<u8>, String> {
        match self {
            Self::File { path } => {
                std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))
            }
            Self::Inline { pem } => Ok(pem.clone()),
            other => Err(format!("{other:?} is not a PEM file or inline PEM")),
        }
    }
}

/// Which SAN a matcher looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SanType {
    /// Any SAN (the legacy `match_subject_alt_names`).
    Any,
    /// URI SAN (SPIFFE IDs).
    Uri,
    /// DNS SAN.
    Dns,
    /// Email SAN.
    Email,
    /// IP address SAN.
    IpAddress,
}

/// One acceptable SAN of the peer.
#[derive(Clone, Debug, PartialEq)]
pub struct SanMatcher {
    /// The SAN kind.
    pub san_type: SanType,
    /// The value rule.
    pub matcher: StringMatcher,
}

/// `UpstreamTlsContext`: how the client side talks TLS to a cluster's endpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamTls {
    /// SNI to send (empty: none, or the endpoint hostname).
    pub sni: String,
    /// Client certificate, for mTLS.
    pub identity: Option<CertSource>,
    /// Trust bundle to verify the server against.
    pub validation: Option<CertSource>,
    /// The server must present a SAN matching one of these (none: any SAN from the bundle).
    pub san_matchers: Vec<SanMatcher>,
    /// ALPN protocols offered.
    pub alpn: Vec<String>,
}

/// `DownstreamTlsContext`: how a server listener terminates TLS.
#[derive(Clone, Debug, PartialEq)]
pub struct DownstreamTls {
    /// Server certificate.
    pub identity: Option<CertSource>,
    /// Trust bundle for client certificates.
    pub validation: Option<CertSource>,
    /// Reject clients without a valid certificate (mTLS).
    pub require_client_certificate: bool,
    /// Client SANs accepted (none: any from the bundle).
    pub san_matchers: Vec<SanMatcher>,
    /// ALPN protocols offered.
    pub alpn: Vec<String>,
}
