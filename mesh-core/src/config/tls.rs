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
        pem: String,
    },
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
