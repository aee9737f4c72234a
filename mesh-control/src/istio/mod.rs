//! Istio-style configuration: multi-document YAML with `apiVersion`/`kind`/`metadata`/`spec`.
//!
//! [`parse`] reads the supported kinds (ServiceEntry, WorkloadEntry, VirtualService,
//! DestinationRule, PeerAuthentication, AuthorizationPolicy) and remembers where each
//! document came from, so every problem found later is reported as `file:line: message`.
//! [`generate()`] turns the result into the xDS resources Istio would send proxyless clients;
//! [`validate`] is the `istioctl analyze` of the mesh.

pub mod generate;
mod index;
pub mod ledger;
pub mod locality;
pub mod model;
mod origin;
mod parse;
pub mod validate;

pub use generate::{generate, Flavour, Generated, Options};
pub use model::*;
pub use origin::{ConfigError, Origin, Seg};
pub use parse::{load, parse, Config, Doc};

#[cfg(test)]
mod tests;
