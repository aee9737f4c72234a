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
//! [`istio`] reads Istio's YAML (ServiceEntry, WorkloadEntry, VirtualService,
//! DestinationRule, PeerAuthentication, AuthorizationPolicy) and generates the xDS Istio
//! would send; [`serve::ConfigSource`] watches the files and republishes on change. The
//! `meshctl` binary puts it together: `serve`, `validate`, `dump`, `certs`.
//!
//! Nothing in `mesh-core` or `mesh-tower` depends on this crate.

pub mod ads;
pub mod ca;
pub mod dump;
pub mod istio;
pub mod serve;
