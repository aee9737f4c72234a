//! A development certificate authority issuing SPIFFE X.509 SVIDs
//! (`spiffe://TRUST_DOMAIN/ns/NS/sa/SA` as the only URI SAN), short-lived.
//!
//! ```
//! use std::time::Duration;
//! use mesh_control::ca::DevCa;
//! let ca = DevCa::new("cluster.local").unwrap();
//! let svid = ca.issue("prod", "frontend", Duration::from_secs(3600)).unwrap();
//! assert_eq!(svid.spiffe_id, "spiffe://cluster.local/ns/prod/sa/frontend");
//! assert!(svid.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
//! ```

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A CA failure.
#[derive(Debug, thiserror::Error)]
#[error("development CA: {0}")]
pub struct CaError(String);

impl From<rcgen::Error> for CaError {
    fn from(e: rcgen::Error) -> Self {
        Self(e.to_string())
    }
}

/// An issued workload certificate.
#[derive(Clone, Debug)]
pub struct Svid {
    /// The identity.
    pub spiffe_id: String,
    /// PEM leaf certificate.
    pub cert_pem: String,
    /// PEM PKCS#8 private key.
    pub key_pem: String,
    /// When it expires.
    pub not_after: std::time::SystemTime,
}

/// A self-signed root for one trust domain.
pub struct DevCa {
    trust_domain: String,
    key: KeyPair,
    params: CertificateParams,
    cert_pem: String,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl DevCa {
    /// A new root CA, valid for ten years.
    ///
    /// # Errors
    /// Key generation failed.
    pub fn new(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "mesh development CA");
        dn.push(DnType::CommonName, format!("{trust_domain} root"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            key,
            params,
            cert_pem: cert.pem(),
        })
    }

    /// The trust bundle (the root certificate, PEM).
    pub fn root_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Issues an SVID for `ns`/`sa`, valid for `ttl` (from five minutes ago, for clock skew).
    ///
    /// # Errors
    /// A namespace or service account that cannot be in a SPIFFE ID, or a signing failure.
    pub fn issue(&self, ns: &str, sa: &str, ttl: Duration) -> Result<Svid, CaError> {
        self.issue_with_dns(ns, sa, &[], ttl)
    }

    /// A workload identity for `ns`/`sa`, ready for an
    /// [`IdentityStore`](mesh_core::identity::IdentityStore): an SVID from [`issue`](Self::issue)
    /// with this CA's root as its trust bundle.
    ///
    /// ```
    /// use std::time::Duration;
    /// use mesh_control::ca::DevCa;
    /// use mesh_core::identity::IdentityStore;
    /// let ca = DevCa::new("cluster.local")?;
    /// let store = IdentityStore::new(ca.workload_identity("prod", "reviews", Duration::from_secs(3600))?);
    /// # drop(store);
    /// # Ok::<(), mesh_control::ca::CaError>(())
    /// ```
    ///
    /// # Errors
    /// As [`issue`](Self::issue).
    pub fn workload_identity(
        &self,
        ns: &str,
        sa: &str,
        ttl: Duration,
    ) -> Result<mesh_core::identity::Identity, CaError> {
        let svid = self.issue(ns, sa, ttl)?;
        mesh_core::identity::Identity::from_pem(
            svid.cert_pem.as_bytes(),
            svid.key_pem.as_bytes(),
            self.cert_pem.as_bytes(),
        )
        .map_err(|e| CaError(format!("SVID for {}: {e}", svid.spiffe_id)))
    }

    /// Like [`issue`](Self::issue), with DNS names beside the SPIFFE ID, for peers that check
    /// host names rather than SPIFFE IDs (plain TLS clients, proxies without SPIFFE support).
    ///
    /// # Errors
    /// As [`issue`](Self::issue), or a DNS name that is not valid in a certificate.
    pub fn issue_with_dns(
        &self,
        ns: &str,
        sa: &str,
        dns: &[&str],
        ttl: Duration,
    ) -> Result<Svid, CaError> {
        let ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        };
        if !ok(ns) || !ok(sa) {
            return Err(CaError(format!(
                "invalid namespace/service account {ns:?}/{sa:?}"
            )));
        }
        let spiffe_id = format!("spiffe://{}/ns/{ns}/sa/{sa}", self.trust_domain);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(spiffe_id.clone().try_into()?)];
        for name in dns {
            params
                .subject_alt_names
                .push(SanType::DnsName((*name).try_into()?));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "mesh");
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        let ttl_t = time::Duration::try_from(ttl).map_err(|e| CaError(e.to_string()))?;
        params.not_after = now + ttl_t;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Svid {
            spiffe_id,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after: std::time::SystemTime::now() + ttl,
        })
    }
}
