//! axum integration (feature `axum`).
//!
//! - [`InboundLayer`](crate::server::InboundLayer) is an ordinary axum layer:
//!   `Router::layer(InboundLayer::new("reviews"))` (its error type is `Infallible`; refusals
//!   and failures are answered as responses).
//! - Servers run by [`mesh_tower::server`](crate::server) put axum's
//!   [`ConnectInfo<SocketAddr>`](axum::extract::ConnectInfo) in every request, so handlers
//!   that take it work unchanged.
//! - The caller's SPIFFE identity is an extractor: [`PeerIdentity`] (`None` for plaintext),
//!   or [`Peer`], which refuses a request with no verified identity (401).
//!
//! ```
//! use axum::{routing::get, Router};
//! use axum::extract::ConnectInfo;
//! use mesh_tower::axum::Peer;
//! use mesh_tower::server::InboundLayer;
//! use std::net::SocketAddr;
//!
//! async fn hello(Peer(id): Peer, ConnectInfo(addr): ConnectInfo<SocketAddr>) -> String {
//!     format!("hello {id} from {addr}")
//! }
//!
//! let app: Router = Router::new()
//!     .route("/hello", get(hello))
//!     .layer(InboundLayer::new("greeter"));
//! // Serve `app` with `mesh_tower::server::serve` or `serve_xds`.
//! # drop(app);
//! ```

use axum::extract::FromRequestParts;
use http::request::Parts;
use http::StatusCode;
use mesh_core::identity::SpiffeId;

pub use crate::ext::PeerIdentity;

impl<S: Send + Sync> FromRequestParts<S> for PeerIdentity {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<PeerIdentity>().cloned().ok_or((
            StatusCode::INTERNAL_SERVER_ERROR,
            "no peer identity: the request was not served by mesh_tower::server",
        ))
    }
}

/// The caller's verified SPIFFE identity; a request without one (plaintext, or not served
/// by `mesh_tower::server`) is refused with 401.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer(pub SpiffeId);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<PeerIdentity>() {
            Some(PeerIdentity(Some(id))) => Ok(Peer(id.clone())),
            _ => Err((
                StatusCode::UNAUTHORIZED,
                "this endpoint needs a caller with a verified mesh identity (mTLS)",
            )),
        }
    }
}
