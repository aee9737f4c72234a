//! SDS over the ADS stream: workload certificates from the development CA.
//!
//! A client subscribes to `Secret` resources on its ADS stream: `default` is its own SVID
//! (`TlsCertificate`), `ROOTCA` the trust bundle (`CertificateValidationContext`) — the names
//! Istio uses. The identity comes from the node, as Istio encodes it: the namespace from an
//! Istio node id (`sidecar~IP~POD.NS~NS.svc.cluster.local`) or metadata `NAMESPACE`, the
//! service account from metadata `SERVICE_ACCOUNT` (default `default`). Certificates live
//! for the configured TTL and are reissued and pushed at half of it.
//!
//! This is for development: the server believes what the node says about itself, so anyone
//! who can reach it can obtain any identity of the trust domain. Do not expose it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource, Node};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, CertificateValidationContext, Secret, TlsCertificate,
};
use envoy_types::pb::google::protobuf::{value::Kind, Any};
use prost::{Message, Name};
use tokio::time::Instant;

use super::cache::Versioned;
use crate::ca::{DevCa, Svid};

/// The SDS type URL.
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Name of the workload certificate secret.
pub const IDENTITY_SECRET: &str = "default";
/// Name of the trust bundle secret.
pub const ROOT_SECRET: &str = "ROOTCA";

#[derive(Debug)]
struct Issued {
    generation: u64,
    svid: Svid,
    renew_at: Instant,
}

/// Issues and renews SVIDs for SDS subscribers.
#[derive(Debug)]
pub struct SdsIssuer {
    ca: DevCa,
    ttl: Duration,
    issued: Mutex<HashMap<String, Issued>>,
    generation: Mutex<u64>,
}

impl SdsIssuer {
    /// Certificates from `ca`, each valid for `ttl`.
    pub fn new(ca: DevCa, ttl: Duration) -> Self {
        Self {
            ca,
            ttl,
            issued: Mutex::new(HashMap::new()),
            generation: Mutex::new(0),
        }
    }

    /// The trust bundle.
    pub fn root_pem(&self) -> &str {
        self.ca.root_pem()
    }

    /// The namespace and service account a node claims.
    ///
    /// # Errors
    /// The node says nothing about its namespace.
    pub fn identity(node: &Node) -> Result<(String, String), String> {
        let meta = |k: &str| {
            node.metadata
                .as_ref()
                .and_then(|m| m.fields.get(k))
                .and_then(|v| match &v.kind {
                    Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                    _ => None,
                })
        };
        let from_id = {
            let parts: Vec<&str> = node.id.split('~').collect();
            (parts.len() == 4).then(|| parts[3].split('.').next().unwrap_or_default().to_owned())
        };
        let ns = meta("NAMESPACE").or(from_id).filter(|s| !s.is_empty()).ok_or_else(|| {
            format!(
                "node {:?}: no namespace (use an Istio node id sidecar~IP~POD.NS~NS.svc.cluster.local or metadata NAMESPACE)",
                node.id
            )
        })?;
        let sa = meta("SERVICE_ACCOUNT").unwrap_or_else(|| "default".into());
        Ok((ns, sa))
    }

    /// The secrets for `node` (only `names` if given), and when they must be renewed.
    pub(crate) fn secrets(
        &self,
        node: &Node,
        names: Option<&std::collections::BTreeSet<String>>,
    ) -> (BTreeMap<String, Versioned>, Option<Instant>) {
        let (ns, sa) = match Self::identity(node) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!("SDS: {e}");
                return (BTreeMap::new(), None);
            }
        };
        let mut issued = self.issued.lock().expect("issuer lock");
        let key = format!("{ns}/{sa}");
        let now = Instant::now();
        if issued.get(&key).is_none_or(|i| i.renew_at <= now) {
            match self.ca.issue(&ns, &sa, self.ttl) {
                Ok(svid) => {
                    let mut g = self.generation.lock().expect("generation lock");
                    *g += 1;
                    tracing::info!(node = %node.id, identity = %svid.spiffe_id, ttl = ?self.ttl, "SDS: issued certificate");
                    issued.insert(
                        key.clone(),
                        Issued {
                            generation: *g,
                            svid,
                            renew_at: now + self.ttl / 2,
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(node = %node.id, "SDS: {e}");
                    return (BTreeMap::new(), None);
                }
            }
        }
        let entry = &issued[&key];
        let wanted = |n: &str| names.is_none_or(|set| set.contains(n));
        let mut out = BTreeMap::new();
        let inline = |pem: &str| DataSource {
            specifier: Some(Specifier::InlineBytes(pem.as_bytes().to_vec())),
            ..Default::default()
        };
        if wanted(IDENTITY_SECRET) {
            let s = Secret {
                name: IDENTITY_SECRET.into(),
                r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: Some(inline(&entry.svid.cert_pem)),
                    private_key: Some(inline(&entry.svid.key_pem)),
                    ..Default::default()
                })),
            };
            out.insert(
                IDENTITY_SECRET.to_owned(),
                versioned(&s, entry.generation.to_string()),
            );
        }
        if wanted(ROOT_SECRET) {
            let s = Secret {
                name: ROOT_SECRET.into(),
                r#type: Some(secret::Type::ValidationContext(
                    CertificateValidationContext {
                        trusted_ca: Some(inline(self.ca.root_pem())),
                        ..Default::default()
                    },
                )),
            };
            out.insert(ROOT_SECRET.to_owned(), versioned(&s, "root".into()));
        }
        (out, Some(entry.renew_at))
    }
}

fn versioned(s: &Secret, version: String) -> Versioned {
    Versioned {
        version,
        resource: Any {
            type_url: Secret::type_url(),
            value: s.encode_to_vec(),
        },
        view: None,
    }
}
