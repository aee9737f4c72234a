//! The connections to the bootstrap's servers: an endpoint per server with its channel
//! credentials, and the probe that finds the first reachable one (fallback, gRFC A71).

use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::bootstrap::{ChannelCreds, XdsServer};
use crate::error::{BootstrapError, Error};

/// One server of the bootstrap, ready to connect.
pub(super) struct Channel {
    pub(super) uri: String,
    pub(super) endpoint: Endpoint,
    /// The server lists `ignore_resource_deletion` (gRFC A53).
    pub(super) ignore_deletion: bool,
}

/// The endpoint of `xds_servers[i]`, with its channel credentials.
pub(super) fn endpoint(
    server: &XdsServer,
    i: usize,
    connect_timeout: Duration,
) -> Result<Endpoint, Error> {
    let uri = server.endpoint_uri();
    let bad = |key: &str, message: String| BootstrapError::Field {
        origin: "bootstrap".into(),
        key: format!("xds_servers[{i}].{key}"),
        message,
    };
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| bad("server_uri", format!("{uri:?} is not a valid URI: {e}")))?
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if let ChannelCreds::Tls {
        ca_certificate_file,
        certificate_file,
        private_key_file,
    } = &server.creds
    {
        let read = |path: &str, key: &str| {
            std::fs::read(path).map_err(|e| bad(key, format!("cannot read {path}: {e}")))
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(
            ca_certificate_file,
            "channel_creds.config.ca_certificate_file",
        )?));
        if let (Some(cert), Some(key)) = (certificate_file, private_key_file) {
            tls = tls.identity(Identity::from_pem(
                read(cert, "channel_creds.config.certificate_file")?,
                read(key, "channel_creds.config.private_key_file")?,
            ));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| bad("channel_creds", format!("bad TLS config: {e}")))?;
    }
    Ok(endpoint)
}

/// The first of `servers` (in priority order) to accept a connection, tried with backoff;
/// never resolves when there are none.
pub(super) async fn reachable(servers: Vec<Endpoint>, initial: Duration, max: Duration) -> usize {
    if servers.is_empty() {
        return std::future::pending().await;
    }
    let mut delay = initial;
    loop {
        tokio::time::sleep(delay.mul_f64(0.8 + fastrand::f64() * 0.4)).await;
        for (i, endpoint) in servers.iter().enumerate() {
            if endpoint.connect().await.is_ok() {
                return i;
            }
        }
        delay = delay.mul_f64(1.6).min(max);
    }
}
