//! The request and response extensions the layers leave for each other: a leaf every layer
//! may read and none owns (the server puts the peer's identity and addresses on a request,
//! the route layer its hash, the retry layer the attempt; the cluster layer puts the
//! endpoint that answered on the response, the retry layer the retries).

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;

use mesh_core::identity::SpiffeId;

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

/// The hash of a request under its route's hash policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHash(pub u64);

/// A stable 64-bit hash (SipHash with fixed keys: the same in every process).
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(0x6d65_7368, 0x7269_6e67);
    bytes.hash(&mut h);
    h.finish()
}

/// The peer's identity, put in each request's extensions (`None`: plaintext or anonymous).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity(pub Option<SpiffeId>);

/// The client's address, put in each request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteAddr(pub SocketAddr);

/// The local address the connection came in on, put in each request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalAddr(pub SocketAddr);
