//! # mesh-tower
//!
//! The mesh's request path, as tower layers linked into the service: no proxy hop.
//!
//! The outbound stack routes each request by the live xDS configuration
//! ([`route`]), injects the route's [`fault`]s, bounds it by the route's [`timeout`], [`retry`]s it by the route's policy,
//! then hands each attempt to its cluster ([`cluster`]): circuit breaker, endpoint choice
//! (priority failover, least-request / round robin / random) and a pooled HTTP/1.1 or HTTP/2
//! connection to the chosen endpoint. [`MeshClient`] assembles it into one
//! `tower::Service<http::Request<B>>` to put where a hyper client would be.
//!
//! A request that comes before its configuration is complete (listener, routes, the
//! clusters they name, their endpoints) waits for it within its deadline ([`ready`]).
//!
//! Configuration is read only through [`mesh_core::ConfigStore`]: one atomic load per request,
//! nothing locks. State that must outlive a configuration update (connection pools, breaker
//! counters, endpoint load) lives in per-cluster and per-endpoint objects keyed by name and
//! address, carried from snapshot to snapshot.
//!
//! # Features
//!
//! - `otlp`: OTLP export of spans and golden signals (`mesh_tower::otlp`): the tracing-opentelemetry
//!   pipeline for the mesh's `tracing` spans and the application's, and the metrics.
//! - `axum`: the `mesh_tower::axum` module (the peer identity as extractors) and axum's
//!   `ConnectInfo<SocketAddr>` in every request the mesh's servers serve.
//!
//! Neither is on by default.

pub mod admin;
pub mod authz;
#[cfg(feature = "axum")]
pub mod axum;
pub mod body;
mod client;
pub mod cluster;
mod error;
pub mod ext;
pub mod fault;
pub mod metrics;
pub mod mirror;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod ready;
pub mod replay;
pub mod retry;
pub mod route;
mod sensitive;
pub mod server;
pub mod timeout;
pub mod tls;
pub mod trace;

pub use sensitive::SENSITIVE_HEADERS;

pub use client::{MeshClient, MeshClientBuilder, ResponseBody, ResponseFuture};
pub use error::{BoxError, MeshError};
