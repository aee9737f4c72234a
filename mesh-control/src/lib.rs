//! # mesh-control
//!
//! The control-plane side of the mesh, for development and tests: an xDS server speaking ADS
//! in both state-of-the-world and delta form to any xDS client (the mesh's own, proxyless
//! gRPC, Envoy).
//!
//! [`ads::ResourceCache`] holds the resources to serve; [`ads::AdsServer`] serves it, keeping
//! per-stream subscriptions, versions and nonces, and records every ACK and NACK per client
//! so they can be logged and inspected.
//!
//! Nothing in `mesh-core` or `mesh-tower` depends on this crate.
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

pub mod ads;
pub mod istio;
