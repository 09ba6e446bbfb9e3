//! The embedded store: SQLite in WAL mode, in a data directory made on
//! first start.
//!
//! One writer thread owns the write connection and applies writes in
//! batches: it takes every write waiting (up to [`BATCH`]) and commits them
//! in one transaction, so a thousand streams appending events cost a commit
//! per batch, not per event. Reads use their own connection (WAL lets them
//! run beside the writer) on tokio's blocking pool.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use crate::{BoxFuture, Inserted, Kind, Record, Retention, Status, Store, StoreError};

/// Most writes committed in one transaction.
const BATCH: usize = 512;
/// Records deleted at a time while the database is over its size.
const SHED: usize = 16;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    background INTEGER NOT NULL,
    stored INTEGER NOT NULL,
    key TEXT UNIQUE,
    request BLOB NOT NULL,
    object BLOB,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_status ON responses (status);
CREATE INDEX IF NOT EXISTS responses_by_expiry ON responses (expires_at);
CREATE TABLE IF NOT EXISTS events (
    response_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (response_id, seq)
) WITHOUT ROWID;
";

const COLUMNS: &str =
    "id, kind, status, background, stored, key, request, object, created_at, expires_at";

/// A write for the writer thread, with where to say it is done.
enum Write {
    Insert(Record, oneshot::Sender<Result<Inserted, StoreError>>),
    Update(
        String,
        Status,
        Option<Bytes>,
        oneshot::Sender<Result<(), StoreError>>,
    ),
    Append(String, u64, Bytes),
    Delete(String, oneshot::Sender<Result<bool, StoreError>>),
    Sweep(u64, oneshot::Sender<Result<u64, StoreError>>),
    Flush(oneshot::Sender<Result<(), StoreError>>),
}

/// The embedded SQLite store.
pub struct Sqlite {
    writes: Mutex<mpsc::Sender<Write>>,
    read: Arc<Mutex<Connection>>,
}

impl Sqlite {
    /// Opens (or creates) the store in `dir`, as `backstop.db`.
    pub fn open(dir: &Path, retention: Retention) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Directory {
            path: dir.display().to_string(),
            source,
        })?;
        let path = dir.join("backstop.db");
        let write = Connection::open(&path)?;
        // Set before the first table: space freed by deletes can go back.
        write.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        write.pragma_update(None, "journal_mode", "WAL")?;
        // In WAL mode a commit is durable across a crash of the process
        // (what kill -9 does); only the OS's crash can lose the last ones.
        write.pragma_update(None, "synchronous", "NORMAL")?;
        write.busy_timeout(std::time::Duration::from_secs(5))?;
        write.execute_batch(SCHEMA)?;
        let read = Connection::open(&path)?;
        read.busy_timeout(std::time::Duration::from_secs(5))?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("backstop-store".into())
            .spawn(move || {
                Writer {
                    conn: write,
                    retention,
                }
                .run(rx)
            })
            .map_err(|source| StoreError::Directory {
                path: dir.display().to_string(),
                source,
            })?;
        Ok(Sqlite {
            writes: Mutex::new(tx),
            read: Arc::new(Mutex::new(read)),
        })
    }

    fn send(&self, write: Write) -> Result<(), StoreError> {
        let writes = self.writes.lock().map_err(|_| StoreError::Closed)?;
        writes.send(write).map_err(|_| StoreError::Closed)
    }

    /// Sends a write and waits for its answer.
    fn ask<T: Send + 'static>(
        &self,
        write: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Write,
    ) -> BoxFuture<'_, Result<T, StoreError>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.send(write(tx));
        Box::pin(async move {
            sent?;
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }

    /// Runs a read on the blocking pool.
    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, StoreError>> {
        let conn = self.read.clone();
        Box::pin(async move {
            let read = tokio::task::spawn_blocking(move || {
                let conn = conn.lock().map_err(|_| StoreError::Closed)?;
                f(&conn).map_err(StoreError::from)
            });
            read.await.map_err(|_| StoreError::Closed)?
        })
    }
}

fn record(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    let status: String = row.get(2)?;
    let kind: String = row.get(1)?;
    Ok(Record {
        id: row.get(0)?,
        kind: Kind::parse(&kind),
        status: Status::parse(&status).unwrap_or(Status::Failed),
        background: row.get(3)?,
        stored: row.get(4)?,
        key: row.get(5)?,
        request: Bytes::from(row.get::<_, Vec<u8>>(6)?),
        object: row.get::<_, Option<Vec<u8>>>(7)?.map(Bytes::from),
        created_at: row.get::<_, i64>(8)? as u64,
        expires_at: row.get::<_, i64>(9)? as u64,
    })
}

fn get(conn: &Connection, column: &str, value: &str) -> rusqlite::Result<Option<Record>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM responses WHERE {column} = ?1"),
        [value],
        record,
    )
    .optional()
}

impl Store for Sqlite {
    fn insert(&self, record: Record) -> BoxFuture<'_, Result<Inserted, StoreError>> {
        self.ask(|tx| Write::Insert(record, tx))
    }

    fn update(
        &self,
        id: &str,
        status: Status,
        object: Option<Bytes>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let id = id.to_string();
        self.ask(move |tx| Write::Update(id, status, object, tx))
    }

    fn append(&self, id: &str, seq: u64, event: Bytes) {
        if self
            .send(Write::Append(id.to_string(), seq, event))
            .is_err()
        {
            tracing::error!(
                id,
                seq,
                "the store's writer has stopped: an event is not kept"
            );
        }
    }

    fn get(&self, id: &str) -> BoxFuture<'_, Result<Option<Record>, StoreError>> {
        let id = id.to_string();
        self.read(move |conn| get(conn, "id", &id))
    }

    fn by_key(&self, key: &str) -> BoxFuture<'_, Result<Option<Record>, StoreError>> {
        let key = key.to_string();
        self.read(move |conn| get(conn, "key", &key))
    }

    fn events(
        &self,
        id: &str,
        after: Option<u64>,
    ) -> BoxFuture<'_, Result<Vec<(u64, Bytes)>, StoreError>> {
        let id = id.to_string();
        let after = after.map_or(-1, |a| i64::try_from(a).unwrap_or(i64::MAX));
        self.read(move |conn| {
            let mut query = conn.prepare_cached(
                "SELECT seq, data FROM events WHERE response_id = ?1 AND seq > ?2 ORDER BY seq",
            )?;
            let rows = query.query_map(params![id, after], |row| {
                Ok((
                    row.get::<_, i64>(0)? as u64,
                    Bytes::from(row.get::<_, Vec<u8>>(1)?),
                ))
            })?;
            rows.collect()
        })
    }

    fn delete(&self, id: &str) -> BoxFuture<'_, Result<bool, StoreError>> {
        let id = id.to_string();
        self.ask(move |tx| Write::Delete(id, tx))
    }

    fn unfinished(&self) -> BoxFuture<'_, Result<Vec<Record>, StoreError>> {
        self.read(|conn| {
            let mut query = conn.prepare(&format!(
                "SELECT {COLUMNS} FROM responses WHERE status IN ('queued', 'in_progress') \
                 ORDER BY created_at"
            ))?;
            let rows = query.query_map([], record)?;
            rows.collect()
        })
    }

    fn sweep(&self, now: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.ask(move |tx| Write::Sweep(now, tx))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.ask(Write::Flush)
    }

    fn size(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.read(size)
    }
}

/// Bytes the database holds (its pages less the free ones).
fn size(conn: &Connection) -> rusqlite::Result<u64> {
    let pragma = |name: &str| conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0));
    let pages = pragma("page_count")? - pragma("freelist_count")?;
    Ok((pages.max(0) * pragma("page_size")?) as u64)
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    retention: Retention,
}

/// An answer to send once the batch's transaction is settled.
type Reply = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;

impl Writer {
    fn run(mut self, writes: mpsc::Receiver<Write>) {
        let mut batch = Vec::with_capacity(BATCH);
        while let Ok(first) = writes.recv() {
            batch.push(first);
            while batch.len() < BATCH {
                match writes.try_recv() {
                    Ok(write) => batch.push(write),
                    Err(_) => break,
                }
            }
            self.apply(&mut batch);
        }
    }

    /// Applies a batch in one transaction, then answers each write.
    fn apply(&mut self, batch: &mut Vec<Write>) {
        let mut replies: Vec<Reply> = Vec::with_capacity(batch.len());
        let result = (|| -> Result<(), StoreError> {
            let tx = self.conn.transaction()?;
            for write in batch.drain(..) {
                replies.push(apply_one(&tx, &self.retention, write)?);
            }
            tx.commit()?;
            Ok(())
        })();
        if let Err(e) = &result {
            tracing::error!("the store could not commit {} writes: {e}", replies.len());
        }
        for reply in replies {
            reply(result.as_ref().map(|_| ()));
        }
        // Writes after the failing one got no reply: their senders dropped,
        // and their waiters see the store as failed.
        batch.clear();
    }
}

/// Applies one write inside the batch's transaction; what to answer once
/// the transaction is settled.
fn apply_one(
    tx: &rusqlite::Transaction<'_>,
    retention: &Retention,
    write: Write,
) -> Result<Reply, StoreError> {
    fn settle<T: Send + 'static>(reply: oneshot::Sender<Result<T, StoreError>>, value: T) -> Reply {
        Box::new(move |committed| {
            let _ = reply.send(match committed {
                Ok(()) => Ok(value),
                Err(_) => Err(StoreError::Closed),
            });
        })
    }
    Ok(match write {
        Write::Insert(r, reply) => {
            let added = tx.execute(
                "INSERT INTO responses (id, kind, status, background, stored, key, request, \
                 object, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT DO NOTHING",
                params![
                    r.id,
                    r.kind.as_str(),
                    r.status.as_str(),
                    r.background,
                    r.stored,
                    r.key,
                    r.request.as_ref(),
                    r.object.as_deref(),
                    r.created_at as i64,
                    r.expires_at as i64
                ],
            )?;
            let inserted = if added == 1 {
                Inserted::New
            } else {
                let existing = match &r.key {
                    Some(key) => get(tx, "key", key)?,
                    None => None,
                };
                match existing.or(get(tx, "id", &r.id)?) {
                    Some(existing) => Inserted::Exists(Box::new(existing)),
                    None => Inserted::New,
                }
            };
            settle(reply, inserted)
        }
        Write::Update(id, status, object, reply) => {
            match object {
                Some(object) => tx.execute(
                    "UPDATE responses SET status = ?2, object = ?3 WHERE id = ?1",
                    params![id, status.as_str(), object.as_ref()],
                )?,
                None => tx.execute(
                    "UPDATE responses SET status = ?2 WHERE id = ?1",
                    params![id, status.as_str()],
                )?,
            };
            settle(reply, ())
        }
        Write::Append(id, seq, data) => {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO events (response_id, seq, data) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![id, seq as i64, data.as_ref()])?;
            Box::new(|_| {})
        }
        Write::Delete(id, reply) => {
            tx.execute("DELETE FROM events WHERE response_id = ?1", [&id])?;
            let gone = tx.execute("DELETE FROM responses WHERE id = ?1", [&id])? > 0;
            settle(reply, gone)
        }
        Write::Sweep(now, reply) => {
            let gone = sweep(tx, retention, now)?;
            settle(reply, gone)
        }
        Write::Flush(reply) => settle(reply, ()),
    })
}

/// Deletes expired final records, then the oldest final ones while the
/// database is over its size; how many went.
fn sweep(tx: &rusqlite::Transaction<'_>, retention: &Retention, now: u64) -> rusqlite::Result<u64> {
    const FINAL: &str = "status NOT IN ('queued', 'in_progress')";
    let expired = format!("SELECT id FROM responses WHERE expires_at <= ?1 AND {FINAL}");
    let mut gone = delete_where(tx, &expired, now as i64)?;
    while size(tx)? > retention.max_bytes {
        let oldest = format!(
            "SELECT id FROM responses WHERE {FINAL} ORDER BY created_at LIMIT {SHED} OFFSET ?1"
        );
        let shed = delete_where(tx, &oldest, 0)?;
        if shed == 0 {
            break; // only unfinished generations left: they stay
        }
        gone += shed;
        tx.execute_batch("PRAGMA incremental_vacuum")?;
    }
    if gone > 0 {
        tx.execute_batch("PRAGMA incremental_vacuum")?;
    }
    Ok(gone)
}

/// Deletes the records (and events) a query of ids selects.
fn delete_where(tx: &rusqlite::Transaction<'_>, ids: &str, arg: i64) -> rusqlite::Result<u64> {
    tx.execute(
        &format!("DELETE FROM events WHERE response_id IN ({ids})"),
        [arg],
    )?;
    Ok(tx.execute(&format!("DELETE FROM responses WHERE id IN ({ids})"), [arg])? as u64)
}
