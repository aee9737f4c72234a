//! # mesh-tonic
//!
//! The mesh for tonic services, with no behaviour of its own: [`MeshChannel`] puts the whole
//! outbound stack of [`mesh_tower::MeshClient`] (route, retry, breaker, balance, mTLS,
//! metrics, trace) under a generated tonic client, and [`serve`] runs a tonic service behind
//! the inbound stack ([`mesh_tower::server::InboundLayer`]: mTLS or plaintext by the
//! server's xDS listener, RBAC, metrics, trace) with graceful shutdown.
//!
//! gRPC semantics are kept throughout: a mesh refusal reaches the caller as a gRPC status
//! (UNAVAILABLE for an overloaded or empty cluster, DEADLINE_EXCEEDED for a timeout,
//! UNIMPLEMENTED for no route), `grpc-timeout` bounds the call and is passed on to the
//! server, retries follow gRFC A6 (a trailers-only status is retried by the route's
//! `retry_on` gRPC codes), and metrics and outlier detection read the status from the
//! trailers.
//!
//! ```no_run
//! # use std::time::Duration;
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use mesh_tonic::Mesh;
//!
//! // GRPC_XDS_BOOTSTRAP: the same bootstrap as proxyless gRPC (Istio's works unchanged);
//! // its `certificate_providers.default`, if any, is the workload identity.
//! let mesh = Mesh::from_env()?;
//! let channel = mesh.channel("xds:///greeter.default.svc.cluster.local:50051").await?;
//! // let mut client = GreeterClient::new(channel);   // any generated tonic client
//! # drop(channel); Ok(()) }
//! ```

mod channel;
mod mesh;
mod server;

pub use channel::{MeshChannel, ResponseFuture};
pub use mesh::{Mesh, SetupError};
pub use server::{serve, ServeOptions};
