//! The ledger table's shorthand: `H` and `R`, the reasons fields are ignored, and the
//! entry builder.

use super::super::entry::{Entry, Treatment};

pub(super) const H: Treatment = Treatment::Honoured;
pub(super) const R: Treatment = Treatment::Refused;

pub(super) const STATS: &str = "names or selects statistics; changes no request";
pub(super) const META: &str =
    "metadata for other filters and matchers; the mesh refuses every matcher that reads it";
pub(super) const HINT: &str = "a hint for statistics and tracing";
pub(super) const LOGS: &str =
    "access logging; the mesh writes its own access log (tracing target mesh::access)";
pub(super) const BUFFER: &str =
    "buffer sizing; hyper's flow control bounds memory and no byte of a body is dropped";
pub(super) const DRAIN: &str =
    "connection draining on shutdown; the mesh's server drains gracefully on its own";
pub(super) const INSPECT: &str =
    "listener-filter timing; the mesh reads the first bytes itself, under its handshake timeout";
pub(super) const SOCKET: &str = "tuning of the listening socket";
pub(super) const THREADS: &str = "how Envoy spreads connections over its worker threads";
pub(super) const OVERLOAD: &str = "Envoy's overload manager; the mesh server's own Limits apply";
pub(super) const TYPED: &str = "a label; the type of typed_config decides what runs";
pub(super) const HANDSHAKE: &str = "TLS handshake timeout; the mesh's acceptor applies its own";
pub(super) const TRACING: &str =
    "tracing is configured in the mesh's trace layer (W3C/B3, OTLP), not per listener or route";
pub(super) const REQUEST_ID: &str =
    "request ids for logs and tracing; the mesh propagates W3C/B3 trace context";
pub(super) const CONN: &str = "connection lifetime; requests are not handled differently";
pub(super) const H2: &str =
    "HTTP/2 flow-control and concurrency tuning of the server; the mesh server's Limits apply";
pub(super) const CASE: &str = "header-name case on HTTP/1.1 (header names are case-insensitive)";
pub(super) const API_V3: &str = "the only API version there is";
pub(super) const WARMING: &str =
    "how long to wait for a first response; the mesh's does-not-exist timer applies";
pub(super) const RUNTIME: &str =
    "the mesh has no runtime layer; the default value applies, as in proxyless gRPC";
pub(super) const VALIDATE: &str =
    "checks cluster names when loading; a request for an unknown cluster fails either way";
pub(super) const JITTER: &str =
    "spreads re-resolutions in time; which addresses are used does not change";
pub(super) const NO_ACTIVE_HC: &str =
    "only meaningful with active health checking, which the mesh refuses (health_checks)";
pub(super) const CLEANUP: &str = "cleanup of ORIGINAL_DST hosts, a cluster type the mesh refuses";
pub(super) const HOSTNAME: &str =
    "a label for auto host rewrite and auto SNI, which the mesh refuses";
pub(super) const RESUMPTION: &str =
    "TLS session resumption; a resumed session carries the identity verified in its full handshake";

pub(super) const fn entry(
    key: &'static str,
    message: &'static str,
    fields: &'static [(&'static str, Treatment)],
) -> Entry {
    Entry {
        key,
        message,
        fields,
    }
}
