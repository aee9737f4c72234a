//! Arbitrary text as a gRFC A27 bootstrap file: a typed error naming the key, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = mesh_core::xds::Bootstrap::from_json(text, "fuzz.json");
    }
});
