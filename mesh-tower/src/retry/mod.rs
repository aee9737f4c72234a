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
//! past the cap the request is simply not retried. Mirrors read the same copy.
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

mod body;
mod classify;
mod layer;
mod service;

pub use body::ReplayBody;
pub use classify::{classify, RetryReason};
pub use layer::RetryLayer;
pub use service::{ResponseFuture, Retry};

use std::net::SocketAddr;

/// Attempt information put on each request the retry layer sends.
#[derive(Clone, Debug, Default)]
pub struct Attempt {
    /// 0 for the first attempt.
    pub number: u32,
    /// Endpoints tried so far.
    pub tried: Vec<SocketAddr>,
    /// Avoid `tried` when picking (previous_hosts).
    pub avoid_tried: bool,
    /// The route's per-try timeout: an attempt still unanswered after it is counted against
    /// its endpoint by outlier detection (as a gateway failure, as Envoy counts timeouts).
    pub per_try_timeout: Option<std::time::Duration>,
    /// How many picks to make to avoid a tried host.
    pub host_selection_max_attempts: u32,
}

/// The endpoint that answered, put on responses by the cluster layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServedBy(pub SocketAddr);

/// How many times the request was retried before the response returned (0: the first
/// attempt answered), put on responses by the retry layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retries(pub u32);

#[cfg(test)]
mod tests;
