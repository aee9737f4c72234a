//! A hyper server with the inbound stack: the mTLS / permissive acceptor, the peer's identity
//! and addresses in every request's extensions, HTTP/1.1 and HTTP/2, graceful drain on
//! shutdown.

use std::convert::Infallible;
use std::future::Future;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};

use crate::error::BoxError;
use crate::tls::{LocalAddr, MeshAcceptor, RemoteAddr};

/// Serves `service` on `listener` through `acceptor` until `shutdown`; then stops accepting
/// and lets open connections finish their requests.
///
/// ```no_run
/// # async fn run(identity: mesh_core::identity::IdentityStore) -> Result<(), Box<dyn std::error::Error>> {
/// use mesh_tower::tls::{MeshAcceptor, PeerIdentity, TlsMode};
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8443").await?;
/// let acceptor = MeshAcceptor::new(TlsMode::Strict, Some(&identity))?;
/// let app = tower::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
///     let peer = req.extensions().get::<PeerIdentity>().and_then(|p| p.0.clone());
///     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
///         bytes::Bytes::from(format!("hello {peer:?}")),
///     )))
/// });
/// mesh_tower::server::serve(listener, acceptor, app, std::future::pending()).await;
/// # Ok(()) }
/// ```
pub async fn serve<S, B>(
    listener: TcpListener,
    acceptor: MeshAcceptor,
    service: S,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let graceful = GracefulShutdown::new();
    let local = listener.local_addr().ok();
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let (stream, peer) = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!("{e}");
                    return;
                }
            };
            let hyper_svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(peer.clone());
                req.extensions_mut().insert(RemoteAddr(remote));
                if let Some(l) = local {
                    req.extensions_mut().insert(LocalAddr(l));
                }
                let svc = service.clone();
                async move {
                    match svc.oneshot(req).await {
                        Ok(resp) => Ok::<_, Infallible>(resp.map(|b| {
                            http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(
                                b,
                                Into::<BoxError>::into,
                            ))
                        })),
                        Err(e) => {
                            let e: BoxError = e.into();
                            tracing::warn!("inbound service failed: {e}");
                            let mut r = Response::new(http_body_util::BodyExt::boxed_unsync(
                                http_body_util::BodyExt::map_err(
                                    http_body_util::Empty::<bytes::Bytes>::new(),
                                    |never: Infallible| -> BoxError { match never {} },
                                ),
                            ));
                            *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                            Ok(r)
                        }
                    }
                }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), hyper_svc);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
