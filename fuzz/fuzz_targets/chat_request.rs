//! Request parsing never panics on any body, and what parses re-encodes.
#![no_main]

use backstop_adapter::{Outgoing, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for parsed in [Request::parse_chat(data), Request::parse_legacy(data)] {
        if let Ok(request) = parsed {
            let _ = request.upstream_body(&Outgoing::AS_SENT);
        }
    }
});
