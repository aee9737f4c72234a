//! Arbitrary bytes as an xDS `RouteConfiguration`: decoding may fail; translation must return a
//! typed error or a value, never panic.
#![no_main]

use envoy_types::pb::envoy::config::route::v3::RouteConfiguration as Pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Pb::decode(data) {
        let _ = mesh_core::config::RouteConfig::try_from(&p);
    }
});
