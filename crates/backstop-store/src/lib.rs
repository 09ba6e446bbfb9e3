//! Backstop's durable generations: each response (or chat stream kept by
//! an `Idempotency-Key`) with the request that makes it, its status and
//! latest object, and its append-only event log numbered from 0.
//!
//! [`Store`] is the interface the server uses; [`Sqlite`] is the embedded
//! default (a file in a data directory, WAL mode, no setup). A store shared
//! by several replicas (PostgreSQL) implements the same trait.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;

mod postgres;
mod priority;
mod segment;
mod sqlite;
mod write;

pub use postgres::Postgres;
pub use sqlite::Sqlite;

/// A boxed future, as the store's methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a generation stands, as the Responses API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Accepted, waiting for a runner.
    Queued,
    /// Generating.
    InProgress,
    /// Finished whole.
    Completed,
    /// Ended with an error.
    Failed,
    /// Cancelled by the client.
    Cancelled,
    /// Finished short: the token cap, or a content filter.
    Incomplete,
}

impl Status {
    /// The API's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Incomplete => "incomplete",
        }
    }

    /// The status of this name.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "queued" => Status::Queued,
            "in_progress" => Status::InProgress,
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            "cancelled" => Status::Cancelled,
            "incomplete" => Status::Incomplete,
            _ => return None,
        })
    }

    /// Whether nothing more will happen to it.
    pub fn is_final(self) -> bool {
        !matches!(self, Status::Queued | Status::InProgress)
    }
}

/// What kind of generation a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A Responses response.
    Response,
    /// A chat completion stream kept by its `Idempotency-Key`.
    Chat,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Response => "response",
            Kind::Chat => "chat",
        }
    }

    fn parse(name: &str) -> Self {
        match name {
            "chat" => Kind::Chat,
            _ => Kind::Response,
        }
    }
}

/// One generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// `resp_...`, or a chat completion's id.
    pub id: String,
    /// Response or chat.
    pub kind: Kind,
    /// Where it stands.
    pub status: Status,
    /// Run as a background job.
    pub background: bool,
    /// The client asked for it to be stored (`store`); otherwise it is kept
    /// only for the short window that polling and resuming need.
    pub stored: bool,
    /// The client's `Idempotency-Key`: one generation per key.
    pub key: Option<String>,
    /// The request as Backstop runs it (JSON).
    pub request: Bytes,
    /// The latest response object (JSON), unless its log holds it.
    pub object: Option<Bytes>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds after which the sweeper deletes it (once final).
    pub expires_at: u64,
    /// The identity that made it, when clients authenticate: only it may
    /// read, resume, cancel or delete it.
    pub owner: Option<String>,
}

/// What [`Store::insert`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Inserted {
    /// The record is new.
    New,
    /// A record with the same idempotency key exists: this one.
    Exists(Box<Record>),
}

/// How long records are kept, and how much disk they may take.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    /// A response stored at the client's request (`store: true`, the
    /// default): OpenAI keeps these 30 days.
    pub stored: Duration,
    /// Any other generation (`store: false`, a chat kept by its key): long
    /// enough to poll and resume; OpenAI keeps background results about 10
    /// minutes.
    pub unstored: Duration,
    /// The database's size past which the oldest finished records go.
    pub max_bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            stored: Duration::from_secs(30 * 24 * 3600),
            unstored: Duration::from_secs(600),
            max_bytes: 1 << 30,
        }
    }
}

impl Retention {
    /// When a record made at `now` with `stored` expires.
    pub fn expiry(&self, now: u64, stored: bool) -> u64 {
        let keep = if stored { self.stored } else { self.unstored };
        now.saturating_add(keep.as_secs())
    }
}

/// A rate limit the replicas share (one of an upstream's keys), as one
/// replica reports it: what it spent and heard since its last report.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// The limit's name (`{target}#{key}`).
    pub name: String,
    /// Requests and tokens per minute configured (`None`: not counted).
    pub per_minute: [Option<f64>; 2],
    /// Requests and tokens spent.
    pub spent: [f64; 2],
    /// The upstream's latest count of requests and tokens left.
    pub remaining: [Option<f64>; 2],
    /// How long the upstream said to wait, in milliseconds.
    pub held_ms: u64,
}

/// What the fleet has left of a shared limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Shared {
    /// Requests and tokens left (`None`: not counted).
    pub level: [Option<f64>; 2],
    /// How long the fleet waits, in milliseconds.
    pub held_ms: u64,
    /// Replicas sharing it now, the reporter included.
    pub replicas: u32,
}

/// One target's verification, as one replica reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verification {
    /// The target.
    pub target: String,
    /// Its breaker here is open.
    pub open: bool,
    /// It is verifying or ramping here: it would verify for the fleet.
    pub verifying: bool,
    /// The fraction of live traffic this replica's verification reached,
    /// to tell the fleet (when it verifies for the fleet).
    pub publish: Option<f64>,
}

/// The fleet's verification of one target.
#[derive(Debug, Clone, PartialEq)]
pub struct Verifier {
    /// This replica verifies it for the fleet (holds its lease).
    pub leads: bool,
    /// The fraction of live traffic the verifying replica last reached.
    pub fraction: f64,
    /// How many times it was told: a follower acts on a new one only.
    pub seq: u64,
    /// Replicas whose breaker for it is open now, this one included.
    pub open_replicas: u32,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database said no.
    #[error("database: {0}")]
    Database(#[from] rusqlite::Error),
    /// The data directory could not be made.
    #[error("data directory {path}: {source}")]
    Directory {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The store's writer has stopped.
    #[error("the store's writer has stopped")]
    Closed,
    /// PostgreSQL refused what was asked.
    #[error("database: {0}")]
    Postgres(String),
    /// The database cannot be reached (a restart, a dropped connection).
    #[error("the database is unreachable: {0}")]
    Unreachable(String),
    /// The database undid a transaction that met another (a deadlock).
    #[error("a conflict in the database: {0}")]
    Conflict(String),
    /// The batch a write was in could not be committed.
    #[error("a batch of writes could not be committed: {0}")]
    Batch(String),
}

/// Durable generations: the interface every store implements.
///
/// Every write is queued when its method is called, and writes are applied
/// in the order they were made; a write's future resolves once it is
/// committed, and need not be awaited for the write to happen (a caller
/// that only needs the order does not wait). Writes are committed in
/// batches, a few milliseconds' worth at a time, so persisting a stream
/// does not slow it; [`Store::flush`] commits everything queued at once,
/// for a caller whose client waits. [`Store::append`] returns nothing; a
/// later write that is awaited (an update, a flush) is applied after every
/// append made before it.
pub trait Store: Send + Sync {
    /// Adds a record, unless one with its idempotency key exists.
    fn insert(&self, record: Record) -> BoxFuture<'_, Result<Inserted, StoreError>>;
    /// Sets a record's status and its object (`None`: it has none of its
    /// own, as when its log ends with it).
    fn update(
        &self,
        id: &str,
        status: Status,
        object: Option<Bytes>,
    ) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Appends `events`, numbered from `first` (the next one), to a
    /// record's log; whether the store has fallen behind, so that the
    /// caller should wait for a [`Store::flush`] before it makes more. A
    /// stream appends each frame's events at once: one write, not one an
    /// event.
    fn append(&self, id: &str, first: u64, events: Vec<Bytes>) -> bool;
    /// A record by id.
    fn get(&self, id: &str) -> BoxFuture<'_, Result<Option<Record>, StoreError>>;
    /// A record by idempotency key.
    fn by_key(&self, key: &str) -> BoxFuture<'_, Result<Option<Record>, StoreError>>;
    /// A record's events after `after` (all of them for `None`), in order.
    fn events(
        &self,
        id: &str,
        after: Option<u64>,
    ) -> BoxFuture<'_, Result<Vec<(u64, Bytes)>, StoreError>>;
    /// Deletes a record and its events; whether there was one.
    fn delete(&self, id: &str) -> BoxFuture<'_, Result<bool, StoreError>>;
    /// Takes over the unfinished generations nobody runs, for this
    /// process to finish: those an earlier run of it left (SQLite), or those
    /// whose holder's lease ran out, its replica gone (PostgreSQL). Until it
    /// finishes them, this process holds them; each is claimed by one
    /// process only.
    fn claim(&self) -> BoxFuture<'_, Result<Vec<Record>, StoreError>>;
    /// Resolves if this process loses its hold on generation `id`: its
    /// lease ran out and another replica claimed it, or another replica
    /// ended it (a cancel). Its writes to that generation are then dropped,
    /// and it should stop making it. (Never, for a store one process owns.)
    fn released(&self, id: &str) -> BoxFuture<'static, ()>;
    /// Whether the database answered when last asked (every few seconds
    /// at most): false while it is away, as far as this process can tell.
    /// (Always, for an embedded store.)
    fn reachable(&self) -> bool;
    /// Reports what this replica spent of each shared rate limit, and
    /// answers what the fleet has left of each, in order; `None` for a
    /// store no other replica shares (each limit is then this process's
    /// own).
    fn share_budgets(
        &self,
        budgets: Vec<Budget>,
    ) -> BoxFuture<'_, Result<Option<Vec<Shared>>, StoreError>>;
    /// Reports this replica's verification of each target, and answers the
    /// fleet's, in order: one replica at a time verifies a target (a lease,
    /// taken by one that is verifying, renewed while it is, given up once
    /// it serves), and tells the others how far it got. `None` for a store
    /// no other replica shares.
    fn verifiers(
        &self,
        verifications: Vec<Verification>,
    ) -> BoxFuture<'_, Result<Option<Vec<Verifier>>, StoreError>>;
    /// Whether other replicas may share this store.
    fn shared(&self) -> bool;
    /// Deletes final records past their expiry, then the oldest final ones
    /// while the database is over its size; how many went.
    fn sweep(&self, now: u64) -> BoxFuture<'_, Result<u64, StoreError>>;
    /// Commits every write made so far now, and waits until it is on disk.
    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>>;
    /// The database's size in bytes.
    fn size(&self) -> BoxFuture<'_, Result<u64, StoreError>>;
    /// Resolves once generation `id` may have changed (new events, a new
    /// status) at another process's hands, or after `wait`, whichever is
    /// first. The watch starts when this is called: call it, read, then
    /// await it, and no change is missed. A store no other process writes
    /// (SQLite) only waits.
    fn changed(&self, id: &str, wait: Duration) -> BoxFuture<'static, ()>;
}

#[cfg(test)]
mod tests;
