//! The plain configuration model the data path reads.
//!
//! These types mirror the parts of the xDS API the mesh implements, with the defaults of
//! Envoy and gRPC filled in and every reference checked. They hold no prost types: xDS
//! resources become these in [`crate::xds::translate`], and a [`Snapshot`] of them is what
//! [`crate::ConfigStore`] hands to each request.

mod cluster;
mod endpoint;
mod fault;
mod listener;
mod map;
mod matcher;
mod normalize;
mod rbac;
mod redirect;
mod retry;
mod route;
mod snapshot;
mod tls;

pub use cluster::*;
pub use endpoint::*;
pub use fault::*;
pub use listener::*;
pub use map::{Iter as ResourceIter, ResourceMap};
pub use matcher::*;
pub use normalize::*;
pub use rbac::*;
pub use redirect::*;
pub use retry::*;
pub use route::*;
pub use snapshot::*;
pub use tls::*;
