//! Clusters: per-cluster runtime state that survives configuration updates, circuit
//! breaking, endpoint choice, and the pooled HTTP connections to the endpoints.
//!
//! A [`ClusterRegistry`] follows the [`ConfigStore`](mesh_core::ConfigStore): for every
//! cluster in the snapshot it keeps a [`ClusterRuntime`] keyed by name, and for every endpoint
//! an [`EndpointRuntime`] keyed by address. A new snapshot updates them in place, so
//! connection pools, breaker counters and per-endpoint load carry over; a removed endpoint's
//! in-flight requests finish on their connections.
//!
//! [`ClusterService`] is the terminal service of the outbound stack: it reads the
//! [`RouteDecision`](crate::route::RouteDecision), applies the cluster's `max_requests`
//! breaker (failing fast with [`MeshError::Overloaded`](crate::MeshError::Overloaded)),
//! picks an endpoint with the cluster's [`balance`] policy and sends the request on that
//! endpoint's pool (HTTP/1.1, or HTTP/2 prior knowledge for clusters configured for it).
//!
//! # Example
//!
//! ```no_run
//! use mesh_core::ConfigStore;
//! use mesh_tower::cluster::{ClusterRegistry, ClusterService};
//! use mesh_tower::route::RouteLayer;
//! use tower::ServiceBuilder;
//!
//! # async fn run() {
//! let store = ConfigStore::new();
//! let registry = ClusterRegistry::new(store.clone());
//! let client = ServiceBuilder::new()
//!     .layer(RouteLayer::new(store, "frontend:80"))
//!     .service(ClusterService::new(registry));
//! # drop(client); }
//! ```

pub mod balance;
mod breaker;
mod dns;
mod endpoint;
mod outlier;
mod pool;
mod registry;
pub mod ring;
mod runtime;
mod service;

pub use breaker::{RequestGuard, RetryGuard};
pub(crate) use endpoint::EndpointStats;
pub use endpoint::{EndpointRuntime, Outcome};
pub use registry::ClusterRegistry;
pub use runtime::ClusterRuntime;
pub use service::{ClusterBody, ClusterService, GrpcEnd, MeshBody, ResponseFuture};

#[cfg(test)]
mod tests;
