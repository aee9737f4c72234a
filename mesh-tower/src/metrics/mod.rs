//! Golden-signal metrics for both directions: requests by outcome, latency histogram,
//! in-flight gauge, labelled by direction, route, cluster and peer identity (each label can
//! be turned off to bound cardinality; never raw paths or peer addresses).
//!
//! Recording is lock-free and allocation-free for label sets already seen: series live in an
//! `ArcSwap`ped two-level map looked up by `&str`, and every value is an atomic. A new label
//! set takes a lock once. Exposition uses prometheus-client's encoder (OpenMetrics text).
//!
//! An HTTP response is judged and timed at its head. A gRPC response is judged by the
//! `grpc-status` of its trailers and timed to its end (a trailers-only response at its head;
//! a stream the caller abandons counts as CANCELLED, one that breaks as UNAVAILABLE), so
//! the in-flight gauge covers the whole call. Structured access logs ([`AccessLog`]) are
//! written at the same moment.
//!
//! # Example
//!
//! ```
//! use mesh_tower::metrics::{Direction, Metrics, MetricsLayer};
//! use tower::ServiceBuilder;
//!
//! let metrics = Metrics::default();
//! let svc = ServiceBuilder::new()
//!     .layer(MetricsLayer::new(metrics.clone(), Direction::Inbound))
//!     .service_fn(|_req: http::Request<String>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//!     });
//! # drop(svc);
//! println!("{}", metrics.render());
//! ```

pub mod istio;
mod layer;
mod series;

pub use istio::Workload;
pub use layer::{AccessLog, MetricsLayer, MetricsService, Pending, ResponseFuture};
pub use series::*;

#[cfg(test)]
mod tests;
