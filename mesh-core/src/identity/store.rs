//! The identity of a workload and where it is kept: [`Identity`] (certificate chain, key,
//! trust bundle, SPIFFE ID) in an [`IdentityStore`] that providers replace it in; and the
//! crypto provider and signature checks every verifier uses.

use std::sync::Arc;

use super::spiffe::{peer_spiffe_id, SpiffeId};

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

/// The crypto provider of every TLS config of the mesh.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Why certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error reading it.
        #[source]
        source: std::io::Error,
    },
    /// PEM data is not usable.
    #[error("{what}: {message}")]
    Pem {
        /// Which input (file name or role).
        what: String,
        /// What is wrong.
        message: String,
    },
    /// The configuration is wrong.
    #[error("{0}")]
    Config(String),
}

/// A workload's certificate, key and trust bundle.
#[derive(Debug)]
pub struct Identity {
    /// The leaf and intermediates, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The SPIFFE ID of the leaf.
    pub spiffe_id: SpiffeId,
    /// Trusted roots.
    pub roots: Vec<CertificateDer<'static>>,
    /// When the leaf certificate expires.
    pub not_after: std::time::SystemTime,
    pub(crate) certified_key: Arc<CertifiedKey>,
}

impl Identity {
    /// Parses PEM: certificate chain, private key (PKCS#8, PKCS#1 or SEC1), trust bundle.
    ///
    /// # Errors
    /// Missing or unparsable PEM, a key the crypto provider cannot use, or a leaf without a
    /// SPIFFE ID.
    pub fn from_pem(
        chain_pem: &[u8],
        key_pem: &[u8],
        roots_pem: &[u8],
    ) -> Result<Self, IdentityError> {
        let pem = |what: &str, message: String| IdentityError::Pem {
            what: what.to_owned(),
            message,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| pem("certificate chain", e.to_string()))?;
        if chain.is_empty() {
            return Err(pem("certificate chain", "no CERTIFICATE block".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| pem("private key", e.to_string()))?;
        let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(roots_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| pem("trust bundle", e.to_string()))?;
        if roots.is_empty() {
            return Err(pem("trust bundle", "no CERTIFICATE block".into()));
        }
        let spiffe_id = peer_spiffe_id(&chain[0]).ok_or_else(|| {
            pem(
                "certificate chain",
                "the leaf has no spiffe:// URI SAN".into(),
            )
        })?;
        let not_after = x509_parser::parse_x509_certificate(chain[0].as_ref())
            .ok()
            .and_then(|(_, c)| u64::try_from(c.validity().not_after.timestamp()).ok())
            .map(|secs| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
            .ok_or_else(|| {
                pem(
                    "certificate chain",
                    "the leaf's validity does not parse".into(),
                )
            })?;
        let signing_key = crypto_provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| pem("private key", e.to_string()))?;
        let certified_key = CertifiedKey::new(chain.clone(), signing_key);
        // Files written one at a time can pair a new key with an old certificate.
        certified_key.keys_match().map_err(|e| {
            pem(
                "private key",
                format!("does not match the certificate: {e}"),
            )
        })?;
        let certified_key = Arc::new(certified_key);
        Ok(Self {
            chain,
            spiffe_id,
            roots,
            not_after,
            certified_key,
        })
    }
}

/// The current identity, swapped on rotation, with a change notification.
#[derive(Clone, Debug)]
pub struct IdentityStore {
    current: Arc<ArcSwap<Identity>>,
    changed: Arc<watch::Sender<u64>>,
    /// Handshakes that presented the certificate after it expired.
    expired_uses: Arc<std::sync::atomic::AtomicU64>,
}

impl IdentityStore {
    /// A store holding `identity`.
    pub fn new(identity: Identity) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(identity)),
            changed: Arc::new(watch::channel(0).0),
            expired_uses: Arc::default(),
        }
    }

    /// The current identity.
    pub fn load(&self) -> Arc<Identity> {
        self.current.load_full()
    }

    /// Replaces the identity (rotation); new handshakes use it.
    pub fn store(&self, identity: Identity) {
        tracing::info!(identity = %identity.spiffe_id, "identity rotated");
        self.current.store(Arc::new(identity));
        self.changed.send_modify(|n| *n += 1);
    }

    /// Notified on each rotation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub(crate) fn swap(&self) -> &Arc<ArcSwap<Identity>> {
        &self.current
    }

    /// How many handshakes presented this workload's certificate after it had expired (the
    /// renewal did not arrive in time: peers refuse those handshakes).
    pub fn expired_uses(&self) -> u64 {
        self.expired_uses.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The certificate to present in a handshake. An expired one is still presented (the
    /// peer decides, and names the expiry in its error), counted, and logged at the first
    /// use and then at every power of two.
    pub(crate) fn certified_key(&self) -> Arc<CertifiedKey> {
        let identity = self.current.load();
        if std::time::SystemTime::now() > identity.not_after {
            let n = self
                .expired_uses
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if n.is_power_of_two() {
                let expired_for = identity.not_after.elapsed().unwrap_or_default();
                tracing::error!(
                    identity = %identity.spiffe_id,
                    ?expired_for,
                    handshakes = n,
                    "this workload's certificate has expired and no renewal has arrived: peers refuse its handshakes"
                );
            }
        }
        identity.certified_key.clone()
    }
}

/// The signature checks of a rustls verifier: rustls's own, with the process's crypto
/// provider's algorithms. Every verifier of the mesh checks chains and names its own way and
/// handshake signatures this one way.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &crate::identity::crypto_provider().signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &crate::identity::crypto_provider().signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            crate::identity::crypto_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}
pub(crate) use signature_checks;
