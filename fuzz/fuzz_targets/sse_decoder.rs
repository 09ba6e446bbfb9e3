//! The SSE decoder never panics, and how the bytes are split into reads never
//! changes the events: the first byte of the input picks the split points.
#![no_main]

use backstop_adapter::sse::{SseDecoder, SseEvent};
use libfuzzer_sys::fuzz_target;

fn decode(pieces: &[&[u8]]) -> Vec<SseEvent> {
    let mut decoder = SseDecoder::new();
    let mut out = Vec::new();
    for piece in pieces {
        decoder.feed(piece, &mut out);
    }
    out
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
