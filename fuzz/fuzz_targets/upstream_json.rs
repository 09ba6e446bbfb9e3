//! Any upstream JSON body, as a chat or a legacy completion, becomes a
//! completion or a classified failure: never a panic.
#![no_main]

use backstop_adapter::Wire;
use backstop_upstream::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for wire in [Wire::Chat, Wire::Legacy] {
        if let Ok(completion) = decode::completion(data, wire) {
            let _ = serde_json::to_vec(&completion);
        }
    }
});
