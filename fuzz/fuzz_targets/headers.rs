//! Arbitrary header values where the mesh parses them itself: W3C traceparent, B3 (single
//! and multi), grpc-timeout.
#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use mesh_tower::trace::{extract, parse_b3_single, parse_traceparent, Formats};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_traceparent(text);
        let _ = parse_b3_single(text);
        let _ = mesh_tower::timeout::parse_grpc_timeout(text);
    }
    // The same bytes in every header extraction reads, split at the first newline so that
    // trace and span ids can differ.
    let (a, b) = match data.iter().position(|&c| c == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, data),
    };
    if let (Ok(a), Ok(b)) = (HeaderValue::from_bytes(a), HeaderValue::from_bytes(b)) {
        let mut h = HeaderMap::new();
        h.insert("traceparent", a.clone());
        h.insert("tracestate", b.clone());
        h.insert("b3", a.clone());
        h.insert("x-b3-traceid", a.clone());
        h.insert("x-b3-spanid", b.clone());
        h.insert("x-b3-sampled", b.clone());
        h.insert("x-b3-flags", b);
        let _ = extract(&h, Formats::ALL);
        let _ = extract(&h, Formats::W3C);
    }
});
