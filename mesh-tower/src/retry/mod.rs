//! Retries by the route's `retry_policy`.
//!
//! Conditions follow Envoy's `retry_on`: `5xx`, `gateway-error`, `reset`,
//! `connect-failure`, `refused-stream`, `retriable-status-codes`, `retriable-4xx`, and the gRPC
//! ones (`cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`, `unavailable`,
//! read from a trailers-only response's `grpc-status`). Each attempt may have a per-try
//! timeout; attempts are spaced by exponential backoff with full jitter; a retry avoids the
//! endpoints already tried when the policy has `previous_hosts`. Retries never exceed the
//! cluster's `max_retries` (or its retry budget).
//!
//! No attempt waits for the request body: the first one goes out at once and streams the body
//! as it arrives, while a copy of up to a cap (64 KiB by default) is kept for replay
//! ([`ReplayBody`]). A retry happens only while that copy holds the whole body read so far;
//! past the cap the request is simply not retried. Mirrors (the [`mirror`](crate::mirror)
//! layer above) read the same copy. A request whose route has no retry policy (and mirror
//! copies) pass straight through.
//!
//! # Example
//!
//! ```no_run
//! use mesh_core::ConfigStore;
//! use mesh_tower::cluster::{ClusterRegistry, ClusterService};
//! use mesh_tower::retry::RetryLayer;
//! use mesh_tower::route::RouteLayer;
//! use tower::ServiceBuilder;
//!
//! # async fn run() {
//! let store = ConfigStore::new();
//! let registry = ClusterRegistry::new(store.clone());
//! let client = ServiceBuilder::new()
//!     .layer(RouteLayer::new(store, "frontend:80"))
//!     .layer(RetryLayer::new(registry.clone()))
//!     .service(ClusterService::new(registry));
//! # drop(client); }
//! ```

mod backoff;
mod classify;
mod layer;
mod service;

pub use crate::replay::ReplayBody;
pub use classify::{classify, RetryReason};
pub use layer::RetryLayer;
pub use service::{ResponseFuture, Retry};

pub use crate::ext::{Attempt, Retries, ServedBy};

#[cfg(test)]
mod tests;
