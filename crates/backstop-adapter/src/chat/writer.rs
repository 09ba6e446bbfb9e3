//! A chat stream's writer state: nothing for a stream that starts here;
//! for one that goes on from chunks another run already sent (after a
//! restart, or on the replica that took it over), the completion those
//! chunks began, so the rest of the stream is the same completion.

use serde_json::Value;

use super::ChatChunk;

/// Writes a chat stream's chunks; see the module's docs.
#[derive(Debug, Default)]
pub struct ChatWriter {
    /// The completion id and creation time the stream began with.
    began: Option<(String, u64)>,
    /// The chunks so far gave a finish reason: the answer is whole.
    finished: bool,
}

impl ChatWriter {
    /// A writer that goes on from `chunks`, the JSON of the stream's
    /// chunks already sent: later chunks keep their completion id and
    /// creation time. The answer's text so far, for the target that
    /// continues it; `None` when a tool call or a second choice was under
    /// way, which no target can continue.
    pub fn resume(&mut self, chunks: &[Value]) -> Option<String> {
        let mut text = String::new();
        let mut continuable = true;
        for chunk in chunks {
            if self.began.is_none() {
                let id = chunk.get("id").and_then(Value::as_str);
                let created = chunk.get("created").and_then(Value::as_u64);
                if let (Some(id), Some(created)) = (id, created) {
                    self.began = Some((id.to_string(), created));
                }
            }
            for choice in chunk
                .get("choices")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let delta = choice.get("delta");
                if choice.get("index").and_then(Value::as_u64) != Some(0)
                    || delta.and_then(|d| d.get("tool_calls")).is_some()
                {
                    continuable = false;
                }
                if let Some(content) = delta.and_then(|d| d.get("content")).and_then(Value::as_str)
                {
                    text.push_str(content);
                }
                if choice
                    .get("finish_reason")
                    .is_some_and(|reason| !reason.is_null())
                {
                    self.finished = true;
                }
            }
        }
        continuable.then_some(text)
    }

    /// Whether the chunks it went on from had already finished the answer
    /// (only its end was not sent).
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Gives `chunk` the stream's completion, if it began elsewhere.
    pub(crate) fn stamp(&self, chunk: &mut ChatChunk) {
        if let Some((id, created)) = &self.began {
            chunk.id.clone_from(id);
            chunk.created = *created;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn chunk(id: &str, delta: Value, finish: Option<&str>) -> Value {
        json!({"id": id, "object": "chat.completion.chunk", "created": 7, "model": "m",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    }

    #[test]
    fn goes_on_under_the_completion_it_began() {
        let mut writer = ChatWriter::default();
        let said = [
            chunk(
                "chatcmpl-a",
                json!({"role": "assistant", "content": ""}),
                None,
            ),
            chunk("chatcmpl-a", json!({"content": "Once upon"}), None),
            chunk("chatcmpl-a", json!({"content": " a time"}), None),
        ];
        assert_eq!(writer.resume(&said).as_deref(), Some("Once upon a time"));
        assert!(!writer.finished());
        let mut next: ChatChunk =
            serde_json::from_value(chunk("chatcmpl-b", json!({"content": ","}), None)).unwrap();
        next.created = 99;
        writer.stamp(&mut next);
        assert_eq!((next.id.as_str(), next.created), ("chatcmpl-a", 7));
    }

    #[test]
    fn a_tool_call_or_a_second_choice_cannot_be_continued() {
        let call = chunk(
            "c",
            json!({"tool_calls": [{"index": 0, "function": {"name": "f"}}]}),
            None,
        );
        assert_eq!(ChatWriter::default().resume(&[call]), None);
        let mut second = chunk("c", json!({"content": "x"}), None);
        second["choices"][0]["index"] = json!(1);
        assert_eq!(ChatWriter::default().resume(&[second]), None);
    }

    #[test]
    fn a_finish_reason_says_the_answer_is_whole() {
        let mut writer = ChatWriter::default();
        let said = [
            chunk("c", json!({"content": "Done."}), None),
            chunk("c", json!({}), Some("stop")),
        ];
        assert_eq!(writer.resume(&said).as_deref(), Some("Done."));
        assert!(writer.finished());
    }

    #[test]
    fn a_fresh_writer_leaves_chunks_as_they_are() {
        let mut next: ChatChunk =
            serde_json::from_value(chunk("chatcmpl-b", json!({"content": ","}), None)).unwrap();
        ChatWriter::default().stamp(&mut next);
        assert_eq!((next.id.as_str(), next.created), ("chatcmpl-b", 7));
    }
}
