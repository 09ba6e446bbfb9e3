//! Config parsing and validation never panic on any text: a bad file is a
//! `ConfigError` naming the field, whatever it holds (huge or negative
//! durations, NaN rates, odd addresses and URLs).
#![no_main]

use backstop_config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let keys = |_: &str| Some("sk-fuzz-0123456789abcdef".to_string());
    let _ = Config::parse(text, keys);
    let _ = Config::parse(text, |_| None);
    let _ = Config::parse_offline(text, keys);
});
