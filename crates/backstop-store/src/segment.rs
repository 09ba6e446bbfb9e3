//! How every store keeps an event log: the events a batch appends to one
//! generation go in one row (a segment), not a row each, compressed with
//! LZ4 — a stream's events repeat their field names and response objects,
//! and fewer bytes written is less for the database to copy beside the
//! streams. A segment's row holds its first sequence number, its events'
//! lengths (decimal, space-separated), its codec and its bytes.

use std::collections::HashMap;
use std::fmt::Write as _;

use bytes::Bytes;

/// A segment's `codec`: its events as they are.
pub(crate) const PLAIN: i16 = 0;
/// A segment's `codec`: an LZ4 block of its events.
pub(crate) const LZ4: i16 = 1;
/// A segment shorter than this is kept as it is: too little to gain.
const COMPRESS_FROM: usize = 256;
/// The most event bytes one segment may say it holds; past it, it is
/// treated as damaged rather than decompressed.
const MAX_SEGMENT: usize = 256 << 20;

/// A segment as a row holds it.
pub(crate) struct Row {
    /// The generation.
    pub(crate) id: String,
    /// Its first event's sequence number.
    pub(crate) first: u64,
    /// Its events' lengths, decimal, space-separated.
    pub(crate) lens: String,
    /// [`PLAIN`] or [`LZ4`].
    pub(crate) codec: i16,
    /// Its events, as the codec keeps them.
    pub(crate) data: Vec<u8>,
}

/// Events appended to one generation in order, not yet written.
struct Segment {
    first: u64,
    count: u64,
    lens: String,
    data: Vec<u8>,
}

impl Segment {
    fn new(first: u64) -> Self {
        Segment {
            first,
            count: 0,
            lens: String::new(),
            data: Vec::new(),
        }
    }

    fn extend(&mut self, events: &[Bytes]) {
        self.data.reserve(events.iter().map(Bytes::len).sum());
        for event in events {
            if self.count > 0 {
                self.lens.push(' ');
            }
            self.count += 1;
            let _ = write!(self.lens, "{}", event.len());
            self.data.extend_from_slice(event);
        }
    }

    /// The row to write: compressed when that is worth it.
    fn row(self, id: String) -> Row {
        let compressed = (self.data.len() >= COMPRESS_FROM)
            .then(|| lz4_flex::block::compress(&self.data))
            .filter(|c| c.len() < self.data.len());
        let (codec, data) = match compressed {
            Some(c) => (LZ4, c),
            None => (PLAIN, self.data),
        };
        Row {
            id,
            first: self.first,
            lens: self.lens,
            codec,
            data,
        }
    }
}

/// A batch's segments not yet written.
#[derive(Default)]
pub(crate) struct Segments(HashMap<String, Segment>);

impl Segments {
    /// Adds `events` of generation `id`, numbered from `first`; a row to
    /// write first when they do not follow that generation's segment (what
    /// came before goes as it is).
    pub(crate) fn append(&mut self, id: &str, first: u64, events: &[Bytes]) -> Option<Row> {
        if events.is_empty() {
            return None;
        }
        let fresh = || {
            let mut segment = Segment::new(first);
            segment.extend(events);
            segment
        };
        match self.0.get_mut(id) {
            Some(segment) if segment.first + segment.count == first => {
                segment.extend(events);
                None
            }
            Some(segment) => Some(std::mem::replace(segment, fresh()).row(id.to_string())),
            None => {
                self.0.insert(id.to_string(), fresh());
                None
            }
        }
    }

    /// Every segment gathered, as rows to write.
    pub(crate) fn drain(&mut self) -> Vec<Row> {
        self.0.drain().map(|(id, s)| s.row(id)).collect()
    }
}

/// The events after `after` (all for `None`) of a generation's segments,
/// read in the order of their first sequence numbers, from the last one
/// that starts at or before the first event wanted: each event once (a
/// retried append may make segments overlap), in order.
pub(crate) fn events(
    segments: impl IntoIterator<Item = (u64, String, Vec<u8>, i16)>,
    after: Option<u64>,
) -> Vec<(u64, Bytes)> {
    let from = first_wanted(after);
    let mut events: Vec<(u64, Bytes)> = Vec::new();
    for (first, lens, data, codec) in segments {
        let data = decode(&lens, data, codec);
        for (seq, event) in (first..).zip(split(&lens, &data)) {
            let next = events.last().map_or(from, |(s, _)| s + 1);
            if seq >= next {
                events.push((seq, event));
            }
        }
    }
    events
}

/// The first event's sequence number that a read after `after` wants.
pub(crate) fn first_wanted(after: Option<u64>) -> u64 {
    after.map_or(0, |a| a.saturating_add(1))
}

/// A segment's event bytes, decompressed as its codec says; nothing for a
/// segment that cannot be read (logged, and [`split`] then reads none of
/// its events).
fn decode(lens: &str, data: Vec<u8>, codec: i16) -> Bytes {
    if codec == PLAIN {
        return Bytes::from(data);
    }
    let total = lens
        .split(' ')
        .map(str::parse::<usize>)
        .try_fold(0usize, |sum, len| {
            len.ok().and_then(|len| sum.checked_add(len))
        })
        .filter(|&total| total <= MAX_SEGMENT);
    let plain = match (codec, total) {
        (LZ4, Some(total)) => lz4_flex::block::decompress(&data, total).ok(),
        _ => None,
    };
    plain.map(Bytes::from).unwrap_or_else(|| {
        tracing::error!("the store holds a segment it cannot decompress (codec {codec})");
        Bytes::new()
    })
}

/// A segment's events, by their lengths.
fn split(lens: &str, data: &Bytes) -> Vec<Bytes> {
    let mut events = Vec::new();
    let mut at = 0;
    for len in lens.split(' ').map(str::parse::<usize>) {
        let Some(end) = len
            .ok()
            .map(|len| at + len)
            .filter(|&end| end <= data.len())
        else {
            tracing::error!("the store holds a damaged segment: its events are not all read");
            break;
        };
        events.push(data.slice(at..end));
        at = end;
    }
    events
}
