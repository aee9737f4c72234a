//! Certificates over SDS from the xDS server, on an ADS stream of their own.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::config::core::v3::DataSource;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status;
use futures::StreamExt;
use prost::{Message, Name};

use super::store::{Identity, IdentityError, IdentityStore};
use crate::xds::Bootstrap;

/// Subscribes to a certificate secret and a trust-bundle secret over SDS and keeps an
/// [`IdentityStore`] up to date as the server renews them.
#[derive(Debug)]
pub struct SdsProvider;

fn bytes(ds: Option<&DataSource>) -> Option<Vec<u8>> {
    match ds?.specifier.as_ref()? {
        Specifier::InlineBytes(b) => Some(b.clone()),
        Specifier::InlineString(s) => Some(s.as_bytes().to_vec()),
        _ => None,
    }
}

impl SdsProvider {
    /// [`SdsProvider::start`] with the secret names of a TLS context (`identity` and
    /// `validation` of an Upstream/Downstream TLS context, both SDS).
    ///
    /// # Errors
    /// Either source is not SDS, or as [`SdsProvider::start`].
    pub async fn start_for(
        bootstrap: &Bootstrap,
        identity: Option<&crate::config::CertSource>,
        validation: Option<&crate::config::CertSource>,
        timeout: Duration,
    ) -> Result<IdentityStore, IdentityError> {
        use crate::config::CertSource;
        match (identity, validation) {
            (Some(CertSource::Sds { name: cert }), Some(CertSource::Sds { name: roots })) => {
                Self::start(bootstrap, cert, roots, timeout).await
            }
            other => Err(IdentityError::Config(format!(
                "the TLS context does not take both its certificate and its trust bundle from SDS: {other:?}"
            ))),
        }
    }

    /// Connects to the bootstrap's xDS server, subscribes to the secrets `cert` (a
    /// `TlsCertificate`) and `roots` (a `CertificateValidationContext`), and waits up to
    /// `timeout` for the first identity. The stream then stays open; renewals replace the
    /// identity, and a dropped stream is reopened with backoff.
    ///
    /// # Errors
    /// The secrets did not arrive in time, or are not usable.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn start(
        bootstrap: &Bootstrap,
        cert: &str,
        roots: &str,
        timeout: Duration,
    ) -> Result<IdentityStore, IdentityError> {
        let server = bootstrap
            .servers
            .first()
            .ok_or_else(|| IdentityError::Config("bootstrap has no xds_servers".into()))?
            .endpoint_uri();
        let node = bootstrap.node.clone();
        let names = vec![cert.to_owned(), roots.to_owned()];
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<IdentityStore>();
        let (cert, roots) = (cert.to_owned(), roots.to_owned());
        tokio::spawn(async move {
            let mut first_tx = Some(first_tx);
            let mut store: Option<IdentityStore> = None;
            let mut backoff = Duration::from_millis(200);
            loop {
                let result = async {
                    let mut client = AggregatedDiscoveryServiceClient::connect(server.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    let _ = tx.send(DiscoveryRequest {
                        node: Some(node.clone()),
                        resource_names: names.clone(),
                        type_url: Secret::type_url(),
                        ..Default::default()
                    });
                    let mut stream = client
                        .stream_aggregated_resources(
                            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
                        )
                        .await
                        .map_err(|e| e.to_string())?
                        .into_inner();
                    while let Some(resp) = stream.next().await {
                        let resp: DiscoveryResponse = resp.map_err(|e| e.to_string())?;
                        let parsed = identity_from(&resp, &cert, &roots);
                        let error_detail = match parsed {
                            Ok(identity) => {
                                match &store {
                                    Some(s) => s.store(identity),
                                    None => {
                                        let s = IdentityStore::new(identity);
                                        if let Some(tx) = first_tx.take() {
                                            let _ = tx.send(s.clone());
                                        }
                                        store = Some(s);
                                    }
                                }
                                None
                            }
                            Err(e) => {
                                tracing::warn!("SDS: {e}");
                                Some(Status {
                                    code: 3,
                                    message: e,
                                    details: vec![],
                                })
                            }
                        };
                        let _ = tx.send(answer(&resp, &names, error_detail));
                        backoff = Duration::from_millis(200);
                    }
                    Ok::<_, String>(())
                }
                .await;
                if let Err(e) = result {
                    tracing::warn!("SDS stream to {server}: {e}");
                }
                if first_tx.as_ref().is_some_and(|tx| tx.is_closed()) {
                    return;
                }
                if store
                    .as_ref()
                    .is_some_and(|s| std::sync::Arc::strong_count(s.swap()) == 1)
                {
                    // Nobody holds the identity any more.
                    return;
                }
                tokio::time::sleep(backoff.mul_f64(0.8 + fastrand::f64() * 0.4)).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        });
        tokio::time::timeout(timeout, first_rx)
            .await
            .map_err(|_| {
                IdentityError::Config(format!("no certificate over SDS within {timeout:?}"))
            })?
            .map_err(|_| IdentityError::Config("the SDS task ended".into()))
    }
}

/// The identity a response carries: the certificate chain and key of secret `cert` and the
/// trust bundle of secret `roots`.
fn identity_from(resp: &DiscoveryResponse, cert: &str, roots: &str) -> Result<Identity, String> {
    let mut chain = None;
    let mut key = None;
    let mut bundle = None;
    for any in &resp.resources {
        let Ok(s) = Secret::decode(any.value.as_slice()) else {
            continue;
        };
        match s.r#type {
            Some(secret::Type::TlsCertificate(t)) if s.name == cert => {
                chain = bytes(t.certificate_chain.as_ref());
                key = bytes(t.private_key.as_ref());
            }
            Some(secret::Type::ValidationContext(v)) if s.name == roots => {
                bundle = bytes(v.trusted_ca.as_ref());
            }
            _ => {}
        }
    }
    match (chain, key, bundle) {
        (Some(c), Some(k), Some(b)) => Identity::from_pem(&c, &k, &b).map_err(|e| e.to_string()),
        _ => Err("the response lacks the certificate or the trust bundle".to_owned()),
    }
}

/// The ACK (or, with `error_detail`, the NACK) of a response.
fn answer(
    resp: &DiscoveryResponse,
    names: &[String],
    error_detail: Option<Status>,
) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: if error_detail.is_none() {
            resp.version_info.clone()
        } else {
            String::new()
        },
        resource_names: names.to_vec(),
        type_url: Secret::type_url(),
        response_nonce: resp.nonce.clone(),
        error_detail,
        ..Default::default()
    }
}
