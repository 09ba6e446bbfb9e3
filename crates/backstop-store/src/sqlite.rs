//! The embedded store: SQLite in WAL mode, in a data directory made on
//! first start.
//!
//! One writer thread owns the write connection and applies writes in
//! batches: it gathers writes for [`LINGER`] (or until [`Store::flush`]
//! asks) and commits them in one transaction, so a thousand streams
//! appending events cost a commit per batch, not per event, and a batch's
//! events to one generation go in one segment (see `segment`). A record
//! inserted and updated in one batch (a stream that starts and ends within
//! it) is written once, with its last status and object (see `Folds`):
//! a foreground stream costs two statements, not three. The writer runs
//! in the time the streams leave (see `priority`). Reads use
//! their own connection (WAL lets them run beside the writer) on tokio's
//! blocking pool.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};

use crate::priority::Priority;
use crate::segment::{self, Row, Segments};
use crate::write::{self, Answer, Channel, Folds, Queue, Update, Write, BATCH, LINGER};
use crate::{
    BoxFuture, Budget, Inserted, Kind, Record, Retention, Shared, Status, Store, StoreError,
    Verification, Verifier,
};

/// Event bytes queued for the writer past which it is behind, and runs as
/// an ordinary thread rather than in idle time only (see `priority`):
/// about a fifth of a second of streams at 1,000 a second.
const BEHIND: usize = 1 << 20;
/// Records deleted at a time while the database is over its size.
pub(crate) const SHED: usize = 16;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    background INTEGER NOT NULL,
    stored INTEGER NOT NULL,
    key TEXT,
    request BLOB NOT NULL,
    object BLOB,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    owner TEXT
);
-- Partial indexes: a record that ends unkeyed within its first batch (most
-- streams) adds no entry to either. (A database made before keeps its key
-- column's own unique index beside the first.)
CREATE UNIQUE INDEX IF NOT EXISTS responses_by_key ON responses (key) WHERE key IS NOT NULL;
DROP INDEX IF EXISTS responses_by_status;
CREATE INDEX IF NOT EXISTS responses_unfinished ON responses (status)
    WHERE status IN ('queued', 'in_progress');
CREATE INDEX IF NOT EXISTS responses_by_expiry ON responses (expires_at);
CREATE TABLE IF NOT EXISTS segments (
    response_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    lens TEXT NOT NULL,
    data BLOB NOT NULL,
    codec INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (response_id, seq)
);
";

/// Columns added since the first version, each with its table: a database
/// made before has them added, its rows as they were (segments plain,
/// records without an owner).
const ADDED: [(&str, &str, &str); 2] = [
    ("segments", "codec", "INTEGER NOT NULL DEFAULT 0"),
    ("responses", "owner", "TEXT"),
];

/// The first version's log, a row an event, becomes one-event segments.
const MIGRATE_EVENTS: &str = "
INSERT OR IGNORE INTO segments (response_id, seq, lens, data)
    SELECT response_id, seq, length(data), data FROM events;
DROP TABLE events;
";

const COLUMNS: &str =
    "id, kind, status, background, stored, key, request, object, created_at, expires_at, owner";

/// The embedded SQLite store.
pub struct Sqlite {
    writes: Queue<ToWriter>,
    read: Arc<Mutex<Connection>>,
    /// Whether what the last run left has been claimed.
    claimed: AtomicBool,
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
        for (table, column, kind) in ADDED {
            let has: bool = write.query_row(
                "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2)",
                [table, column],
                |row| row.get(0),
            )?;
            if !has {
                write.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
            }
        }
        let old: bool = write.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events')",
            [],
            |row| row.get(0),
        )?;
        if old {
            write.execute_batch(&format!("BEGIN; {MIGRATE_EVENTS} COMMIT;"))?;
        }
        let read = Connection::open(&path)?;
        read.busy_timeout(std::time::Duration::from_secs(5))?;
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let priority = Arc::new(Priority::default());
        let writer = Writer {
            conn: write,
            retention,
            queued: queued.clone(),
            priority: priority.clone(),
        };
        let writer = std::thread::Builder::new()
            .name("backstop-store".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| StoreError::Directory {
                path: dir.display().to_string(),
                source,
            })?
            .thread()
            .clone();
        let to_writer = ToWriter {
            writes: tx,
            writer,
            priority,
        };
        Ok(Sqlite {
            writes: Queue::new(to_writer, queued),
            read: Arc::new(Mutex::new(read)),
            claimed: AtomicBool::new(false),
        })
    }

    /// Sets how many event bytes may wait for the disk before an append
    /// says the store is behind (64 MiB unless set).
    pub fn max_unwritten(mut self, bytes: usize) -> Self {
        self.writes.max_unwritten = bytes;
        self
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

/// The writer thread's queue, and how a flush wakes it.
struct ToWriter {
    writes: mpsc::Sender<Write>,
    writer: std::thread::Thread,
    priority: Arc<Priority>,
}

impl Channel for ToWriter {
    fn send(&self, write: Write) -> bool {
        let flush = matches!(write, Write::Flush(_));
        if flush {
            // Its waiter does not wait for idle time (raised before the
            // writer can take it, so that its end lowers it again).
            self.priority.urge();
        }
        let sent = self.writes.send(write).is_ok();
        if flush {
            self.writer.unpark();
        }
        sent
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
        owner: row.get(10)?,
    })
}

fn get(conn: &Connection, column: &str, value: &str) -> rusqlite::Result<Option<Record>> {
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM responses WHERE {column} = ?1"
    ))?
    .query_row([value], record)
    .optional()
}

impl Store for Sqlite {
    fn insert(&self, record: Record) -> BoxFuture<'_, Result<Inserted, StoreError>> {
        self.writes.ask(|tx| Write::Insert(record, tx))
    }

    fn update(
        &self,
        id: &str,
        status: Status,
        object: Option<Bytes>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let id = id.to_string();
        self.writes
            .ask(move |tx| Write::Update(id, status, object, tx))
    }

    fn append(&self, id: &str, first: u64, events: Vec<Bytes>) -> bool {
        self.writes.append(id, first, events)
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
        let from = segment::first_wanted(after);
        self.read(move |conn| {
            // From the segment that holds the first event wanted on.
            let mut query = conn.prepare_cached(
                "SELECT seq, lens, data, codec FROM segments WHERE response_id = ?1 AND seq >= \
                 IFNULL((SELECT MAX(seq) FROM segments WHERE response_id = ?1 AND seq <= ?2), 0) \
                 ORDER BY seq",
            )?;
            let rows = query.query_map(
                params![id, i64::try_from(from).unwrap_or(i64::MAX)],
                |row| {
                    Ok((
                        row.get::<_, i64>(0)? as u64,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                    ))
                },
            )?;
            let rows = rows.collect::<Result<Vec<_>, _>>()?;
            Ok(segment::events(rows, after))
        })
    }

    fn delete(&self, id: &str) -> BoxFuture<'_, Result<bool, StoreError>> {
        let id = id.to_string();
        self.writes.ask(move |tx| Write::Delete(id, tx))
    }

    fn claim(&self) -> BoxFuture<'_, Result<Vec<Record>, StoreError>> {
        // One process owns the file: what is unfinished when it starts was
        // left by its last run, and all it makes later it holds.
        if self.claimed.swap(true, Ordering::Relaxed) {
            return Box::pin(async { Ok(Vec::new()) });
        }
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
        self.writes.ask(move |tx| Write::Sweep(now, tx))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.writes.ask(Write::Flush)
    }

    fn size(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.read(size)
    }

    fn changed(&self, _id: &str, wait: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(wait))
    }

    fn released(&self, _id: &str) -> BoxFuture<'static, ()> {
        Box::pin(std::future::pending())
    }

    fn reachable(&self) -> bool {
        true
    }

    fn share_budgets(
        &self,
        _budgets: Vec<Budget>,
    ) -> BoxFuture<'_, Result<Option<Vec<Shared>>, StoreError>> {
        Box::pin(async { Ok(None) })
    }

    fn verifiers(
        &self,
        _verifications: Vec<Verification>,
    ) -> BoxFuture<'_, Result<Option<Vec<Verifier>>, StoreError>> {
        Box::pin(async { Ok(None) })
    }

    fn shared(&self) -> bool {
        false
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
    queued: Arc<AtomicUsize>,
    priority: Arc<Priority>,
}

impl Writer {
    fn run(mut self, writes: mpsc::Receiver<Write>) {
        self.priority.lower();
        let mut batch = Vec::with_capacity(BATCH);
        while let Ok(first) = writes.recv() {
            if !matches!(first, Write::Flush(_)) {
                // Gathers the writes of the next moments (a flush wakes it).
                std::thread::park_timeout(LINGER);
            }
            batch.push(first);
            while batch.len() < BATCH {
                match writes.try_recv() {
                    Ok(write) => batch.push(write),
                    Err(_) => break,
                }
            }
            self.priority
                .keep_up(self.queued.load(Ordering::Relaxed) > BEHIND);
            let appended: usize = batch.iter().map(Write::appended).sum();
            let result = self.apply(&batch);
            if let Err(e) = &result {
                tracing::error!("the store could not commit {} writes: {e}", batch.len());
            }
            // A flush's waiter sees the bytes it waited for gone from the
            // count.
            self.queued.fetch_sub(appended, Ordering::Relaxed);
            let flushes = batch
                .iter()
                .filter(|w| matches!(w, Write::Flush(_)))
                .count();
            write::answer_all(std::mem::take(&mut batch), result);
            self.priority.flushed(flushes);
        }
    }

    /// Applies a batch in one transaction; what each write found.
    fn apply(&mut self, batch: &[Write]) -> Result<Vec<Answer>, StoreError> {
        let tx = self.conn.transaction()?;
        let mut segments = Segments::default();
        let folds = Folds::of(batch);
        let answers = batch
            .iter()
            .enumerate()
            .map(|(at, write)| {
                if folds.folded(at) {
                    return Ok(Answer::Done);
                }
                let updates = folds.updates(batch, at);
                apply_one(&tx, &self.retention, &mut segments, write, &updates)
            })
            .collect::<Result<Vec<_>, _>>()?;
        write_segments(&tx, segments.drain())?;
        tx.commit()?;
        Ok(answers)
    }
}

fn write_segments(
    tx: &rusqlite::Transaction<'_>,
    rows: impl IntoIterator<Item = Row>,
) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO segments (response_id, seq, lens, data, codec) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for row in rows {
        insert.execute(params![
            row.id,
            row.first as i64,
            row.lens,
            row.data,
            row.codec
        ])?;
    }
    Ok(())
}

fn update(
    tx: &rusqlite::Transaction<'_>,
    (id, status, object): Update<'_>,
) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE responses SET status = ?2, object = ?3 WHERE id = ?1")?
        .execute(params![id, status.as_str(), object.map(Bytes::as_ref)])?;
    Ok(())
}

/// Applies one write inside the batch's transaction; what it found. An
/// insert writes its record with the last of `updates` (the batch's later
/// updates folded into it: see [`Folds`]).
fn apply_one(
    tx: &rusqlite::Transaction<'_>,
    retention: &Retention,
    segments: &mut Segments,
    write: &Write,
    updates: &[Update<'_>],
) -> Result<Answer, StoreError> {
    Ok(match write {
        Write::Insert(r, _) => {
            let (status, object) = write::last_state(r, updates);
            let added = tx
                .prepare_cached(
                    "INSERT INTO responses (id, kind, status, background, stored, key, request, \
                 object, created_at, expires_at, owner) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ON CONFLICT DO NOTHING",
                )?
                .execute(params![
                    r.id,
                    r.kind.as_str(),
                    status.as_str(),
                    r.background,
                    r.stored,
                    r.key,
                    r.request.as_ref(),
                    object.map(Bytes::as_ref),
                    r.created_at as i64,
                    r.expires_at as i64,
                    r.owner
                ])?;
            let inserted = if added == 1 {
                Inserted::New
            } else {
                let existing = match &r.key {
                    Some(key) => get(tx, "key", key)?,
                    None => None,
                };
                let inserted = match existing.or(get(tx, "id", &r.id)?) {
                    Some(existing) => Inserted::Exists(Box::new(existing)),
                    None => Inserted::New,
                };
                // The record was there already: its updates apply to it
                // as they would have unfolded.
                for &folded in updates {
                    update(tx, folded)?;
                }
                inserted
            };
            Answer::Inserted(inserted)
        }
        Write::Update(id, status, object, _) => {
            update(tx, (id, *status, object.as_ref()))?;
            Answer::Done
        }
        Write::Append(id, first, events) => {
            if let Some(row) = segments.append(id, *first, events) {
                write_segments(tx, [row])?;
            }
            Answer::Done
        }
        Write::Delete(id, _) => {
            // Whatever was appended before goes with it.
            write_segments(tx, segments.drain())?;
            tx.prepare_cached("DELETE FROM segments WHERE response_id = ?1")?
                .execute([id])?;
            let gone = tx
                .prepare_cached("DELETE FROM responses WHERE id = ?1")?
                .execute([id])?
                > 0;
            Answer::Deleted(gone)
        }
        Write::Sweep(now, _) => {
            write_segments(tx, segments.drain())?;
            Answer::Swept(sweep(tx, retention, *now)?)
        }
        Write::Flush(_) => Answer::Done,
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
        &format!("DELETE FROM segments WHERE response_id IN ({ids})"),
        [arg],
    )?;
    Ok(tx.execute(&format!("DELETE FROM responses WHERE id IN ({ids})"), [arg])? as u64)
}
