//! Workload identity: SPIFFE IDs, certificates and trust bundles, their providers, and the
//! rustls configurations that verify SPIFFE identities during the handshake.
//!
//! An [`IdentityStore`] holds the current [`Identity`] (certificate chain, key, trust bundle)
//! behind an `ArcSwap`; providers ([`FileWatcher`]) replace it when certificates rotate. The
//! rustls configs built by [`client_config`] and [`server_config`] read the store at each
//! handshake (certificate resolvers and verifiers over the same `ArcSwap`), so rotation never
//! rebuilds a connection, pool or channel: existing connections go on, new handshakes use the
//! new certificate.
//!
//! The crypto provider is chosen once, here: ring.

mod external;
mod provider;
mod sds;
mod spiffe;
mod store;
mod verify;

pub use external::{external_client_config, is_external};
pub use provider::{from_bootstrap, FileWatcher, FileWatcherConfig};
pub use sds::SdsProvider;
pub use spiffe::{peer_spiffe_id, SpiffeId};
pub use store::*;
pub use verify::{client_config, server_config, SpiffeClientVerifier, SpiffeServerVerifier};

#[cfg(test)]
mod tests;
