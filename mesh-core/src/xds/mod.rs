//! The xDS client: bootstrap, ADS protocol state machine, translation and the I/O task.
//!
//! The protocol logic ([`AdsState`]) is sans-io: it takes responses and events and returns the
//! requests to send and the configuration to publish, so every rule of the protocol (versions,
//! nonces, ACK/NACK, SotW deletion, delta removals, does-not-exist timers, resubscription on
//! reconnect) is unit-tested without sockets. [`XdsClient`] owns one task that does the I/O
//! over a tonic channel and publishes into a [`crate::ConfigStore`].

pub mod bootstrap;
mod cache;
mod client;
mod connect;
pub mod file;
mod state;
mod thread;
pub mod translate;

pub use bootstrap::{Bootstrap, ProtocolMode};
pub use cache::CacheFile;
pub use client::{Target, XdsClient, XdsClientBuilder};
pub use state::{AdsState, Outbound, Step, Verdict, DOES_NOT_EXIST_TIMEOUT, ROUTE_HOLD};

pub use crate::resource::ResourceType;
