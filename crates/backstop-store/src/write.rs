//! The writes a store's writer commits in batches, and how each is answered
//! once its batch is settled. A batch is applied from references to its
//! writes, so that a store whose database went away for a moment can apply
//! the same batch again; only then is each write answered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::{BoxFuture, Inserted, Record, Status, StoreError};

/// Most writes committed in one transaction.
pub(crate) const BATCH: usize = 4096;
/// How long the writer gathers writes before committing them. A commit
/// writes every page it touched in full (the tables' and indexes' last
/// pages, however little was added to them), so fewer, larger ones cost
/// far less than one a write; only a flush commits sooner. (50 ms took a
/// fifth off the writer's CPU time a stream, `bench-writer`, but its longer
/// bursts added to the streams' p99 at 1,000 a second: 10 ms it stays.)
pub(crate) const LINGER: Duration = Duration::from_millis(10);
/// Event bytes queued for the writer past which an append asks its stream
/// to wait for the writer, unless set otherwise: what a writer that falls
/// behind (an overloaded machine, a slow disk) may hold in memory.
pub(crate) const MAX_UNWRITTEN: usize = 64 << 20;

/// Where a write's waiter hears how it went.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A write for a store's writer, with where to say it is done.
pub(crate) enum Write {
    Insert(Record, Reply<Inserted>),
    Update(String, Status, Option<Bytes>, Reply<()>),
    /// A generation's next events, the first numbered as given.
    Append(String, u64, Vec<Bytes>),
    Delete(String, Reply<bool>),
    Sweep(u64, Reply<u64>),
    Flush(Reply<()>),
}

/// How a store hands a write to its writer, in order; a flush also wakes
/// the writer, which then commits at once rather than after [`LINGER`].
pub(crate) trait Channel: Send + Sync {
    /// Hands `write` over; false once the writer has stopped (its reply,
    /// dropped, then answers [`StoreError::Closed`]).
    fn send(&self, write: Write) -> bool;
}

/// The writes a store has sent its writer, and the event bytes among them
/// not yet committed (the writer takes a batch's off as it settles it): what
/// both stores' writing methods share.
pub(crate) struct Queue<C> {
    channel: C,
    queued: Arc<AtomicUsize>,
    /// Past it, an append says the store is behind.
    pub(crate) max_unwritten: usize,
}

impl<C: Channel> Queue<C> {
    /// A queue over `channel` to a writer that counts committed bytes off
    /// `queued`.
    pub(crate) fn new(channel: C, queued: Arc<AtomicUsize>) -> Self {
        Queue {
            channel,
            queued,
            max_unwritten: MAX_UNWRITTEN,
        }
    }

    /// Sends a write and waits for its answer.
    pub(crate) fn ask<T: Send + 'static>(
        &self,
        write: impl FnOnce(Reply<T>) -> Write,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let (tx, rx) = oneshot::channel();
        self.channel.send(write(tx));
        Box::pin(async move { rx.await.map_err(|_| StoreError::Closed)? })
    }

    /// As [`crate::Store::append`]: whether the store is behind.
    pub(crate) fn append(&self, id: &str, first: u64, events: Vec<Bytes>) -> bool {
        let len = events.iter().map(Bytes::len).sum();
        let queued = self.queued.fetch_add(len, Ordering::Relaxed) + len;
        if !self
            .channel
            .send(Write::Append(id.to_string(), first, events))
        {
            tracing::error!(
                id,
                first,
                "the store's writer has stopped: events are not kept"
            );
        }
        queued > self.max_unwritten
    }
}

/// What applying a write found, to answer once its batch is committed.
pub(crate) enum Answer {
    /// An insert's outcome.
    Inserted(Inserted),
    /// Whether a delete found its record.
    Deleted(bool),
    /// How many records a sweep deleted.
    Swept(u64),
    /// A write with nothing to say.
    Done,
}

impl Write {
    /// Event bytes it appends.
    pub(crate) fn appended(&self) -> usize {
        match self {
            Write::Append(_, _, events) => events.iter().map(Bytes::len).sum(),
            _ => 0,
        }
    }

    /// The generation whose events or status it changes (or that it
    /// deletes), if it does.
    pub(crate) fn changes(&self) -> Option<&str> {
        match self {
            Write::Update(id, ..) | Write::Append(id, ..) | Write::Delete(id, _) => Some(id),
            _ => None,
        }
    }

    /// Tells its waiter how its batch went: `answer` is what applying it
    /// found, or the batch's failure.
    pub(crate) fn answer(self, answer: Result<Answer, &StoreError>) {
        fn send<T>(reply: Reply<T>, value: Option<T>, failed: Option<&StoreError>) {
            let _ = reply.send(match (value, failed) {
                (Some(value), None) => Ok(value),
                (_, Some(e)) => Err(StoreError::Batch(e.to_string())),
                (None, None) => Err(StoreError::Batch("no answer".into())),
            });
        }
        let failed = answer.as_ref().err().copied();
        let answer = answer.ok();
        match self {
            Write::Insert(_, reply) => send(
                reply,
                match answer {
                    Some(Answer::Inserted(i)) => Some(i),
                    _ => None,
                },
                failed,
            ),
            Write::Delete(_, reply) => send(
                reply,
                match answer {
                    Some(Answer::Deleted(gone)) => Some(gone),
                    _ => None,
                },
                failed,
            ),
            Write::Sweep(_, reply) => send(
                reply,
                match answer {
                    Some(Answer::Swept(n)) => Some(n),
                    _ => None,
                },
                failed,
            ),
            Write::Update(_, _, _, reply) | Write::Flush(reply) => {
                send(reply, answer.map(|_| ()), failed)
            }
            Write::Append(..) => {}
        }
    }
}

/// Which updates of a batch its inserts can write themselves: a record
/// inserted and then updated in the same batch (a stream that starts and
/// ends within one commit, the common case) is written once, with its last
/// status and object, instead of inserted and then rewritten.
///
/// An update folds into the last insert of its id before it, unless a
/// delete or a sweep (which read or remove records) comes between them.
/// An insert that finds its record already there (`ON CONFLICT`) must then
/// apply its folded updates itself, in order, as they would have been.
pub(crate) struct Folds {
    /// Whether each write is an update that its insert writes.
    folded: Vec<bool>,
    /// For each insert with folded updates, their places, in order.
    updates: HashMap<usize, Vec<usize>>,
}

/// An update of a record's status and final object, as a batch holds it.
pub(crate) type Update<'a> = (&'a str, Status, Option<&'a Bytes>);

impl Folds {
    /// The folds of `batch`.
    pub(crate) fn of(batch: &[Write]) -> Self {
        let mut open: HashMap<&str, usize> = HashMap::new();
        let mut folded = vec![false; batch.len()];
        let mut updates: HashMap<usize, Vec<usize>> = HashMap::new();
        for (at, write) in batch.iter().enumerate() {
            match write {
                Write::Insert(record, _) => {
                    open.insert(&record.id, at);
                }
                Write::Update(id, ..) => {
                    if let Some(&insert) = open.get(id.as_str()) {
                        folded[at] = true;
                        updates.entry(insert).or_default().push(at);
                    }
                }
                Write::Delete(..) | Write::Sweep(..) => open.clear(),
                Write::Append(..) | Write::Flush(_) => {}
            }
        }
        Folds { folded, updates }
    }

    /// Whether write `at` is an update its insert writes.
    pub(crate) fn folded(&self, at: usize) -> bool {
        self.folded.get(at).copied().unwrap_or(false)
    }

    /// The updates folded into the write at `at` (only an insert has
    /// any), in order: the last gives the record its status and object.
    pub(crate) fn updates<'a>(&self, batch: &'a [Write], at: usize) -> Vec<Update<'a>> {
        self.updates
            .get(&at)
            .into_iter()
            .flatten()
            .filter_map(|&u| match &batch[u] {
                Write::Update(id, status, object, _) => {
                    Some((id.as_str(), *status, object.as_ref()))
                }
                _ => None,
            })
            .collect()
    }
}

/// The status and object an insert writes its record with: the last of
/// the updates folded into it, or else the record's own.
pub(crate) fn last_state<'a>(
    record: &'a Record,
    updates: &[Update<'a>],
) -> (Status, Option<&'a Bytes>) {
    updates.last().map_or(
        (record.status, record.object.as_ref()),
        |&(_, status, object)| (status, object),
    )
}

/// Answers a batch's writes: each with what applying it found, or all with
/// the batch's failure.
pub(crate) fn answer_all(batch: Vec<Write>, result: Result<Vec<Answer>, StoreError>) {
    match result {
        Ok(answers) => {
            for (write, answer) in batch.into_iter().zip(answers) {
                write.answer(Ok(answer));
            }
        }
        Err(e) => {
            for write in batch {
                write.answer(Err(&e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{Kind, Record};

    fn insert(id: &str) -> Write {
        let record = Record {
            id: id.into(),
            kind: Kind::Response,
            status: Status::InProgress,
            background: false,
            stored: true,
            key: None,
            request: Bytes::new(),
            object: None,
            created_at: 0,
            expires_at: 0,
            owner: None,
        };
        Write::Insert(record, oneshot::channel().0)
    }

    fn update(id: &str, status: Status) -> Write {
        Write::Update(id.into(), status, None, oneshot::channel().0)
    }

    #[test]
    fn updates_fold_into_their_insert_unless_a_delete_or_sweep_comes_between() {
        let batch = [
            insert("a"),
            Write::Append("a".into(), 0, vec![Bytes::from_static(b"e")]),
            update("a", Status::InProgress),
            insert("b"),
            update("a", Status::Completed),
            update("c", Status::Completed),
            Write::Delete("x".into(), oneshot::channel().0),
            update("b", Status::Completed),
            insert("d"),
            Write::Sweep(0, oneshot::channel().0),
            update("d", Status::Completed),
        ];
        let folds = Folds::of(&batch);
        let folded: Vec<usize> = (0..batch.len()).filter(|&at| folds.folded(at)).collect();
        assert_eq!(folded, [2, 4]);
        let statuses =
            |at| -> Vec<Status> { folds.updates(&batch, at).iter().map(|u| u.1).collect() };
        assert_eq!(statuses(0), [Status::InProgress, Status::Completed]);
        assert!(statuses(3).is_empty() && statuses(8).is_empty());
    }
}
