//! The writes a store's writer commits in batches, and how each is answered
//! once its batch is settled. A batch is applied from references to its
//! writes, so that a store whose database went away for a moment can apply
//! the same batch again; only then is each write answered.

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::{Inserted, Record, Status, StoreError};

/// Where a write's waiter hears how it went.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A write for a store's writer, with where to say it is done.
pub(crate) enum Write {
    Insert(Record, Reply<Inserted>),
    Update(String, Status, Option<Bytes>, Reply<()>),
    Append(String, u64, Bytes),
    Delete(String, Reply<bool>),
    Sweep(u64, Reply<u64>),
    Flush(Reply<()>),
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
            Write::Append(_, _, event) => event.len(),
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
