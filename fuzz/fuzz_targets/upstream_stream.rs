//! The upstream stream decoder never panics and never holds more than its
//! bounds allow, on any bytes in any split: every chunk it yields has a
//! choice index below `n`, and no choice says more than `max_tokens`. The
//! first bytes pick `n`, the token cap and the read size.
#![no_main]

use backstop_adapter::Wire;
use backstop_upstream::decode::{ChunkDecoder, StreamBounds};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [n, cap, step, dialect, rest @ ..] = data else {
        return;
    };
    let bounds = StreamBounds {
        choices: u32::from(n % 4) + 1,
        max_tokens: (*cap > 0).then_some(u64::from(*cap)),
        model: "gpt-4o-mini".into(),
        max_event_bytes: 512,
    };
    let choices = bounds.choices;
    let wire = [Wire::Chat, Wire::Legacy, Wire::Responses][usize::from(dialect % 3)];
    let mut decoder = ChunkDecoder::new(wire, bounds);
    let mut said = vec![0usize; choices as usize];
    for piece in rest.chunks(usize::from(*step).max(1)) {
        if decoder.feed(piece).is_err() {
            break;
        }
        while let Some(item) = decoder.next_chunk() {
            let Ok(chunk) = item else { break };
            for choice in &chunk.choices {
                assert!(choice.index < choices);
                let text = choice.delta.content.as_deref().unwrap_or("");
                said[choice.index as usize] += text.len();
            }
        }
    }
    if *cap > 0 {
        // A token is at most a few dozen bytes of text.
        for bytes in said {
            assert!(bytes <= usize::from(*cap) * 64, "{bytes} bytes under a cap of {cap}");
        }
    }
});
