//! What holding a stream to the client's `max_tokens` costs per chunk: the
//! upstream stream decoder over the same event stream, without a cap and
//! with one it never reaches (so every chunk's text is counted with
//! tiktoken), in alternating rounds on one thread.
//!
//! Usage: bench-decode [CHUNKS]   (default 2000 chunks of a few words each)

use std::time::Duration;

use backstop_adapter::Wire;
use backstop_upstream::decode::{ChunkDecoder, StreamBounds};
use tokio::time::Instant;

/// One upstream stream of `chunks` chat chunks, each a few words.
fn stream(chunks: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..chunks {
        let chunk = serde_json::json!({"id": "c", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini", "choices": [{"index": 0,
            "delta": {"content": format!(" word{i} and more")}, "finish_reason": null}]});
        out.extend_from_slice(format!("data: {chunk}\n\n").as_bytes());
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    out
}

/// Time to decode `bytes` (fed 4 KiB at a time) into chunks.
fn decode(bytes: &[u8], max_tokens: Option<u64>) -> (Duration, usize) {
    let bounds = StreamBounds {
        choices: 1,
        max_tokens,
        model: "gpt-4o-mini".into(),
        max_event_bytes: 1 << 20,
    };
    let started = Instant::now();
    let mut decoder = ChunkDecoder::new(Wire::Chat, bounds);
    let mut chunks = 0;
    for piece in bytes.chunks(4096) {
        if decoder.feed(piece).is_err() {
            break;
        }
        while let Some(Ok(_)) = decoder.next_chunk() {
            chunks += 1;
        }
    }
    (started.elapsed(), chunks)
}

fn main() {
    let chunks: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    let bytes = stream(chunks);
    let (mut plain, mut capped) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        plain.push(decode(&bytes, None).0);
        capped.push(decode(&bytes, Some(1 << 40)).0);
    }
    plain.sort();
    capped.sort();
    let per_chunk = |d: Duration| d.as_secs_f64() * 1e6 / chunks as f64;
    let (p, c) = (per_chunk(plain[10]), per_chunk(capped[10]));
    println!("{chunks} chunks, median of 20 rounds each:");
    println!("| decoder | µs per chunk |");
    println!("|---|---|");
    println!("| no max_tokens | {p:.2} |");
    println!("| max_tokens set (every chunk counted) | {c:.2} |");
    println!("| added by the count | {:.2} |", c - p);
}
