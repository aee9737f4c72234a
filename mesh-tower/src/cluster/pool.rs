//! Connection pools: one hyper client per cluster, plain or mTLS, HTTP/1.1 or HTTP/2.

use crate::tls::MeshConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mesh_core::config::{Cluster, UpstreamProtocol};
use mesh_core::identity::IdentityStore;
use std::sync::Arc;
use std::time::Duration;

use super::service::MeshBody;

/// The connector for a cluster: TLS when the cluster has an `UpstreamTlsContext`, with the
/// workload identity, or with the trust and certificate the context names itself; `Err`
/// (kept and reported per request) when that TLS cannot be set up (no workload identity, an
/// unreadable CA file): the mesh never falls back to plaintext.
pub(super) fn connector_for(
    cluster: &Cluster,
    identity: Option<&IdentityStore>,
) -> Result<MeshConnector, String> {
    let Some(tls) = &cluster.tls else {
        return Ok(MeshConnector::new(None, cluster.connect_timeout, None));
    };
    let alpn: Vec<Vec<u8>> = if !tls.alpn.is_empty() {
        tls.alpn.iter().map(|a| a.as_bytes().to_vec()).collect()
    } else {
        match cluster.protocol {
            UpstreamProtocol::Http2 => vec![b"h2".to_vec()],
            UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
            UpstreamProtocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        }
    };
    let config = if mesh_core::identity::is_external(tls) {
        // The cluster names its own trust (Istio's SIMPLE and MUTUAL modes).
        mesh_core::identity::external_client_config(tls, identity, alpn)
            .map_err(|e| format!("cluster {:?}: TLS: {e}", cluster.name))?
    } else {
        let identity = identity.ok_or_else(|| {
            format!("cluster {:?} requires mTLS but the client has no workload identity (set one on the MeshClient)", cluster.name)
        })?;
        mesh_core::identity::client_config(identity, tls.san_matchers.clone(), alpn)
            .map_err(|e| format!("cluster {:?}: TLS config: {e}", cluster.name))?
    };
    let sni = (!tls.sni.is_empty()).then(|| tls.sni.clone());
    Ok(MeshConnector::new(
        Some(Arc::new(config)),
        cluster.connect_timeout,
        sni,
    ))
}

pub(super) fn client_for(
    cluster: &Cluster,
    connector: MeshConnector,
) -> Client<MeshConnector, MeshBody> {
    let mut builder = Client::builder(TokioExecutor::new());
    builder.pool_idle_timeout(Duration::from_secs(30));
    if cluster.protocol == UpstreamProtocol::Http2 {
        builder.http2_only(true);
        if let Some(h2) = &cluster.http2 {
            if let Some(w) = h2.initial_stream_window_size {
                builder.http2_initial_stream_window_size(w);
            }
            if let Some(w) = h2.initial_connection_window_size {
                builder.http2_initial_connection_window_size(w);
            }
        }
    }
    builder.build(connector)
}
