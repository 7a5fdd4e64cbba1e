//! A deploy's config (`FunctionConfig::from_json`): any bytes. An accepted config passes its own
//! checks, and its stored form (serialised, every default filled in) parses back to it.
#![no_main]

use kiln_core::function::FunctionConfig;
use kiln_core::tier::wasm::egress::Rule;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(config) = FunctionConfig::from_json(data) else {
        return;
    };
    config.check().expect("an accepted config passes its checks");
    assert_eq!(config.memory_bytes() as u64, config.memory_mb << 20);
    assert!(config.timeout().as_millis() >= 1);
    for entry in &config.allowed_hosts {
        Rule::parse(entry).expect("every allowed_hosts entry of an accepted config parses");
    }
    let stored = serde_json::to_vec(&config).expect("a config serialises");
    let back = FunctionConfig::from_json(&stored).expect("the stored form of a config parses");
    assert_eq!(back, config);
});
