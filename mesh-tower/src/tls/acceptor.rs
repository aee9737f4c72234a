//! The inbound side: STRICT / PERMISSIVE / DISABLE on one port, peer identity out.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mesh_core::identity::peer_spiffe_id;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How a port treats TLS (PeerAuthentication's modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// mTLS only, client certificate required.
    Strict,
    /// mTLS and plaintext on the same port, told apart by the first byte.
    Permissive,
    /// Plaintext only.
    Disable,
}

impl TlsMode {
    /// The mode a server listener from xDS describes: every chain TLS with a required client
    /// certificate is STRICT; a mix of TLS and plaintext chains is PERMISSIVE; no TLS is
    /// DISABLE.
    pub fn from_listener(listener: &mesh_core::config::ServerListener) -> Self {
        let chains: Vec<_> = listener
            .filter_chains
            .iter()
            .chain(listener.default_filter_chain.iter())
            .collect();
        let tls = chains.iter().filter(|c| c.tls.is_some()).count();
        let strict = chains
            .iter()
            .all(|c| c.tls.as_ref().is_some_and(|t| t.require_client_certificate));
        match (tls, strict) {
            (0, _) => Self::Disable,
            (_, true) => Self::Strict,
            _ => Self::Permissive,
        }
    }
}

pub use crate::ext::{LocalAddr, PeerIdentity, RemoteAddr};

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// A plaintext client on a STRICT port.
    #[error("plaintext connection from {peer} refused: the port is STRICT (mTLS only)")]
    PlaintextOnStrict {
        /// Client address.
        peer: std::net::SocketAddr,
    },
    /// The TLS handshake failed (bad or missing client certificate, wrong CA...).
    #[error("TLS handshake with {peer} failed: {source}")]
    Handshake {
        /// Client address.
        peer: std::net::SocketAddr,
        /// The TLS error (certificate refused, protocol mismatch, timeout...).
        #[source]
        source: io::Error,
    },
    /// The client sent nothing, or too slowly.
    #[error("connection from {peer} timed out before completing the handshake ({after:?})")]
    Timeout {
        /// Client address.
        peer: std::net::SocketAddr,
        /// The handshake timeout.
        after: Duration,
    },
    /// Reading the first byte failed.
    #[error("connection from {peer}: {source}")]
    Io {
        /// Client address.
        peer: std::net::SocketAddr,
        /// The I/O error on the connection.
        #[source]
        source: io::Error,
    },
}

/// An accepted connection.
#[derive(Debug)]
pub enum ServerStream {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts connections by a [`TlsMode`].
///
/// ```no_run
/// # async fn run(identity: mesh_core::identity::IdentityStore, tcp: tokio::net::TcpStream) -> Result<(), Box<dyn std::error::Error>> {
/// use mesh_tower::tls::{MeshAcceptor, TlsMode};
/// let acceptor = MeshAcceptor::new(TlsMode::Permissive, Some(&identity))?;
/// let (stream, peer) = acceptor.accept(tcp).await?;
/// println!("peer identity: {:?}", peer.0);
/// # drop(stream); Ok(()) }
/// ```
#[derive(Clone)]
pub struct MeshAcceptor {
    mode: TlsMode,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handshake_timeout: Duration,
    metrics: Option<crate::metrics::Metrics>,
}

impl std::fmt::Debug for MeshAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshAcceptor")
            .field("mode", &self.mode)
            .finish()
    }
}

impl MeshAcceptor {
    /// An acceptor for `mode`; STRICT and PERMISSIVE need the workload `identity`.
    ///
    /// # Errors
    /// STRICT or PERMISSIVE without identity, or a TLS config error.
    pub fn new(
        mode: TlsMode,
        identity: Option<&mesh_core::identity::IdentityStore>,
    ) -> Result<Self, String> {
        let tls = match (mode, identity) {
            (TlsMode::Disable, _) => None,
            (_, None) => return Err(format!("{mode:?} needs a workload identity")),
            (_, Some(id)) => {
                let config = mesh_core::identity::server_config(
                    id,
                    mode == TlsMode::Strict,
                    vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                )
                .map_err(|e| e.to_string())?;
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
            }
        };
        Ok(Self {
            mode,
            tls,
            handshake_timeout: Duration::from_secs(10),
            metrics: None,
        })
    }

    /// Counts refused and failed handshakes (plaintext on STRICT, TLS errors, timeouts) in
    /// `metrics` (`mesh_tls_handshake_failures_total`).
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Bounds the wait for the first byte and the handshake (default 10 s).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The mode.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Accepts `tcp`: TLS or plaintext by the mode (PERMISSIVE peeks at the first byte: a TLS
    /// handshake record starts with 0x16).
    ///
    /// # Errors
    /// Plaintext on a STRICT port, a failed handshake, or a timeout.
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> Result<(ServerStream, PeerIdentity), AcceptError> {
        let peer = tcp.peer_addr().map_err(|source| AcceptError::Io {
            peer: ([0, 0, 0, 0], 0).into(),
            source,
        })?;
        // Responses are written whole; waiting for ACKs of small segments (Nagle) only adds
        // latency, as every proxy knows.
        let _ = tcp.set_nodelay(true);
        let timeout = self.handshake_timeout;
        let work = async {
            let Some(tls) = &self.tls else {
                return Ok((ServerStream::Plain(tcp), PeerIdentity(None)));
            };
            let mut first = [0u8; 1];
            let n = tcp
                .peek(&mut first)
                .await
                .map_err(|source| AcceptError::Io { peer, source })?;
            let is_tls = n == 1 && first[0] == 0x16;
            if !is_tls {
                return match self.mode {
                    TlsMode::Permissive => Ok((ServerStream::Plain(tcp), PeerIdentity(None))),
                    _ => Err(AcceptError::PlaintextOnStrict { peer }),
                };
            }
            let stream = tls
                .accept(tcp)
                .await
                .map_err(|source| AcceptError::Handshake { peer, source })?;
            let id = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(peer_spiffe_id);
            Ok((ServerStream::Tls(Box::new(stream)), PeerIdentity(id)))
        };
        let out = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| AcceptError::Timeout {
                peer,
                after: timeout,
            })
            .and_then(|r| r);
        if let (Err(e), Some(m)) = (&out, &self.metrics) {
            if !matches!(e, AcceptError::Io { .. }) {
                m.counters()
                    .tls_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        out
    }
}
