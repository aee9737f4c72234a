//! # mesh-core
//!
//! Everything of the mesh that is not per request: the plain configuration model
//! ([`config`]), the xDS client that fills it ([`xds`]), and the live [`ConfigStore`] that
//! the request path reads.
//!
//! Configuration flows one way:
//!
//! ```text
//! xDS server --ADS (SotW or delta)--> XdsClient --translate (or NACK)--> ConfigStore (ArcSwap<Snapshot>)
//! ```
//!
//! The [`xds::XdsClient`] subscribes to what the application asks for (`xds:///name` targets
//! name listeners) and follows references down the cascade: a listener's route configuration,
//! the routes' clusters, the clusters' endpoints. Each response is translated as a whole
//! into [`config`] types; a bad resource is NACKed with an error naming the resource and the
//! field, and the last good version keeps serving. Every change publishes a new immutable
//! [`config::Snapshot`]; a request takes one with a single atomic load and never locks.
//!
//! This crate knows nothing about tower layers: `mesh-tower` reads the store.

pub mod config;
mod dump;
mod error;
pub mod identity;
mod resource;
mod store;
pub mod xds;

pub use error::{BootstrapError, Error, XdsError};
pub use store::{
    ConfigDump, ConfigStore, DumpResources, Rejected, ResourceDump, ResourceStatus, XdsCounts,
};
pub use xds::translate::TranslateError;
