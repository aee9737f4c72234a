//! Credentials kept out of logs and HPACK tables: the headers both stacks mark sensitive.

/// The headers the mesh marks sensitive on both sides, requests and responses:
/// `Authorization`, `Proxy-Authorization`, `Cookie` and `Set-Cookie`. A sensitive header is
/// shown as `Sensitive` by a header map's `Debug` and is never entered in HTTP/2's HPACK
/// table; the mesh's access logs and spans never record any header value.
pub const SENSITIVE_HEADERS: [http::HeaderName; 4] = [
    http::header::AUTHORIZATION,
    http::header::PROXY_AUTHORIZATION,
    http::header::COOKIE,
    http::header::SET_COOKIE,
];

/// Marks [`SENSITIVE_HEADERS`] sensitive in `headers`. By hand rather than with tower-http's
/// `SetSensitiveHeadersLayer`, which both stacks would otherwise run: that layer calls
/// `HeaderMap::entry` for each name, which reserves room in the map, and costs ~285 ns per
/// request and response against ~20 ns for a lookup first (`cargo bench -p mesh-benches
/// --bench outbound -- sensitive`); the two compose, and tests/tower_http.rs runs tower-http's
/// over the mesh.
pub(crate) fn mark_sensitive(headers: &mut http::HeaderMap) {
    for name in &SENSITIVE_HEADERS {
        if headers.contains_key(name) {
            if let http::header::Entry::Occupied(mut e) = headers.entry(name) {
                for v in e.iter_mut() {
                    v.set_sensitive(true);
                }
            }
        }
    }
}
