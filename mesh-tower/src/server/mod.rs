//! The inbound side: [`serve`] runs a hyper server behind the mTLS / permissive acceptor (the
//! peer's identity and addresses in every request's extensions, HTTP/1.1 and HTTP/2,
//! graceful drain on shutdown), and [`InboundLayer`] puts the inbound stack in front of the
//! application: a server span (trace context extracted from the caller), golden-signal
//! metrics and access logs, then RBAC authorization. [`serve_xds`] does both, with the TLS
//! mode and authorization rules taken from the server's xDS listener.

mod serve;
mod xds;

pub use serve::*;
pub use xds::{listener_policy, serve_xds, server_policy, ServeError, ServerPolicy, XdsServe};
