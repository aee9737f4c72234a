//! Arbitrary bytes as an xDS `Listener`: decoding may fail; translation must return a
//! typed error or a value, never panic.
#![no_main]

use envoy_types::pb::envoy::config::listener::v3::Listener as Pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Pb::decode(data) {
        let _ = mesh_core::config::Listener::try_from(&p);
    }
});
