use std::fmt;

use rustls_pki_types::CertificateDer;

/// A SPIFFE ID: `spiffe://trust-domain/path`.
///
/// ```
/// use mesh_core::identity::SpiffeId;
/// let id: SpiffeId = "spiffe://cluster.local/ns/prod/sa/frontend".parse().unwrap();
/// assert_eq!(id.trust_domain(), "cluster.local");
/// assert_eq!(id.path(), "/ns/prod/sa/frontend");
/// assert!("spiffe://Cluster.local/x".parse::<SpiffeId>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    td_end: usize,
}

impl SpiffeId {
    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.uri["spiffe://".len()..self.td_end]
    }

    /// The path (starts with `/`, may be empty).
    pub fn path(&self) -> &str {
        &self.uri[self.td_end..]
    }

    /// The whole URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = String;

    /// Validates per the SPIFFE ID spec: lower-case trust domain of `[a-z0-9.-_]`, path
    /// segments of `[a-zA-Z0-9.-_]`, no empty, `.` or `..` segments, no query or fragment.
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("{s:?} does not start with spiffe://"))?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        let td = &rest[..td_len];
        if td.is_empty() {
            return Err(format!("{s:?} has an empty trust domain"));
        }
        if !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(format!(
                "{s:?}: the trust domain may only hold lower-case letters, digits, '-', '.', '_'"
            ));
        }
        let path = &rest[td_len..];
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                if seg.is_empty() || seg == "." || seg == ".." {
                    return Err(format!("{s:?}: empty, '.' or '..' path segment"));
                }
                if !seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                {
                    return Err(format!(
                        "{s:?}: path segments may only hold letters, digits, '-', '.', '_'"
                    ));
                }
            }
        }
        Ok(Self {
            uri: s.to_owned(),
            td_end: "spiffe://".len() + td_len,
        })
    }
}

/// The SPIFFE ID in a certificate's URI SAN (the first `spiffe://` one), if any.
pub fn peer_spiffe_id(cert: &CertificateDer<'_>) -> Option<SpiffeId> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
            u.parse().ok()
        }
        _ => None,
    })
}
