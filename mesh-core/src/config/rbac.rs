//! Authorization policy (`envoy.config.rbac.v3.RBAC` as used by the RBAC HTTP filter).

use std::net::IpAddr;

use super::matcher::{HeaderMatcher, StringMatcher};

/// What a matching policy means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RbacAction {
    /// Requests matching any policy are allowed; the rest denied.
    Allow,
    /// Requests matching any policy are denied; the rest allowed.
    Deny,
    /// Matches are only logged.
    Log,
}

/// An address range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrRange {
    /// Network address.
    pub address: IpAddr,
    /// Prefix length.
    pub prefix_len: u8,
}

impl CidrRange {
    /// Whether `ip` is inside the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let bits = u32::from(self.prefix_len.min(32));
                let mask = if bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - bits)
                };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let bits = u32::from(self.prefix_len.min(128));
                let mask = if bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - bits)
                };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// What the request does (`Permission`).
#[derive(Clone, Debug, PartialEq)]
pub enum Permission {
    /// Everything.
    Any,
    /// All of these.
    And(Vec<Permission>),
    /// Any of these.
    Or(Vec<Permission>),
    /// Not this.
    Not(Box<Permission>),
    /// A request header (`:method`, `:path` and `:authority` included).
    Header(HeaderMatcher),
    /// The path without query.
    Path(StringMatcher),
    /// Destination port.
    DestinationPort(u16),
    /// Destination address.
    DestinationIp(CidrRange),
    /// TLS SNI.
    RequestedServerName(StringMatcher),
}

/// Who makes the request (`Principal`).
#[derive(Clone, Debug, PartialEq)]
pub enum Principal {
    /// Anyone.
    Any,
    /// All of these.
    And(Vec<Principal>),
    /// Any of these.
    Or(Vec<Principal>),
    /// Not this.
    Not(Box<Principal>),
    /// An mTLS peer; with a matcher, its URI SAN (else DNS SAN, else subject) must match.
    Authenticated(Option<StringMatcher>),
    /// The connection's source address.
    SourceIp(CidrRange),
    /// The direct peer address.
    DirectRemoteIp(CidrRange),
    /// The client address after proxies (equals the direct address here: no proxy hop).
    RemoteIp(CidrRange),
    /// A request header.
    Header(HeaderMatcher),
    /// The path without query.
    Path(StringMatcher),
}

/// One named policy: matches when any permission and any principal match.
#[derive(Clone, Debug, PartialEq)]
pub struct RbacPolicy {
    /// Name (sorted order is evaluation order, as in Envoy's map).
    pub name: String,
    /// Actions.
    pub permissions: Vec<Permission>,
    /// Identities.
    pub principals: Vec<Principal>,
}

/// A set of policies with one action.
#[derive(Clone, Debug, PartialEq)]
pub struct RbacRules {
    /// The action.
    pub action: RbacAction,
    /// Policies, sorted by name.
    pub policies: Vec<RbacPolicy>,
}

/// The RBAC HTTP filter's config: enforced rules and shadow rules (evaluated, only logged).
#[derive(Clone, Debug, PartialEq)]
pub struct RbacConfig {
    /// Enforced (`None`: everything allowed).
    pub rules: Option<RbacRules>,
    /// Evaluated and reported, never enforced.
    pub shadow_rules: Option<RbacRules>,
}
