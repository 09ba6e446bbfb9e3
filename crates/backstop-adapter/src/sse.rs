//! Server-sent events: an incremental decoder and an encoder.
//!
//! The decoder follows the WHATWG event-stream rules: a leading BOM is skipped;
//! lines end in LF, CR or CRLF (a CR at the end of one read and an LF at the start
//! of the next are one line end); `data:` lines accumulate; lines starting with
//! `:` are comments; `id:` persists across events and is ignored when it holds
//! NUL; `retry:` takes ASCII digits only; a blank line dispatches; an event still
//! unterminated when the stream ends is dropped. Bytes are buffered up to a line
//! end before decoding, so a multibyte character split across reads is whole.
//! What is buffered is bounded: a line, or an event's data, longer than the
//! decoder's limit is an error ([`TooLarge`]), never an unbounded buffer.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The event type; `message` when none was given.
    pub event: String,
    /// The data lines, joined with `\n`.
    pub data: String,
    /// The last event id seen so far on the stream, if any.
    pub id: Option<String>,
    /// A `retry:` value given within this event, in milliseconds.
    pub retry: Option<u64>,
}

impl SseEvent {
    /// A `message` event with this data and no id.
    pub fn message(data: impl Into<String>) -> Self {
        SseEvent {
            event: DEFAULT_EVENT.into(),
            data: data.into(),
            id: None,
            retry: None,
        }
    }
}

const DEFAULT_EVENT: &str = "message";
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The default bound on one line or one event's data: 1 MiB, far above any
/// chunk an upstream sends.
pub const DEFAULT_MAX_EVENT: usize = 1 << 20;

/// A line or an event's data grew past the decoder's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an event-stream line or event is larger than {0} bytes")]
pub struct TooLarge(pub usize);

/// Incremental decoder: feed it bytes as they arrive, collect events.
#[derive(Debug)]
pub struct SseDecoder {
    /// Largest line, and largest event data, accepted.
    max: usize,
    /// Bytes of the current, unfinished line.
    line: Vec<u8>,
    /// Whether the start of the stream has been checked for a BOM.
    bom_checked: bool,
    /// The previous read ended in CR: an LF opening the next read is its pair.
    after_cr: bool,
    data: String,
    has_data: bool,
    event: String,
    retry: Option<u64>,
    last_id: String,
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::with_limit(DEFAULT_MAX_EVENT)
    }
}

impl SseDecoder {
    /// A decoder at the start of a stream, bounded by [`DEFAULT_MAX_EVENT`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder whose lines and event data may hold at most `max` bytes.
    pub fn with_limit(max: usize) -> Self {
        SseDecoder {
            max,
            line: Vec::new(),
            bom_checked: false,
            after_cr: false,
            data: String::new(),
            has_data: false,
            event: String::new(),
            retry: None,
            last_id: String::new(),
        }
    }

    /// Feeds the next bytes of the stream, appending the events they
    /// complete. Past the limit the stream cannot be decoded further.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), TooLarge> {
        if !self.bom_checked {
            // Hold back up to three bytes until they prove to be, or not be, a BOM.
            let wanted = BOM.len().saturating_sub(self.line.len()).min(bytes.len());
            self.line.extend_from_slice(&bytes[..wanted]);
            bytes = &bytes[wanted..];
            if self.line.len() < BOM.len() && BOM.starts_with(&self.line) {
                return Ok(());
            }
            self.bom_checked = true;
            let held = std::mem::take(&mut self.line);
            let held = held.strip_prefix(BOM).unwrap_or(&held);
            self.scan(held, out)?;
        }
        self.scan(bytes, out)
    }

    fn scan(&mut self, mut bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), TooLarge> {
        if self.after_cr && !bytes.is_empty() {
            self.after_cr = false;
            if bytes[0] == b'\n' {
                bytes = &bytes[1..];
            }
        }
        while let Some(end) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            if self.line.len() + end > self.max {
                return Err(TooLarge(self.max));
            }
            self.line.extend_from_slice(&bytes[..end]);
            let line = std::mem::take(&mut self.line);
            self.process_line(&line, out)?;
            self.line = line;
            self.line.clear();
            let mut next = end + 1;
            if bytes[end] == b'\r' {
                match bytes.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            bytes = &bytes[next..];
        }
        if self.line.len() + bytes.len() > self.max {
            return Err(TooLarge(self.max));
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn process_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), TooLarge> {
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" if self.data.len() + value.len() + 1 > self.max => {
                return Err(TooLarge(self.max))
            }
            b"data" => {
                self.data.push_str(&String::from_utf8_lossy(value));
                self.data.push('\n');
                self.has_data = true;
            }
            b"event" => self.event = String::from_utf8_lossy(value).into_owned(),
            b"id" if !value.contains(&0) => {
                self.last_id = String::from_utf8_lossy(value).into_owned();
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                self.retry = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok());
            }
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = std::mem::take(&mut self.event);
        let retry = self.retry.take();
        if !self.has_data {
            self.data.clear();
            return;
        }
        self.has_data = false;
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // the newline after the last data line
        out.push(SseEvent {
            event: if event.is_empty() {
                DEFAULT_EVENT.into()
            } else {
                event
            },
            data,
            id: (!self.last_id.is_empty()).then(|| self.last_id.clone()),
            retry,
        });
    }
}

/// Appends one event in wire form. Data lines split at CR, LF and CRLF; an
/// `event:` line is written only for a type other than `message`.
pub fn encode(event: &SseEvent, out: &mut Vec<u8>) {
    if event.event != DEFAULT_EVENT {
        push_field(out, "event", &event.event);
    }
    if let Some(id) = &event.id {
        push_field(out, "id", id);
    }
    if let Some(retry) = event.retry {
        push_field(out, "retry", &retry.to_string());
    }
    encode_data(&event.data, out);
}

/// Appends a `message` event carrying `data` (e.g. one JSON chunk, or `[DONE]`).
pub fn encode_data(data: &str, out: &mut Vec<u8>) {
    let mut rest = data;
    loop {
        match rest.find(['\r', '\n']) {
            Some(end) => {
                push_field(out, "data", &rest[..end]);
                let skip = if rest[end..].starts_with("\r\n") {
                    2
                } else {
                    1
                };
                rest = &rest[end + skip..];
            }
            None => {
                push_field(out, "data", rest);
                break;
            }
        }
    }
    out.push(b'\n');
}

/// Appends a `message` event carrying `value` as JSON. serde_json escapes
/// every line break, so the JSON is always a single `data:` line.
pub fn encode_json<T: serde::Serialize>(value: &T, out: &mut Vec<u8>) -> serde_json::Result<()> {
    out.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut *out, value)?;
    out.extend_from_slice(b"\n\n");
    Ok(())
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.push(b'\n');
}

#[cfg(test)]
mod tests;
