//! The Responses dialect never panics on any bytes: a request body parses
//! or is refused, and what parses is written back for a native target and
//! as a chat; a stream's events (whatever they hold) read into chunks and
//! are written out again as one numbered Responses stream with one end.
#![no_main]

use backstop_adapter::{Outgoing, Request, ResponseWriter, Wire};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(request) = Request::parse_responses(rest) {
            for wire in [Wire::Responses, Wire::Chat] {
                let changes = Outgoing {
                    wire: Some(wire),
                    ..Outgoing::AS_SENT
                };
                let _ = request.upstream_body(&changes);
            }
            let _ = request.api.untranslatable(1);
        }
        return;
    }
    let Ok(request) = Request::parse_responses(br#"{"model": "m", "input": "x"}"#) else {
        return;
    };
    let mut writer = ResponseWriter::new(&request, "resp_fuzz".into(), 0);
    let mut out = Vec::new();
    for line in rest.split(|b| *b == b'\n') {
        let Ok(data) = std::str::from_utf8(line) else {
            continue;
        };
        if let Ok(chunk) = Wire::Responses.decode_chunk(data) {
            let _ = writer.chunk(chunk, &mut out);
        }
        if let Ok(value) = serde_json::from_str(data) {
            let _ = Wire::Responses.decode_completion(value);
        }
    }
    let _ = writer.end(&mut out);
    // One stream: numbered from 0 without a gap, one final event.
    let text = String::from_utf8(out).expect("events are UTF-8");
    let mut ends = 0;
    for (i, event) in text.split("\n\n").filter(|e| !e.is_empty()).enumerate() {
        let data = event.lines().find_map(|l| l.strip_prefix("data: ")).expect("data");
        let v: serde_json::Value = serde_json::from_str(data).expect("JSON");
        assert_eq!(v["sequence_number"], i);
        ends += usize::from(v["type"] == "response.completed" || v["type"] == "response.incomplete");
    }
    assert_eq!(ends, 1);
});
