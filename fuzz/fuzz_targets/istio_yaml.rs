//! Arbitrary text as the control plane's Istio YAML: parse, validate and generate must report
//! errors with file and line, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_control::istio::validate::validate;
use mesh_control::istio::{generate, parse, Options};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = parse(text, "fuzz.yaml") {
            let options = Options::default();
            let _ = validate(&config, &options);
            let _ = generate(&config, &options);
        }
    }
});
