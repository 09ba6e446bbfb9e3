//! The SSE decoder never panics, and how the bytes are split into reads never
//! changes the events, nor whether the limit on a line or an event is hit:
//! the first byte of the input picks the split points.
#![no_main]

use backstop_adapter::sse::{SseDecoder, SseEvent};
use libfuzzer_sys::fuzz_target;

/// A small limit, so that inputs reach it.
const LIMIT: usize = 256;

fn decode(pieces: &[&[u8]]) -> (Vec<SseEvent>, bool) {
    let mut decoder = SseDecoder::with_limit(LIMIT);
    let mut out = Vec::new();
    for piece in pieces {
        if decoder.feed(piece, &mut out).is_err() {
            return (out, true);
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, bytes)) = data.split_first() else {
        return;
    };
    let step = usize::from(step.max(1));
    let whole = decode(&[bytes]);
    let pieces: Vec<&[u8]> = bytes.chunks(step).collect();
    assert_eq!(decode(&pieces), whole);
});
