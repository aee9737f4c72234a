//! The connector of the endpoint pools: plain TCP, or mTLS with SPIFFE verification.
//!
//! For a cluster with an `UpstreamTlsContext`, connections are TLS 1.3 (1.2 allowed) with the
//! workload's certificate, the server verified against the trust bundle and the cluster's SAN
//! matchers during the handshake (see [`mesh_core::identity`]), ALPN `h2`/`http/1.1` by the
//! cluster's protocol, and a handshake bounded by the cluster's connect timeout. A connection
//! that negotiated `h2` is used as HTTP/2. Certificates rotate inside rustls: pools keep their
//! connections.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tower::Service;

use crate::error::BoxError;

mod acceptor;

pub use acceptor::{
    AcceptError, LocalAddr, MeshAcceptor, PeerIdentity, RemoteAddr, ServerStream, TlsMode,
};

/// A connection to an endpoint: plaintext or TLS, counted against the cluster's
/// `max_connections` while it lives.
#[derive(Debug)]
pub struct MeshStream {
    io: Io,
    _guard: Option<ConnectionGuard>,
}

// One per pooled connection, held in place for its life: the size difference costs nothing,
// and boxing would add an indirection to every read and write.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Io {
    Plain(TokioIo<TcpStream>),
    Tls(TokioIo<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Releases a connection slot when the connection is gone.
#[derive(Debug)]
struct ConnectionGuard(Arc<AtomicU32>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A cluster's connection limits (updated with the config): open connections against
/// `max_connections`, and requests waiting for a connection to be set up against
/// `max_pending_requests` (requests never wait in a queue otherwise: over `max_connections`
/// they fail fast).
#[derive(Clone, Debug, Default)]
pub struct ConnectionLimit {
    /// Connections open now.
    pub open: Arc<AtomicU32>,
    /// `max_connections`.
    pub max: Arc<AtomicU32>,
    /// Connections being set up now (each for a request waiting on it).
    pub connecting: Arc<AtomicU32>,
    /// `max_pending_requests`.
    pub max_pending: Arc<AtomicU32>,
}

/// The error of a connection refused by `max_connections` or `max_pending_requests` (mapped
/// to [`MeshError::Overloaded`](crate::MeshError::Overloaded) by the cluster layer).
#[derive(Debug, thiserror::Error)]
#[error("{limit} limit of {max} reached")]
pub struct ConnectionLimitReached {
    /// Which threshold.
    pub limit: &'static str,
    /// Its value.
    pub max: u32,
}

impl MeshStream {
    /// The server's certificate chain, for TLS connections.
    pub fn peer_certificates(&self) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
        match &self.io {
            Io::Tls(t) => t.inner().get_ref().1.peer_certificates(),
            Io::Plain(_) => None,
        }
    }
}

impl Connection for MeshStream {
    fn connected(&self) -> Connected {
        match &self.io {
            Io::Plain(s) => s.connected(),
            Io::Tls(t) => {
                let (_, tls) = t.inner().get_ref();
                let connected = Connected::new();
                if tls.alpn_protocol() == Some(b"h2") {
                    connected.negotiated_h2()
                } else {
                    connected
                }
            }
        }
    }
}

impl Read for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl Write for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Connects to endpoints, with TLS when the cluster has a client config.
///
/// ```no_run
/// # fn run(identity: mesh_core::identity::IdentityStore) -> Result<(), rustls::Error> {
/// use std::time::Duration;
/// use mesh_tower::tls::MeshConnector;
/// let tls = mesh_core::identity::client_config(&identity, vec![], vec![b"h2".to_vec()])?;
/// let connector = MeshConnector::new(Some(std::sync::Arc::new(tls)), Duration::from_secs(5), None);
/// # drop(connector); Ok(()) }
/// ```
#[derive(Clone)]
pub struct MeshConnector {
    http: HttpConnector,
    tls: Option<tokio_rustls::TlsConnector>,
    handshake_timeout: Duration,
    sni: Option<ServerName<'static>>,
    limit: Option<ConnectionLimit>,
    metrics: Option<crate::metrics::Metrics>,
}

impl MeshConnector {
    /// A connector; with `tls`, every connection is TLS with that config. `sni` overrides the
    /// server name sent (else the endpoint address).
    pub fn new(
        tls: Option<Arc<rustls::ClientConfig>>,
        connect_timeout: Duration,
        sni: Option<String>,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        Self {
            http,
            tls: tls.map(tokio_rustls::TlsConnector::from),
            handshake_timeout: connect_timeout,
            sni: sni.and_then(|s| ServerName::try_from(s).ok()),
            limit: None,
            metrics: None,
        }
    }

    /// Counts failed TLS handshakes in `metrics` (`mesh_tls_handshake_failures_total`).
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Counts connections against `limit`; over it, connecting fails at once with
    /// [`ConnectionLimitReached`].
    pub fn with_limit(mut self, limit: ConnectionLimit) -> Self {
        self.limit = Some(limit);
        self
    }
}

impl std::fmt::Debug for MeshConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshConnector")
            .field("tls", &self.tls.is_some())
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

/// The future of [`MeshConnector`].
pub type ConnectFuture = Pin<Box<dyn Future<Output = Result<MeshStream, BoxError>> + Send>>;

impl Service<Uri> for MeshConnector {
    type Response = MeshStream;
    type Error = BoxError;
    // Connection setup happens once per pooled connection, not per request: a boxed future
    // here costs nothing on the request path.
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_owned();
        let mut plain = uri.clone().into_parts();
        plain.scheme = Some(http::uri::Scheme::HTTP);
        let tcp_uri = Uri::from_parts(plain).unwrap_or(uri);
        let connecting = self.http.call(tcp_uri);
        let tls = self.tls.clone();
        let timeout = self.handshake_timeout;
        let sni = self.sni.clone();
        let metrics = self.metrics.clone();
        let (guard, setting_up) = match &self.limit {
            None => (None, None),
            Some(limit) => {
                let refuse = |limit: &'static str, max: u32| -> Self::Future {
                    Box::pin(async move {
                        Err(Box::new(ConnectionLimitReached { limit, max }) as BoxError)
                    })
                };
                // Correctness: take each slot first and check second, so racing connects
                // cannot all pass.
                let max = limit.max.load(Ordering::Acquire);
                if limit.open.fetch_add(1, Ordering::AcqRel) >= max {
                    limit.open.fetch_sub(1, Ordering::AcqRel);
                    return refuse("max_connections", max);
                }
                let open = ConnectionGuard(limit.open.clone());
                let max_pending = limit.max_pending.load(Ordering::Acquire);
                if limit.connecting.fetch_add(1, Ordering::AcqRel) >= max_pending {
                    limit.connecting.fetch_sub(1, Ordering::AcqRel);
                    drop(open);
                    return refuse("max_pending_requests", max_pending);
                }
                (Some(open), Some(ConnectionGuard(limit.connecting.clone())))
            }
        };
        Box::pin(async move {
            // The request stops pending once its connection is up (or failed).
            let _setting_up = setting_up;
            let tcp = connecting.await?.into_inner();
            let Some(tls) = tls else {
                return Ok(MeshStream {
                    io: Io::Plain(TokioIo::new(tcp)),
                    _guard: guard,
                });
            };
            let name = match sni {
                Some(n) => n,
                None => match host.parse::<std::net::IpAddr>() {
                    Ok(ip) => ServerName::IpAddress(ip.into()),
                    Err(_) => ServerName::try_from(host.clone())
                        .map_err(|e| format!("invalid server name {host:?}: {e}"))?,
                },
            };
            let handshake = tokio::time::timeout(timeout, tls.connect(name, tcp))
                .await
                .map_err(|_| format!("TLS handshake with {host} timed out after {timeout:?}"))
                .and_then(|r| r.map_err(|e| format!("TLS handshake with {host}: {e}")));
            let stream = match handshake {
                Ok(s) => s,
                Err(e) => {
                    if let Some(m) = &metrics {
                        m.counters().tls_failures.fetch_add(1, Ordering::Relaxed);
                    }
                    return Err(e.into());
                }
            };
            Ok(MeshStream {
                io: Io::Tls(TokioIo::new(stream)),
                _guard: guard,
            })
        })
    }
}
