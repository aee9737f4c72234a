//! Routing: the first layer of the outbound path.
//!
//! One [`ConfigStore`](mesh_core::ConfigStore) load per request gives the listener's route
//! configuration; the request's authority picks the virtual host, its path, headers and
//! query pick the route, and a weighted draw picks the cluster (canary and A/B splits). The
//! route's header changes and rewrites are applied, and the [`RouteDecision`] is put in the
//! request extensions for the layers after it (fault, timeout, retry, cluster) and for
//! metrics, and on the response's extensions for the layers before it (trace) and the caller.
//!
//! # Example
//!
//! ```
//! use mesh_core::ConfigStore;
//! use mesh_tower::route::RouteLayer;
//! use tower::ServiceBuilder;
//!
//! let store = ConfigStore::new();
//! let svc = ServiceBuilder::new()
//!     .layer(RouteLayer::new(store, "frontend.prod.svc.cluster.local:80"))
//!     .service_fn(|req: http::Request<()>| async move {
//!         let decision = req.extensions().get::<mesh_tower::route::RouteDecision>().unwrap();
//!         Ok::<_, mesh_tower::BoxError>(http::Response::new(decision.cluster().to_owned()))
//!     });
//! # drop(svc);
//! ```

mod decision;
mod layer;
mod service;

pub use decision::{decide, RouteDecision};
pub use layer::RouteLayer;
pub use service::{ResponseFuture, Route};

#[cfg(test)]
mod tests;
