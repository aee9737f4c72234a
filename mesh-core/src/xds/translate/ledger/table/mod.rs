//! The ledger's table. Each entry lists every field of its message the
//! tests fail when a field is missing or named wrongly. Fields marked `R` are refused.

use super::Entry;
use super::Treatment;

const H: Treatment = Treatment::Honoured;
const R: Treatment = Treatment::Refused;

const STATS: &str = "names or selects statistics; changes no request";
const META: &str =
    "metadata for other filters and matchers; the mesh refuses every matcher that reads it";
const HINT: &str = "a hint for statistics and tracing";
const LOGS: &str =
    "access logging; the mesh writes its own access log (tracing target mesh::access)";
const BUFFER: &str =
    "buffer sizing; hyper's flow control bounds memory and no byte of a body is dropped";
const DRAIN: &str =
    "connection draining on shutdown; the mesh's server drains gracefully on its own";
const INSPECT: &str =
    "listener-filter timing; the mesh reads the first bytes itself, under its handshake timeout";
const SOCKET: &str = "tuning of the listening socket";
const THREADS: &str = "how Envoy spreads connections over its worker threads";
const OVERLOAD: &str = "Envoy's overload manager; the mesh server's own Limits apply";
const TYPED: &str = "a label; the type of typed_config decides what runs";
const HANDSHAKE: &str = "TLS handshake timeout; the mesh's acceptor applies its own";
const TRACING: &str =
    "tracing is configured in the mesh's trace layer (W3C/B3, OTLP), not per listener or route";
const REQUEST_ID: &str =
    "request ids for logs and tracing; the mesh propagates W3C/B3 trace context";
const CONN: &str = "connection lifetime; requests are not handled differently";
const H2: &str =
    "HTTP/2 flow-control and concurrency tuning of the server; the mesh server's Limits apply";
const CASE: &str = "header-name case on HTTP/1.1 (header names are case-insensitive)";
const API_V3: &str = "the only API version there is";
const WARMING: &str =
    "how long to wait for a first response; the mesh's does-not-exist timer applies";
const RUNTIME: &str =
    "the mesh has no runtime layer; the default value applies, as in proxyless gRPC";
const VALIDATE: &str =
    "checks cluster names when loading; a request for an unknown cluster fails either way";
const JITTER: &str = "spreads re-resolutions in time; which addresses are used does not change";
const NO_ACTIVE_HC: &str =
    "only meaningful with active health checking, which the mesh refuses (health_checks)";
const CLEANUP: &str = "cleanup of ORIGINAL_DST hosts, a cluster type the mesh refuses";
const HOSTNAME: &str = "a label for auto host rewrite and auto SNI, which the mesh refuses";
const RESUMPTION: &str =
    "TLS session resumption; a resumed session carries the identity verified in its full handshake";

const fn entry(
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

mod cluster;
mod listener;
mod route;
mod tls;

/// Every entry, in the order of the parts above.
pub(super) fn entries() -> &'static [Entry] {
    static ALL: std::sync::OnceLock<Vec<Entry>> = std::sync::OnceLock::new();
    ALL.get_or_init(|| {
        [
            listener::ENTRIES,
            route::ENTRIES,
            cluster::ENTRIES,
            tls::ENTRIES,
        ]
        .concat()
    })
}
