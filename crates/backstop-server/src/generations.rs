//! Durable generations: streams and background jobs that run apart from
//! the connection that asked for them, each event kept in the store's log
//! as it is made, so a client that drops can come back and go on from the
//! next event, and a restart finishes what was running.
//!
//! A generation running in this process is [`Live`]: its events so far in
//! memory, for the clients that tail it. Once it ends, its log and final
//! object are in the store, where a tail reads them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backstop_config::{Database, StoreConfig};

use crate::auth::Caller;
use backstop_store::{
    BoxFuture, Kind, Postgres, Record, Retention, Sqlite, Status, Store, StoreError,
};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use hyper::body::Frame;
use serde_json::Value;
use tokio::sync::{watch, Semaphore};

/// How often a client following a generation that runs elsewhere looks at
/// the store, whether or not it heard of a change.
const FOLLOW_CHECK: Duration = Duration::from_secs(1);
/// Reads of the store in a row that may fail before a follower gives up
/// (its stream then ends without a final event, as a cut one does).
const FOLLOW_FAILURES: u32 = 30;

/// The store, the generations running now, and the bounds on background jobs.
pub(crate) struct Generations {
    pub(crate) store: Arc<dyn Store>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// Background jobs generating at once.
    pub(crate) runners: Arc<Semaphore>,
    /// Places for background jobs accepted and not finished.
    pub(crate) places: Arc<Semaphore>,
    retention: Retention,
    sweep_every: Duration,
    /// How long this replica's hold on a generation lasts unless renewed.
    pub(crate) lease: Duration,
}

/// A generation running in this process.
pub(crate) struct Live {
    events: Mutex<Vec<Bytes>>,
    /// Events so far, and whether the generation has ended.
    progress: watch::Sender<(usize, bool)>,
    cancel: watch::Sender<bool>,
    /// The end is in the store.
    kept: watch::Sender<bool>,
}

impl Live {
    fn new(events: Vec<Bytes>) -> Self {
        let n = events.len();
        Live {
            events: Mutex::new(events),
            progress: watch::channel((n, false)).0,
            cancel: watch::channel(false).0,
            kept: watch::channel(false).0,
        }
    }

    /// Adds the next events (a frame's); the first one's sequence number.
    /// Its followers are woken once for them all.
    fn extend(&self, new: &[Bytes]) -> u64 {
        let mut events = backstop_router::lock(&self.events);
        let first = events.len();
        events.extend_from_slice(new);
        let n = events.len();
        drop(events);
        self.progress.send_modify(|p| p.0 = n);
        first as u64
    }

    /// Events so far.
    fn len(&self) -> usize {
        backstop_router::lock(&self.events).len()
    }

    fn finish(&self) {
        self.progress.send_modify(|p| p.1 = true);
    }

    /// Events from index `from` on.
    fn since(&self, from: usize) -> Vec<Bytes> {
        let events = backstop_router::lock(&self.events);
        events
            .get(from..)
            .map(<[Bytes]>::to_vec)
            .unwrap_or_default()
    }

    /// How the generation ended, from its events so far (see [`outcome`]),
    /// read under the lock rather than from a copy of the list.
    fn outcome(&self, kind: Kind, cancelled: bool) -> (Status, Option<Bytes>) {
        outcome(kind, &backstop_router::lock(&self.events), cancelled)
    }

    /// Events from index `from` on, as one frame of SSE events with their
    /// `id:` lines, and how many: made under the lock, with no copy of the
    /// list (every kept stream's follower reads each frame here).
    fn frame_since(&self, from: usize) -> (Bytes, usize) {
        let events = backstop_router::lock(&self.events);
        let new = events.get(from..).unwrap_or_default();
        (with_ids(from as u64, new), new.len())
    }

    /// Asks the generation to stop.
    pub(crate) fn cancel(&self) {
        self.cancel.send_replace(true);
    }

    /// Whether the generation has made its last event (its end may not be
    /// in the store yet: see [`Generations::ended`]).
    fn finished(&self) -> bool {
        self.progress.borrow().1
    }

    /// Waits until the generation is asked to stop.
    pub(crate) async fn cancelled(&self) {
        let mut cancel = self.cancel.subscribe();
        let _ = cancel.wait_for(|c| *c).await;
    }
}

/// Now, in Unix seconds.
/// Whether `caller` may see `record`: anyone when clients do not
/// authenticate (no caller), else only the identity that made it.
pub(crate) fn visible(record: &Record, caller: Option<&Caller>) -> bool {
    caller.is_none_or(|c| record.owner.as_deref() == Some(c.name()))
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Generations {
    /// Opens the store a config describes.
    pub(crate) async fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        let retention = Retention {
            stored: config.keep_stored,
            unstored: config.keep_unstored,
            max_bytes: config.max_disk_bytes,
        };
        let store: Arc<dyn Store> = match &config.database {
            Database::Sqlite(path) => Arc::new(
                Sqlite::open(path, retention.clone())?.max_unwritten(config.max_unwritten_bytes),
            ),
            Database::Postgres(url) => Arc::new(
                Postgres::connect(url, retention.clone(), config.lease)
                    .await?
                    .max_unwritten(config.max_unwritten_bytes),
            ),
        };
        Ok(Generations {
            store,
            live: Mutex::new(HashMap::new()),
            runners: Arc::new(Semaphore::new(config.max_running)),
            places: Arc::new(Semaphore::new(config.max_running + config.max_queued)),
            retention,
            sweep_every: config.sweep_every,
            lease: config.lease,
        })
    }

    /// A new record, made now, by `owner` when clients authenticate.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record(
        &self,
        id: &str,
        kind: Kind,
        status: Status,
        background: bool,
        stored: bool,
        key: Option<String>,
        request: Bytes,
        object: Option<Bytes>,
        owner: Option<&Caller>,
    ) -> Record {
        let now = unix_now();
        Record {
            id: id.to_string(),
            kind,
            status,
            background,
            stored,
            key,
            request,
            object,
            created_at: now,
            expires_at: self.retention.expiry(now, stored),
            owner: owner.map(|c| c.name().to_string()),
        }
    }

    /// The record `id`, counting writes still queued: a client reads what
    /// it was answered, even before its record is committed, and a
    /// generation whose stream has ended, with its end.
    pub(crate) async fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        if let Some(live) = self.live(id).filter(|live| live.finished()) {
            self.ended(&live).await;
        }
        match self.store.get(id).await? {
            Some(record) => Ok(Some(record)),
            None => {
                self.store.flush().await?;
                self.store.get(id).await
            }
        }
    }

    /// Waits for a write a client is waiting on: committed now, not with
    /// the store's next batch.
    pub(crate) async fn at_once<T>(
        &self,
        write: BoxFuture<'_, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        // Queued after the write: the writer commits both now.
        drop(self.store.flush());
        write.await
    }

    /// Waits until a generation has ended and its end is in the store.
    pub(crate) async fn ended(&self, live: &Live) {
        let mut progress = live.progress.subscribe();
        let _ = progress.wait_for(|p| p.1).await;
        let mut kept = live.kept.subscribe();
        // Its end is queued once it is finished: a client waits for it.
        while !*kept.borrow_and_update() {
            drop(self.store.flush());
            if kept.changed().await.is_err() {
                return;
            }
        }
    }

    /// A response's object as it stands, its status the record's: the
    /// record's own, or else the latest in its log (a running stream's
    /// start, a finished one's final event), which the record does not
    /// copy.
    pub(crate) async fn object(&self, record: &Record) -> Bytes {
        let object = match &record.object {
            Some(object) => Some(object.clone()),
            None => {
                let events = match self.live(&record.id) {
                    Some(live) => live.since(0),
                    None => self
                        .store
                        .events(&record.id, None)
                        .await
                        .map(|events| events.into_iter().map(|(_, e)| e).collect())
                        .unwrap_or_default(),
                };
                events
                    .iter()
                    .rev()
                    .find_map(|e| response_of(e))
                    .map(|(_, o)| o)
            }
        };
        restatus(object.as_deref().unwrap_or(b"{}"), record.status)
    }

    /// The generation `id`, if it runs in this process.
    pub(crate) fn live(&self, id: &str) -> Option<Arc<Live>> {
        backstop_router::lock(&self.live).get(id).cloned()
    }

    /// Registers generation `id` as running, with the events it has
    /// already made (after a restart).
    pub(crate) fn start(&self, id: &str, events: Vec<Bytes>) -> Arc<Live> {
        let live = Arc::new(Live::new(events));
        backstop_router::lock(&self.live).insert(id.to_string(), live.clone());
        live
    }

    /// Drops a generation that never ran (its record could not be kept).
    pub(crate) fn forget(&self, id: &str) {
        if let Some(live) = backstop_router::lock(&self.live).remove(id) {
            live.finish();
            live.kept.send_replace(true);
        }
    }

    /// Runs a generation's `frames` to their end apart from any client:
    /// each event goes to the live tail and to the log, and at the end its
    /// status and final object go to the store. With `announce` (a job,
    /// whose record says `queued`), its first event's object goes to the
    /// record as `in_progress`. A cancel stops it.
    pub(crate) fn pump(
        self: &Arc<Self>,
        id: String,
        kind: Kind,
        live: Arc<Live>,
        mut frames: BoxStream<'static, Bytes>,
        announce: bool,
    ) -> tokio::task::JoinHandle<()> {
        let gens = self.clone();
        tokio::spawn(async move {
            let mut cancel = live.cancel.subscribe();
            let mut cancelled = *cancel.borrow_and_update();
            // Another replica took it over, or ended it: it is not this
            // one's to go on with, nor to end.
            let mut released = gens.store.released(&id);
            let mut lost = false;
            let first = live.len() as u64;
            while !cancelled && !lost {
                tokio::select! {
                    frame = frames.next() => {
                        let Some(frame) = frame else { break };
                        let events = split_events(&frame);
                        let seq = live.extend(&events);
                        // A job's first event says it has started. (The
                        // write is queued in order, after the event; the
                        // stream does not wait for its commit.)
                        let started = (announce && seq == first)
                            .then(|| events.first().and_then(|e| response_of(e)))
                            .flatten();
                        let behind = gens.store.append(&id, seq, events);
                        if let Some((_, object)) = started {
                            let object = restatus(&object, Status::InProgress);
                            drop(gens.store.update(&id, Status::InProgress, Some(object)));
                        }
                        if behind {
                            // The store has fallen far behind: the stream
                            // waits for it rather than fill memory.
                            if let Err(e) = gens.store.flush().await {
                                tracing::error!(id, "the store cannot keep up: {e}");
                            }
                        }
                    }
                    _ = cancel.changed() => cancelled = true,
                    () = &mut released => lost = true,
                }
            }
            // Dropping the frames stops the generation.
            drop(frames);
            // Its clients are done now; it stays live (in memory) until its
            // end is committed, so no reader finds the log short.
            live.finish();
            if !lost {
                let (status, object) = live.outcome(kind, cancelled);
                if let Err(e) = gens.store.update(&id, status, object).await {
                    tracing::error!(id, "cannot keep a generation's end: {e}");
                }
            }
            backstop_router::lock(&gens.live).remove(&id);
            live.kept.send_replace(true);
        })
    }

    /// Generation `id`'s events after `after` (all for `None`), as SSE
    /// frames each with its sequence number as the event's `id:`; a live
    /// one is followed to its end. `None` when there is no such generation.
    pub(crate) async fn tail(
        self: &Arc<Self>,
        id: &str,
        after: Option<u64>,
    ) -> Result<Option<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>, StoreError> {
        let first = after.map_or(0, |a| a.saturating_add(1));
        if let Some(live) = self.live(id) {
            let progress = live.progress.subscribe();
            let stream = futures_util::stream::unfold(
                (live, progress, first),
                |(live, mut progress, next)| async move {
                    loop {
                        let (made, done) = *progress.borrow_and_update();
                        if made as u64 > next {
                            let (frame, n) = live.frame_since(next as usize);
                            let frame = Frame::data(frame);
                            return Some((Ok(frame), (live, progress, next + n as u64)));
                        }
                        if done || progress.changed().await.is_err() {
                            return None;
                        }
                    }
                },
            );
            return Ok(Some(stream.boxed()));
        }
        let Some(record) = self.get(id).await? else {
            return Ok(None);
        };
        if !record.status.is_final() {
            // Running elsewhere (another replica, or not yet started here):
            // followed through the store.
            return Ok(Some(self.follow(id.to_string(), after).boxed()));
        }
        let events = self.store.events(id, after).await?;
        let Some((start, _)) = events.first() else {
            return Ok(Some(futures_util::stream::empty().boxed()));
        };
        let start = *start;
        let events: Vec<Bytes> = events.into_iter().map(|(_, e)| e).collect();
        let frame = with_ids(start, &events);
        Ok(Some(
            futures_util::stream::once(async move { Ok(Frame::data(frame)) }).boxed(),
        ))
    }

    /// Generation `id`'s events after `after`, read from the store as they
    /// are committed, until its record is final: each batch of them as one
    /// frame. The store says when it may have changed ([`Store::changed`]),
    /// and it is looked at again every [`FOLLOW_CHECK`] whatever it says.
    fn follow(
        self: &Arc<Self>,
        id: String,
        after: Option<u64>,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static {
        futures_util::stream::unfold(
            (self.clone(), id, after, false),
            |(gens, id, mut after, done)| async move {
                if done {
                    return None;
                }
                let mut failures = 0;
                loop {
                    let changed = gens.store.changed(&id, FOLLOW_CHECK);
                    // The status first: once it is final, every event is in.
                    let read = async {
                        let record = gens.store.get(&id).await?;
                        let last = record.is_none_or(|r| r.status.is_final());
                        Ok::<_, StoreError>((last, gens.store.events(&id, after).await?))
                    };
                    let (last, events) = match read.await {
                        Ok(read) => read,
                        // The store away for a moment: looked at again.
                        Err(e) if failures < FOLLOW_FAILURES => {
                            failures += 1;
                            tracing::warn!(id, "cannot follow a generation, trying again: {e}");
                            changed.await;
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(id, "cannot follow a generation: {e}");
                            return None;
                        }
                    };
                    if let Some((start, _)) = events.first() {
                        let start = *start;
                        after = events.last().map(|(seq, _)| *seq);
                        let events: Vec<Bytes> = events.into_iter().map(|(_, e)| e).collect();
                        let frame = Frame::data(with_ids(start, &events));
                        return Some((Ok(frame), (gens, id, after, last)));
                    }
                    if last {
                        return None;
                    }
                    changed.await;
                }
            },
        )
    }

    /// Deletes final records past their retention, now and every
    /// `sweep_every`.
    pub(crate) fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let gens = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(gens.sweep_every);
            loop {
                every.tick().await;
                match gens.store.sweep(unix_now()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("the store's sweeper deleted {n} generations"),
                    Err(e) => tracing::warn!("the store's sweeper failed: {e}"),
                }
            }
        })
    }
}

/// SSE frames of `events`, numbered from `first`.
fn with_ids(first: u64, events: &[Bytes]) -> Bytes {
    let mut out = Vec::with_capacity(events.iter().map(|e| e.len() + 16).sum());
    for (seq, event) in (first..).zip(events) {
        let _ = writeln!(out, "id: {seq}");
        out.extend_from_slice(event);
    }
    Bytes::from(out)
}

/// The SSE events of a frame: each up to and with its blank line. (The
/// writers put each event's data on one line.) Every event of every kept
/// stream passes here, so the blank lines are found with `memchr`'s SIMD
/// search rather than byte by byte.
pub(crate) fn split_events(frame: &Bytes) -> Vec<Bytes> {
    let mut events = Vec::new();
    let mut start = 0;
    // The matches do not overlap: each starts at or after the last end.
    for end in memchr::memmem::find_iter(frame, b"\n\n") {
        let end = end + 2;
        events.push(frame.slice(start..end));
        start = end;
    }
    if start < frame.len() {
        events.push(frame.slice(start..));
    }
    events
}

/// The JSON of an event's `data:` line.
pub(crate) fn event_json(event: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(event).ok()?;
    let data = text.lines().find_map(|l| l.strip_prefix("data: "))?;
    serde_json::from_str(data).ok()
}

/// A Responses event's response object, with its status.
fn response_of(event: &[u8]) -> Option<(Status, Bytes)> {
    let v = event_json(event)?;
    let response = v.get("response")?;
    let status = Status::parse(response.get("status")?.as_str()?)?;
    Some((status, Bytes::from(response.to_string())))
}

/// A response object with its status set.
pub(crate) fn restatus(object: &[u8], status: Status) -> Bytes {
    let mut o: Value = serde_json::from_slice(object).unwrap_or_default();
    if o.is_object() {
        o["status"] = Value::from(status.as_str());
    }
    Bytes::from(o.to_string())
}

/// The status a Responses stream's final event gives, read from its
/// `event:` line (the writer's own), without parsing the object.
fn final_status(event: &[u8]) -> Option<Status> {
    let kind = event.strip_prefix(b"event: response.")?;
    let end = kind.iter().position(|&b| b == b'\n')?;
    match &kind[..end] {
        b"completed" => Some(Status::Completed),
        b"incomplete" => Some(Status::Incomplete),
        b"failed" => Some(Status::Failed),
        _ => None,
    }
}

/// Whether a generation's log has its last event already: a Responses
/// stream's final event, a chat stream's `[DONE]` or its error.
pub(crate) fn ends(kind: Kind, events: &[Bytes]) -> bool {
    let Some(last) = events.last() else {
        return false;
    };
    match kind {
        Kind::Response => final_status(last).is_some(),
        Kind::Chat => {
            last.as_ref() == b"data: [DONE]\n\n"
                || event_json(last).is_some_and(|e| e.get("error").is_some())
        }
    }
}

/// How a generation ended, from its events: its status, and its final
/// object where its log does not end with it.
pub(crate) fn outcome(kind: Kind, events: &[Bytes], cancelled: bool) -> (Status, Option<Bytes>) {
    match kind {
        Kind::Response => {
            if let Some(status) = events.last().and_then(|e| final_status(e)) {
                if !cancelled {
                    return (status, None);
                }
            }
            let last = events.iter().rev().find_map(|e| response_of(e));
            match last {
                Some((status, object)) if status.is_final() && !cancelled => (status, Some(object)),
                Some((_, object)) => {
                    let status = if cancelled {
                        Status::Cancelled
                    } else {
                        Status::Failed
                    };
                    (status, Some(restatus(&object, status)))
                }
                None if cancelled => (Status::Cancelled, None),
                None => (Status::Failed, None),
            }
        }
        Kind::Chat => {
            let done = events
                .last()
                .is_some_and(|e| e.as_ref() == b"data: [DONE]\n\n");
            let status = match (done, cancelled) {
                (true, _) => Status::Completed,
                (false, true) => Status::Cancelled,
                (false, false) => Status::Failed,
            };
            (status, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_splits_into_its_events_each_with_its_blank_line() {
        let split =
            |frame: &'static [u8]| -> Vec<Bytes> { split_events(&Bytes::from_static(frame)) };
        assert_eq!(
            split(b"data: 1\n\ndata: 2\n\n"),
            [&b"data: 1\n\n"[..], &b"data: 2\n\n"[..]]
        );
        // What follows the last blank line is an event of its own.
        assert_eq!(
            split(b"data: 1\n\ndata: 2"),
            [&b"data: 1\n\n"[..], &b"data: 2"[..]]
        );
        // Four newlines are two blank lines.
        assert_eq!(
            split(b"a\n\n\n\nb"),
            [&b"a\n\n"[..], &b"\n\n"[..], &b"b"[..]]
        );
        assert!(split(b"").is_empty());
    }
}
