use proptest::prelude::*;

use super::*;

fn decode_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
    let mut dec = SseDecoder::new();
    let mut out = Vec::new();
    for c in chunks {
        assert_eq!(dec.feed(c, &mut out), Ok(()));
    }
    out
}

#[test]
fn a_line_or_event_past_the_limit_is_an_error_not_a_buffer() {
    let mut out = Vec::new();
    // A line that never ends, fed in small reads.
    let mut dec = SseDecoder::with_limit(64);
    let long = [b'x'; 16];
    let fed: Vec<_> = (0..5).map(|_| dec.feed(&long, &mut out)).collect();
    assert_eq!(fed[..4], [Ok(()), Ok(()), Ok(()), Ok(())]);
    assert_eq!(fed[4], Err(TooLarge(64)));
    // Short lines that add up to one event too big.
    let mut dec = SseDecoder::with_limit(64);
    let line = b"data: 0123456789012345678901234567890123456789\n";
    assert_eq!(dec.feed(line, &mut out), Ok(()));
    assert_eq!(dec.feed(line, &mut out), Err(TooLarge(64)));
    // At the limit, an event still goes through.
    let mut dec = SseDecoder::with_limit(64);
    assert_eq!(dec.feed(b"data: 0123456789\n\n", &mut out), Ok(()));
    assert_eq!(out, vec![SseEvent::message("0123456789")]);
}

fn ev(event: &str, data: &str, id: Option<&str>, retry: Option<u64>) -> SseEvent {
    SseEvent {
        event: event.into(),
        data: data.into(),
        id: id.map(Into::into),
        retry,
    }
}

/// Feeds `input` split at every byte position (two reads), and byte by byte,
/// and checks each gives the same events as one read.
fn assert_split_invariant(input: &[u8], expected: &[SseEvent]) {
    assert_eq!(decode_all(&[input]), expected, "whole input");
    for i in 0..=input.len() {
        let (a, b) = input.split_at(i);
        assert_eq!(decode_all(&[a, b]), expected, "split at {i}");
    }
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(decode_all(&bytes), expected, "byte by byte");
}

#[test]
fn openai_stream_sample() {
    let input = b"data: {\"id\":\"1\",\"choices\":[]}\n\ndata: {\"id\":\"2\"}\n\ndata: [DONE]\n\n";
    assert_split_invariant(
        input,
        &[
            SseEvent::message("{\"id\":\"1\",\"choices\":[]}"),
            SseEvent::message("{\"id\":\"2\"}"),
            SseEvent::message("[DONE]"),
        ],
    );
}

#[test]
fn every_line_ending_and_a_cr_lf_split_across_reads() {
    let input = b"data: a\r\n\r\ndata: b\r\rdata: c\n\ndata: d\r\n\n";
    let expected = [
        SseEvent::message("a"),
        SseEvent::message("b"),
        SseEvent::message("c"),
        SseEvent::message("d"),
    ];
    assert_split_invariant(input, &expected);
    // A CR ending one read and the LF starting the next are one line end.
    assert_eq!(
        decode_all(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]),
        vec![SseEvent::message("a\nb")]
    );
}

#[test]
fn multiline_data_comments_fields_and_bom() {
    let input = "\u{FEFF}: keep-alive\nevent: update\nid: 7\nretry: 1500\ndata:first\ndata:  second\ndata\n\n\
                 : comment only\n\ndata: after\nid\nretry: 12x\n\n"
        .as_bytes();
    assert_split_invariant(
        input,
        &[
            ev("update", "first\n second\n", Some("7"), Some(1500)),
            ev("message", "after", None, None),
        ],
    );
}

#[test]
fn id_persists_and_nul_ids_are_ignored() {
    let input = b"id: 1\ndata: a\n\ndata: b\n\nid: x\0y\ndata: c\n\n";
    assert_split_invariant(
        input,
        &[
            ev("message", "a", Some("1"), None),
            ev("message", "b", Some("1"), None),
            ev("message", "c", Some("1"), None),
        ],
    );
}

#[test]
fn multibyte_utf8_split_across_reads() {
    let input = "data: héllo 世界 🦀\n\n".as_bytes();
    assert_split_invariant(input, &[SseEvent::message("héllo 世界 🦀")]);
}

#[test]
fn unterminated_last_event_is_dropped_and_empty_events_are_not_dispatched() {
    assert_split_invariant(
        b"data: a\n\nevent: x\n\ndata: partial",
        &[SseEvent::message("a")],
    );
    assert_split_invariant(b"data: partial\n", &[]);
}

#[test]
fn bom_only_at_start_and_only_one() {
    let mut input = b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\n".to_vec();
    // The second BOM is part of the first line's field name: not `data`.
    assert_split_invariant(&input, &[]);
    input.drain(..3);
    assert_split_invariant(&input, &[SseEvent::message("x")]);
    assert_split_invariant(b"da", &[]);
}

#[test]
fn encoder_splits_data_lines_and_writes_fields() {
    let mut out = Vec::new();
    encode(&ev("ping", "a\r\nb\rc\nd", Some("9"), Some(10)), &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "event: ping\nid: 9\nretry: 10\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    );
    let mut out = Vec::new();
    encode_data("[DONE]", &mut out);
    assert_eq!(out, b"data: [DONE]\n\n");
}

fn normalise(data: &str) -> String {
    data.replace("\r\n", "\n").replace('\r', "\n")
}

proptest! {
    #[test]
    fn encode_then_decode_in_any_chunking_gives_the_events_back(
        events in proptest::collection::vec(
            ("[a-z]{1,8}", any::<String>(), proptest::option::of("[a-zA-Z0-9 _-]{0,8}"),
             proptest::option::of(0u64..100_000)),
            0..8),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        let mut last_id: Option<String> = None;
        for (name, data, id, retry) in &events {
            let e = ev(name, data, id.as_deref(), *retry);
            encode(&e, &mut wire);
            if let Some(id) = id {
                last_id = (!id.is_empty()).then(|| id.clone());
            }
            expected.push(ev(name, &normalise(data), last_id.as_deref(), *retry));
        }
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        points.sort_unstable();
        let mut pieces = Vec::new();
        let mut start = 0;
        for p in points {
            pieces.push(&wire[start..p]);
            start = p;
        }
        pieces.push(&wire[start..]);
        prop_assert_eq!(decode_all(&pieces), expected);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_chunking_does_not_matter(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        cut in any::<prop::sample::Index>(),
    ) {
        let at = cut.index(bytes.len() + 1);
        let (a, b) = bytes.split_at(at);
        prop_assert_eq!(decode_all(&[a, b]), decode_all(&[&bytes]));
    }
}

#[test]
fn json_events_are_one_data_line_even_with_line_breaks_inside() {
    let value = serde_json::json!({"content": "line one\nline two\r\n"});
    let mut out = Vec::new();
    encode_json(&value, &mut out).unwrap();
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 2);
    let events = decode_all(&[&out]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&events[0].data).unwrap(),
        value
    );
}
