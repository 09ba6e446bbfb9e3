//! The shared store: PostgreSQL, for several replicas that serve the same
//! generations. The same tables as the embedded store, made by numbered
//! migrations that one replica at a time applies (an advisory lock).
//!
//! One writer task applies writes in batches, as the embedded store does:
//! it gathers writes for [`LINGER`] (or until [`Store::flush`] asks) and
//! commits them in one transaction on a pooled connection, a batch's events
//! to one generation in one segment, a record inserted and updated within
//! it written once (see `Folds`). A batch that fails because the
//! database went away (a restart, a dropped connection) is applied again
//! once it is back, for up to [`OUTAGE`]; until then its writes wait, and
//! appends say the store is behind once
//! [`MAX_UNWRITTEN`](crate::write::MAX_UNWRITTEN) bytes wait, so streams
//! pause instead of losing events. Reads take their own pooled connections.
//!
//! Each batch tells the other replicas which generations it changed, with
//! one `NOTIFY` that PostgreSQL delivers when the batch commits; each
//! replica `LISTEN`s on a connection of its own, so a client that follows a
//! generation another replica runs hears of each batch of its events
//! without polling.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::segment::{self, Row, Segments};
use crate::write::{self, Answer, Channel, Folds, Queue, Update, Write, BATCH, LINGER};
use crate::{
    BoxFuture, Budget, Inserted, Kind, Record, Retention, Shared, Status, Store, StoreError,
    Verification, Verifier,
};

/// Connections in the pool, readers and the writer together.
const POOL: usize = 16;
/// The longest wait for a pooled connection, a new one included.
const CONNECT: Duration = Duration::from_secs(5);
/// How long a batch is tried again while the database is unreachable,
/// before its writes fail.
const OUTAGE: Duration = Duration::from_secs(30);
/// The longest wait between two tries of a batch.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Changes a slow follower may fall behind by before it is told that
/// anything may have changed.
const CHANGES: usize = 1024;
/// Records deleted at a time while the store is over its size.
const SHED: i64 = 64;
/// The channel on which batches name the generations they changed.
const CHANNEL: &str = "backstop_changes";
/// The advisory lock a replica holds while it migrates.
const MIGRATION_LOCK: i64 = 0x6261_636b_7374_6f70; // "backstop"

/// The schema's versions, in order: each is applied once, in one
/// transaction, and recorded in `backstop_schema`.
pub(crate) const MIGRATIONS: [&str; 3] = [
    "
CREATE TABLE responses (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    background BOOLEAN NOT NULL,
    stored BOOLEAN NOT NULL,
    key TEXT UNIQUE,
    request BYTEA NOT NULL,
    object BYTEA,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    owner TEXT,
    holder TEXT,
    epoch BIGINT NOT NULL DEFAULT 0,
    lease_until BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX responses_by_status ON responses (status);
CREATE INDEX responses_unheld ON responses (lease_until)
    WHERE status IN ('queued', 'in_progress');
CREATE INDEX responses_by_expiry ON responses (expires_at);
CREATE INDEX responses_by_age ON responses (created_at);
CREATE TABLE segments (
    response_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    lens TEXT NOT NULL,
    data BYTEA NOT NULL,
    codec SMALLINT NOT NULL,
    PRIMARY KEY (response_id, seq)
);
",
    "
CREATE TABLE budgets (
    name TEXT PRIMARY KEY,
    requests DOUBLE PRECISION,
    tokens DOUBLE PRECISION,
    at_ms BIGINT NOT NULL,
    held_until_ms BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE budget_replicas (
    holder TEXT PRIMARY KEY,
    seen_ms BIGINT NOT NULL
);
",
    "
CREATE TABLE verifiers (
    target TEXT PRIMARY KEY,
    holder TEXT,
    lease_until BIGINT NOT NULL DEFAULT 0,
    fraction DOUBLE PRECISION NOT NULL DEFAULT 0,
    seq BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE breakers (
    target TEXT NOT NULL,
    holder TEXT NOT NULL,
    open BOOLEAN NOT NULL,
    seen_ms BIGINT NOT NULL,
    PRIMARY KEY (target, holder)
);
",
];

const COLUMNS: &str =
    "id, kind, status, background, stored, key, request, object, created_at, expires_at, owner";
const FINAL: &str = "status NOT IN ('queued', 'in_progress')";
const UNFINISHED: &str = "status IN ('queued', 'in_progress')";
/// The database's clock, in Unix milliseconds: leases are timed by one
/// clock, whatever the replicas' say.
const NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::BIGINT";
/// A replica that has not reported its budgets (or its breakers) for this
/// long no longer counts among those sharing them.
const BUDGET_PRESENCE_MS: i64 = 2_000;
/// Generations claimed at a time.
const CLAIM: i64 = 64;

/// The PostgreSQL store.
pub struct Postgres {
    pool: Pool,
    /// The ids of generations changed by any replica's batches, as they
    /// commit; an empty id: anything may have changed (the listener was
    /// away).
    changes: broadcast::Sender<Arc<str>>,
    /// The generations this replica holds.
    holds: Arc<Holds>,
    /// Whether the database answered when last asked.
    reachable: Arc<AtomicBool>,
    /// The tasks that listen for changes and renew the leases.
    tasks: [tokio::task::JoinHandle<()>; 2],
    writes: Queue<ToWriter>,
}

/// A database error as the store reports it: the connection's loss (or a
/// server shutting down) is [`StoreError::Unreachable`], worth trying
/// again; anything else is the database's refusal.
impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        let gone = e.is_closed()
            || e.code().is_none_or(|code| {
                // Class 08: connection exceptions; 57P0x: the server is
                // shutting down or restarting.
                code.code().starts_with("08") || code.code().starts_with("57P0")
            });
        // Class 40: a deadlock or a serialization failure, undone whole.
        let conflict = e.code().is_some_and(|code| code.code().starts_with("40"));
        // The server's own words, where it said any.
        let said = match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => e.to_string(),
        };
        if gone {
            StoreError::Unreachable(said)
        } else if conflict {
            StoreError::Conflict(said)
        } else {
            StoreError::Postgres(said)
        }
    }
}

/// A connection the pool cannot make: the database is unreachable.
impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        StoreError::Unreachable(e.to_string())
    }
}

impl Postgres {
    /// Connects to the database at `url` (`postgres://user@host/db`),
    /// brings its schema up to date, and starts the writer. The generations
    /// this replica makes or claims it holds by leases of `lease`.
    pub async fn connect(
        url: &str,
        retention: Retention,
        lease: Duration,
    ) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Postgres(e.to_string()))?;
        let listen = config.clone();
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // A database that stops answering (a partition that drops packets)
        // fails a wait for a connection instead of hanging it.
        let pool = Pool::builder(manager)
            .max_size(POOL)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .timeouts(deadpool_postgres::Timeouts {
                wait: Some(CONNECT),
                create: Some(CONNECT),
                recycle: Some(CONNECT),
            })
            .build()
            .map_err(|e| StoreError::Postgres(e.to_string()))?;
        migrate(&pool).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let wake = Arc::new(Notify::new());
        let queued = Arc::new(AtomicUsize::new(0));
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let holds = Arc::new(Holds {
            holder: format!("{}-{since:x}", std::process::id()),
            lease,
            epochs: std::sync::Mutex::new(HashMap::new()),
            lost: broadcast::channel(CHANGES).0,
        });
        let reachable = Arc::new(AtomicBool::new(true));
        let writer = Writer {
            pool: pool.clone(),
            retention,
            queued: queued.clone(),
            wake: wake.clone(),
            holds: holds.clone(),
            reachable: reachable.clone(),
        };
        tokio::spawn(writer.run(rx));
        let (changes, _) = broadcast::channel(CHANGES);
        let (listening, ready) = oneshot::channel();
        let listener = tokio::spawn(listen_for_changes(
            listen,
            changes.clone(),
            listening,
            reachable.clone(),
        ));
        // A replica follows other replicas' changes from its first request.
        let _ = ready.await;
        let renewer = tokio::spawn(renew(pool.clone(), holds.clone(), reachable.clone()));
        Ok(Postgres {
            pool,
            changes,
            holds,
            reachable,
            tasks: [listener, renewer],
            writes: Queue::new(ToWriter { writes: tx, wake }, queued),
        })
    }

    /// Sets how many event bytes may wait for the database before an
    /// append says the store is behind (64 MiB unless set).
    pub fn max_unwritten(mut self, bytes: usize) -> Self {
        self.writes.max_unwritten = bytes;
        self
    }

    async fn record_where(&self, column: &str, value: &str) -> Result<Option<Record>, StoreError> {
        let client = self.pool.get().await?;
        Ok(get(&client, column, value).await?)
    }
}

/// The writer task's queue, and what wakes it for a flush.
struct ToWriter {
    writes: mpsc::UnboundedSender<Write>,
    wake: Arc<Notify>,
}

impl Channel for ToWriter {
    fn send(&self, write: Write) -> bool {
        let flush = matches!(write, Write::Flush(_));
        let sent = self.writes.send(write).is_ok();
        if flush {
            self.wake.notify_one();
        }
        sent
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The generations a replica runs, each held by a lease: renewed while the
/// replica lives, taken over by another replica once it runs out. Each
/// claim adds one to the generation's epoch; a batch writes to a held
/// generation only while its epoch is still the one this replica got (a
/// fence: a replica that lost its lease cannot write over its successor).
struct Holds {
    /// This replica, as the database names holders.
    holder: String,
    /// How long a lease lasts unless renewed.
    lease: Duration,
    /// Held generations and their epochs.
    epochs: std::sync::Mutex<HashMap<String, i64>>,
    /// Generations whose hold was lost.
    lost: broadcast::Sender<Arc<str>>,
}

impl Holds {
    fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }

    fn epochs(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.epochs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Renews this replica's leases, every third of a lease, and so learns
/// whether the database answers (a statement that does not finish within
/// the period counts as no answer, as a partition that drops packets
/// looks).
async fn renew(pool: Pool, holds: Arc<Holds>, reachable: Arc<AtomicBool>) {
    let every = (holds.lease / 3).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(every).await;
        let renewed = async {
            let client = pool.get().await?;
            if holds.epochs().is_empty() {
                client.execute("SELECT 1", &[]).await?;
                return Ok(());
            }
            // Rows locked in id order, as a batch's fence locks them.
            client
                .execute(
                    &format!(
                        "UPDATE responses SET lease_until = {NOW_MS} + $2 WHERE id IN \
                         (SELECT id FROM responses WHERE holder = $1 AND {UNFINISHED} \
                         ORDER BY id FOR UPDATE)"
                    ),
                    &[&holds.holder, &holds.lease_ms()],
                )
                .await?;
            Ok::<_, StoreError>(())
        };
        match tokio::time::timeout(every, renewed).await {
            Ok(Ok(())) => reachable.store(true, Ordering::Relaxed),
            Ok(Err(e)) => {
                reachable.store(false, Ordering::Relaxed);
                tracing::warn!("the store cannot renew this replica's leases: {e}");
            }
            Err(_) => {
                reachable.store(false, Ordering::Relaxed);
                tracing::warn!("the store did not answer within {every:?}");
            }
        }
    }
}

/// Listens for the generations batches change, on a connection of its own,
/// connecting again whenever it is lost; tells every follower that anything
/// may have changed after each loss (a change may have gone unheard).
/// `listening` hears once the first try is done.
async fn listen_for_changes(
    config: tokio_postgres::Config,
    changes: broadcast::Sender<Arc<str>>,
    listening: oneshot::Sender<()>,
    reachable: Arc<AtomicBool>,
) {
    let mut listening = Some(listening);
    let mut backoff = Duration::from_millis(50);
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let heard = changes.clone();
                let messages = tokio::spawn(async move {
                    while let Some(Ok(message)) =
                        std::future::poll_fn(|cx| connection.poll_message(cx)).await
                    {
                        if let AsyncMessage::Notification(n) = message {
                            let _ = heard.send(Arc::from(n.payload()));
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    Ok(()) => {
                        backoff = Duration::from_millis(50);
                        reachable.store(true, Ordering::Relaxed);
                        let _ = changes.send(Arc::from(""));
                    }
                    Err(e) => tracing::warn!("the store cannot listen for changes: {e}"),
                }
                listening.take().map(|l| l.send(()));
                let _ = messages.await;
            }
            Err(e) => tracing::warn!("the store cannot listen for changes: {e}"),
        }
        listening.take().map(|l| l.send(()));
        // Its connection lost: the database is away until it is back.
        reachable.store(false, Ordering::Relaxed);
        let _ = changes.send(Arc::from(""));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The database's clock now, in Unix milliseconds.
async fn db_now(tx: &deadpool_postgres::Transaction<'_>) -> Result<i64, tokio_postgres::Error> {
    tx.query_one(&format!("SELECT {NOW_MS}"), &[])
        .await?
        .try_get(0)
}

/// The indexes of `items` in the order of their names: every replica locks
/// shared rows in that order, so two never wait on each other.
fn in_order<T>(items: &[T], name: impl Fn(&T) -> &str) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| name(&items[a]).cmp(name(&items[b])));
    order
}

/// Brings one shared limit up to `now`: refilled at its rate since it was
/// last brought up, less what the reporter spent, no more than the
/// upstream's latest count; held as long as anyone was told to wait.
async fn share_budget(
    tx: &deadpool_postgres::Transaction<'_>,
    budget: &Budget,
    now: i64,
    replicas: u32,
) -> Result<Shared, tokio_postgres::Error> {
    let [requests, tokens] = budget.per_minute;
    tx.execute(
        "INSERT INTO budgets (name, requests, tokens, at_ms) VALUES ($1, $2, $3, $4) \
         ON CONFLICT DO NOTHING",
        &[&budget.name, &requests, &tokens, &now],
    )
    .await?;
    let row = tx
        .query_one(
            "SELECT requests, tokens, at_ms, held_until_ms FROM budgets WHERE name = $1 \
             FOR UPDATE",
            &[&budget.name],
        )
        .await?;
    let at: i64 = row.try_get(2)?;
    let elapsed_min = (now - at).max(0) as f64 / 60_000.0;
    let mut level = [None, None];
    for (i, per_minute) in budget.per_minute.iter().enumerate() {
        let Some(per_minute) = per_minute else {
            continue;
        };
        let was: Option<f64> = row.try_get(i)?;
        let refilled = (was.unwrap_or(*per_minute) + elapsed_min * per_minute).min(*per_minute);
        let mut left = refilled - budget.spent[i];
        if let Some(remaining) = budget.remaining[i] {
            left = left.min(remaining);
        }
        level[i] = Some(left);
    }
    let held_until: i64 = row.try_get(3)?;
    let said = now.saturating_add(i64::try_from(budget.held_ms).unwrap_or(i64::MAX));
    let held_until = if budget.held_ms > 0 {
        held_until.max(said)
    } else {
        held_until
    };
    tx.execute(
        "UPDATE budgets SET requests = $2, tokens = $3, at_ms = $4, held_until_ms = $5 \
         WHERE name = $1",
        &[&budget.name, &level[0], &level[1], &now, &held_until],
    )
    .await?;
    Ok(Shared {
        level,
        held_ms: u64::try_from(held_until - now).unwrap_or(0),
        replicas,
    })
}

/// One target's verification for the fleet: the lease taken or renewed by
/// a replica that verifies (once the holder's lapsed), given up by one that
/// serves again; what the holder publishes; and who has it open.
async fn verify(
    tx: &deadpool_postgres::Transaction<'_>,
    v: &Verification,
    holds: &Holds,
    now: i64,
) -> Result<Verifier, tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO verifiers (target) VALUES ($1) ON CONFLICT DO NOTHING",
        &[&v.target],
    )
    .await?;
    let row = tx
        .query_one(
            "SELECT holder, lease_until, fraction, seq FROM verifiers WHERE target = $1 \
             FOR UPDATE",
            &[&v.target],
        )
        .await?;
    let holder: Option<String> = row.try_get(0)?;
    let lease_until: i64 = row.try_get(1)?;
    let mut fraction: f64 = row.try_get(2)?;
    let mut seq: i64 = row.try_get(3)?;
    let mine = holder.as_deref() == Some(holds.holder.as_str()) && lease_until > now;
    if let (true, Some(published)) = (mine, v.publish) {
        fraction = published;
        seq += 1;
    }
    let leads = v.verifying && (mine || lease_until <= now);
    let (holder, lease_until) = if leads {
        (Some(holds.holder.clone()), now + holds.lease_ms())
    } else if mine {
        (holder, 0) // serving again here: another replica may verify
    } else {
        (holder, lease_until)
    };
    tx.execute(
        "UPDATE verifiers SET holder = $2, lease_until = $3, fraction = $4, seq = $5 \
         WHERE target = $1",
        &[&v.target, &holder, &lease_until, &fraction, &seq],
    )
    .await?;
    tx.execute(
        "INSERT INTO breakers VALUES ($1, $2, $3, $4) ON CONFLICT (target, holder) \
         DO UPDATE SET open = $3, seen_ms = $4",
        &[&v.target, &holds.holder, &v.open, &now],
    )
    .await?;
    let open: i64 = tx
        .query_one(
            "SELECT count(*) FROM breakers WHERE target = $1 AND open AND seen_ms > $2",
            &[&v.target, &(now - BUDGET_PRESENCE_MS)],
        )
        .await?
        .try_get(0)?;
    Ok(Verifier {
        leads,
        fraction,
        seq: u64::try_from(seq).unwrap_or(0),
        open_replicas: u32::try_from(open).unwrap_or(0),
    })
}

/// Applies the migrations the database has not had, one replica at a time.
async fn migrate(pool: &Pool) -> Result<(), StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS backstop_schema (version INTEGER PRIMARY KEY)")
        .await?;
    let done: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM backstop_schema", &[])
        .await?
        .get(0);
    for (version, migration) in (1i32..).zip(MIGRATIONS) {
        if version > done {
            tx.batch_execute(migration).await?;
            tx.execute("INSERT INTO backstop_schema VALUES ($1)", &[&version])
                .await?;
            tracing::info!(version, "the store's schema is migrated");
        }
    }
    tx.commit().await?;
    Ok(())
}

fn record(row: &tokio_postgres::Row) -> Result<Record, tokio_postgres::Error> {
    let status: &str = row.try_get(2)?;
    let kind: &str = row.try_get(1)?;
    Ok(Record {
        id: row.try_get(0)?,
        kind: Kind::parse(kind),
        status: Status::parse(status).unwrap_or(Status::Failed),
        background: row.try_get(3)?,
        stored: row.try_get(4)?,
        key: row.try_get(5)?,
        request: Bytes::from(row.try_get::<_, Vec<u8>>(6)?),
        object: row.try_get::<_, Option<Vec<u8>>>(7)?.map(Bytes::from),
        created_at: row.try_get::<_, i64>(8)? as u64,
        expires_at: row.try_get::<_, i64>(9)? as u64,
        owner: row.try_get(10)?,
    })
}

async fn get(
    client: &impl GenericClient,
    column: &str,
    value: &str,
) -> Result<Option<Record>, tokio_postgres::Error> {
    let query = client
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM responses WHERE {column} = $1"
        ))
        .await?;
    client
        .query_opt(&query, &[&value])
        .await?
        .as_ref()
        .map(record)
        .transpose()
}

/// Bytes the store holds: its records' requests, objects and event logs.
async fn size(client: &impl GenericClient) -> Result<u64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT (SELECT COALESCE(SUM(octet_length(request) + \
             COALESCE(octet_length(object), 0)), 0) FROM responses)::BIGINT + \
             (SELECT COALESCE(SUM(octet_length(data) + octet_length(lens)), 0) \
             FROM segments)::BIGINT",
            &[],
        )
        .await?;
    Ok(row.try_get::<_, i64>(0)?.max(0) as u64)
}

fn sql_seq(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

impl Store for Postgres {
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
        Box::pin(async move { self.record_where("id", &id).await })
    }

    fn by_key(&self, key: &str) -> BoxFuture<'_, Result<Option<Record>, StoreError>> {
        let key = key.to_string();
        Box::pin(async move { self.record_where("key", &key).await })
    }

    fn events(
        &self,
        id: &str,
        after: Option<u64>,
    ) -> BoxFuture<'_, Result<Vec<(u64, Bytes)>, StoreError>> {
        let id = id.to_string();
        Box::pin(async move {
            let client = self.pool.get().await?;
            // From the segment that holds the first event wanted on.
            let query = client
                .prepare_cached(
                    "SELECT seq, lens, data, codec FROM segments WHERE response_id = $1 AND \
                     seq >= COALESCE((SELECT MAX(seq) FROM segments WHERE response_id = $1 \
                     AND seq <= $2), 0) ORDER BY seq",
                )
                .await?;
            let from = sql_seq(segment::first_wanted(after));
            let rows = client.query(&query, &[&id, &from]).await?;
            let segments = rows
                .iter()
                .map(|row| {
                    Ok((
                        row.try_get::<_, i64>(0)? as u64,
                        row.try_get(1)?,
                        row.try_get(2)?,
                        row.try_get(3)?,
                    ))
                })
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
            Ok(segment::events(segments, after))
        })
    }

    fn delete(&self, id: &str) -> BoxFuture<'_, Result<bool, StoreError>> {
        let id = id.to_string();
        self.writes.ask(move |tx| Write::Delete(id, tx))
    }

    fn claim(&self) -> BoxFuture<'_, Result<Vec<Record>, StoreError>> {
        Box::pin(async move {
            let client = self.pool.get().await?;
            // Rows another claimer has locked are skipped: each generation
            // goes to one replica.
            let rows = client
                .query(
                    &format!(
                        "UPDATE responses SET holder = $1, epoch = epoch + 1, \
                         lease_until = {NOW_MS} + $2 WHERE id IN (SELECT id FROM responses \
                         WHERE {UNFINISHED} AND lease_until < {NOW_MS} AND holder IS DISTINCT \
                         FROM $1 ORDER BY created_at LIMIT {CLAIM} FOR UPDATE SKIP LOCKED) \
                         RETURNING {COLUMNS}, epoch"
                    ),
                    &[&self.holds.holder, &self.holds.lease_ms()],
                )
                .await?;
            let mut claimed = Vec::with_capacity(rows.len());
            for row in &rows {
                let record = record(row)?;
                let epoch: i64 = row.try_get(11)?;
                self.holds.epochs().insert(record.id.clone(), epoch);
                claimed.push(record);
            }
            claimed.sort_by_key(|r| r.created_at);
            Ok(claimed)
        })
    }

    fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    fn share_budgets(
        &self,
        budgets: Vec<Budget>,
    ) -> BoxFuture<'_, Result<Option<Vec<Shared>>, StoreError>> {
        Box::pin(async move {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let now = db_now(&tx).await?;
            tx.execute(
                "INSERT INTO budget_replicas VALUES ($1, $2) \
                 ON CONFLICT (holder) DO UPDATE SET seen_ms = $2",
                &[&self.holds.holder, &now],
            )
            .await?;
            let replicas: i64 = tx
                .query_one(
                    "SELECT count(*) FROM budget_replicas WHERE seen_ms > $1",
                    &[&(now - BUDGET_PRESENCE_MS)],
                )
                .await?
                .try_get(0)?;
            let replicas = u32::try_from(replicas.max(1)).unwrap_or(u32::MAX);
            let mut shared = vec![None; budgets.len()];
            for i in in_order(&budgets, |b| &b.name) {
                shared[i] = Some(share_budget(&tx, &budgets[i], now, replicas).await?);
            }
            tx.commit().await?;
            Ok(Some(shared.into_iter().flatten().collect()))
        })
    }

    fn verifiers(
        &self,
        verifications: Vec<Verification>,
    ) -> BoxFuture<'_, Result<Option<Vec<Verifier>>, StoreError>> {
        Box::pin(async move {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let now = db_now(&tx).await?;
            let mut verifiers = vec![None; verifications.len()];
            for i in in_order(&verifications, |v| &v.target) {
                verifiers[i] = Some(verify(&tx, &verifications[i], &self.holds, now).await?);
            }
            tx.commit().await?;
            Ok(Some(verifiers.into_iter().flatten().collect()))
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn released(&self, id: &str) -> BoxFuture<'static, ()> {
        let mut lost = self.holds.lost.subscribe();
        let id = id.to_string();
        Box::pin(async move {
            loop {
                match lost.recv().await {
                    Ok(gone) if *gone == *id => return,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                }
            }
        })
    }

    fn sweep(&self, now: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.writes.ask(move |tx| Write::Sweep(now, tx))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.writes.ask(Write::Flush)
    }

    fn size(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let client = self.pool.get().await?;
            Ok(size(&client).await?)
        })
    }

    fn changed(&self, id: &str, wait: Duration) -> BoxFuture<'static, ()> {
        let mut changes = self.changes.subscribe();
        let id = id.to_string();
        Box::pin(async move {
            let heard = async {
                loop {
                    match changes.recv().await {
                        Ok(changed) if changed.is_empty() || *changed == *id => return,
                        Ok(_) => {}
                        // Fell behind: whatever was missed may be it.
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(wait, heard).await;
        })
    }
}

/// The writer task's state.
struct Writer {
    pool: Pool,
    retention: Retention,
    queued: Arc<AtomicUsize>,
    wake: Arc<Notify>,
    holds: Arc<Holds>,
    reachable: Arc<AtomicBool>,
}

/// Whether a failure is the database's absence or a conflict it undid
/// (worth trying again) rather than its refusal of what was asked.
fn transient(e: &StoreError) -> bool {
    matches!(e, StoreError::Unreachable(_) | StoreError::Conflict(_))
}

impl Writer {
    async fn run(self, mut writes: mpsc::UnboundedReceiver<Write>) {
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(first) = writes.recv().await {
            if !matches!(first, Write::Flush(_)) {
                // Gathers the writes of the next moments (a flush wakes it).
                tokio::select! {
                    () = tokio::time::sleep(LINGER) => {}
                    () = self.wake.notified() => {}
                }
            }
            batch.push(first);
            while batch.len() < BATCH {
                match writes.try_recv() {
                    Ok(write) => batch.push(write),
                    Err(_) => break,
                }
            }
            let appended: usize = batch.iter().map(Write::appended).sum();
            let result = self.apply_until_reachable(&batch).await;
            if let Err(e) = &result {
                tracing::error!("the store could not commit {} writes: {e}", batch.len());
            }
            self.queued.fetch_sub(appended, Ordering::Relaxed);
            write::answer_all(std::mem::take(&mut batch), result);
        }
    }

    /// Applies a batch, again and again while the database is unreachable,
    /// for up to [`OUTAGE`].
    async fn apply_until_reachable(&self, batch: &[Write]) -> Result<Vec<Answer>, StoreError> {
        let mut waited = Duration::ZERO;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.apply(batch).await {
                Err(e) if transient(&e) && waited < OUTAGE => {
                    self.reachable.store(false, Ordering::Relaxed);
                    if waited.is_zero() {
                        tracing::warn!("the store is unreachable, its writes wait: {e}");
                    }
                    tokio::time::sleep(backoff).await;
                    waited += backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                result => {
                    if result.is_ok() {
                        self.reachable.store(true, Ordering::Relaxed);
                        if !waited.is_zero() {
                            tracing::info!("the store is back after {waited:?}");
                        }
                    }
                    return result;
                }
            }
        }
    }

    /// Applies a batch in one transaction; what each write found.
    async fn apply(&self, batch: &[Write]) -> Result<Vec<Answer>, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let lost = self.fence(&tx, batch).await?;
        let mut segments = Segments::default();
        let folds = Folds::of(batch);
        let step = Step {
            retention: &self.retention,
            holds: &self.holds,
            lost: &lost,
        };
        let mut answers = Vec::with_capacity(batch.len());
        for (at, write) in batch.iter().enumerate() {
            let answer = match write {
                _ if folds.folded(at) => Answer::Done,
                Write::Append(id, ..) | Write::Update(id, ..) if lost.contains(id) => Answer::Done,
                write => {
                    let updates = folds.updates(batch, at);
                    apply_one(&tx, &step, &mut segments, write, &updates).await?
                }
            };
            answers.push(answer);
        }
        write_segments(&tx, segments.drain()).await?;
        let mut changed: Vec<&str> = batch.iter().filter_map(Write::changes).collect();
        changed.sort_unstable();
        changed.dedup();
        if !changed.is_empty() {
            tx.execute(
                &format!("SELECT pg_notify('{CHANNEL}', id) FROM unnest($1::text[]) AS id"),
                &[&changed],
            )
            .await?;
        }
        tx.commit().await?;
        self.settle_holds(batch, &answers, lost);
        Ok(answers)
    }

    /// Locks the rows of the held generations a batch writes to, in id
    /// order, for the rest of its transaction; those whose epoch moved on
    /// (another replica claimed them) or that ended at another replica's
    /// hands (a cancel) are lost: the batch's writes to them are dropped.
    async fn fence(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        batch: &[Write],
    ) -> Result<HashSet<String>, StoreError> {
        let held: HashMap<&str, i64> = {
            let epochs = self.holds.epochs();
            batch
                .iter()
                .filter_map(|w| match w {
                    Write::Append(id, ..) | Write::Update(id, ..) => {
                        epochs.get(id).map(|e| (id.as_str(), *e))
                    }
                    _ => None,
                })
                .collect()
        };
        if held.is_empty() {
            return Ok(HashSet::new());
        }
        let (ids, epochs): (Vec<&str>, Vec<i64>) = held.iter().map(|(i, e)| (*i, *e)).unzip();
        let ours = tx
            .query(
                &format!(
                    "SELECT r.id FROM responses r JOIN unnest($1::text[], $2::bigint[]) AS \
                     h(id, epoch) ON r.id = h.id WHERE r.epoch = h.epoch AND r.{UNFINISHED} \
                     ORDER BY r.id FOR UPDATE OF r"
                ),
                &[&ids, &epochs],
            )
            .await?;
        let ours: HashSet<&str> = ours
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
        Ok(ids
            .into_iter()
            .filter(|id| !ours.contains(id))
            .map(str::to_string)
            .collect())
    }

    /// After a commit: holds taken by inserts, given up by ends and
    /// deletes, and lost (each told to its waiter).
    fn settle_holds(&self, batch: &[Write], answers: &[Answer], lost: HashSet<String>) {
        let mut epochs = self.holds.epochs();
        for (write, answer) in batch.iter().zip(answers) {
            match (write, answer) {
                (Write::Insert(r, _), Answer::Inserted(Inserted::New)) if !r.status.is_final() => {
                    epochs.insert(r.id.clone(), 1);
                }
                (Write::Update(id, status, ..), _) if status.is_final() => {
                    epochs.remove(id);
                }
                (Write::Delete(id, _), _) => {
                    epochs.remove(id);
                }
                _ => {}
            }
        }
        for id in lost {
            epochs.remove(&id);
            tracing::warn!(
                id,
                "another replica holds this generation now: this one stops"
            );
            let _ = self.holds.lost.send(Arc::from(id));
        }
    }
}

async fn write_segments(
    tx: &deadpool_postgres::Transaction<'_>,
    rows: impl IntoIterator<Item = Row>,
) -> Result<(), tokio_postgres::Error> {
    let insert = tx
        .prepare_cached(
            "INSERT INTO segments (response_id, seq, lens, data, codec) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .await?;
    for row in rows {
        tx.execute(
            &insert,
            &[
                &row.id,
                &sql_seq(row.first),
                &row.lens,
                &row.data,
                &row.codec,
            ],
        )
        .await?;
    }
    Ok(())
}

/// What applying a batch's writes one by one needs beside them.
struct Step<'a> {
    retention: &'a Retention,
    holds: &'a Holds,
    /// The held generations the batch may no longer write to.
    lost: &'a HashSet<String>,
}

async fn update(
    tx: &deadpool_postgres::Transaction<'_>,
    (id, status, object): Update<'_>,
) -> Result<(), tokio_postgres::Error> {
    let update = tx
        .prepare_cached("UPDATE responses SET status = $2, object = $3 WHERE id = $1")
        .await?;
    tx.execute(
        &update,
        &[&id, &status.as_str(), &object.map(Bytes::as_ref)],
    )
    .await?;
    Ok(())
}

/// Applies one write inside the batch's transaction; what it found. An
/// insert writes its record with the last of `updates` (the batch's later
/// updates folded into it: see [`Folds`]).
async fn apply_one(
    tx: &deadpool_postgres::Transaction<'_>,
    step: &Step<'_>,
    segments: &mut Segments,
    write: &Write,
    updates: &[Update<'_>],
) -> Result<Answer, tokio_postgres::Error> {
    let Step {
        retention,
        holds,
        lost,
    } = step;
    Ok(match write {
        Write::Insert(r, _) => {
            let (status, object) = write::last_state(r, updates);
            let insert = tx
                .prepare_cached(&format!(
                    "INSERT INTO responses (id, kind, status, background, stored, key, request, \
                     object, created_at, expires_at, owner, holder, epoch, lease_until) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 1, {NOW_MS} + $13) \
                     ON CONFLICT DO NOTHING"
                ))
                .await?;
            let added = tx
                .execute(
                    &insert,
                    &[
                        &r.id,
                        &r.kind.as_str(),
                        &status.as_str(),
                        &r.background,
                        &r.stored,
                        &r.key,
                        &r.request.as_ref(),
                        &object.map(Bytes::as_ref),
                        &(r.created_at as i64),
                        &(r.expires_at as i64),
                        &r.owner,
                        &holds.holder,
                        &holds.lease_ms(),
                    ],
                )
                .await?;
            let inserted = if added == 1 {
                Inserted::New
            } else {
                let existing = match &r.key {
                    Some(key) => get(tx, "key", key).await?,
                    None => None,
                };
                let existing = match existing {
                    Some(existing) => Some(existing),
                    None => get(tx, "id", &r.id).await?,
                };
                let inserted = match existing {
                    Some(existing) => Inserted::Exists(Box::new(existing)),
                    None => Inserted::New,
                };
                // The record was there already: its updates apply to it
                // as they would have unfolded.
                for &folded in updates.iter().filter(|u| !lost.contains(u.0)) {
                    update(tx, folded).await?;
                }
                inserted
            };
            Answer::Inserted(inserted)
        }
        Write::Update(id, status, object, _) => {
            update(tx, (id, *status, object.as_ref())).await?;
            Answer::Done
        }
        Write::Append(id, first, events) => {
            if let Some(row) = segments.append(id, *first, events) {
                write_segments(tx, [row]).await?;
            }
            Answer::Done
        }
        Write::Delete(id, _) => {
            // Whatever was appended before goes with it.
            write_segments(tx, segments.drain()).await?;
            tx.execute("DELETE FROM segments WHERE response_id = $1", &[id])
                .await?;
            let gone = tx
                .execute("DELETE FROM responses WHERE id = $1", &[id])
                .await?
                > 0;
            Answer::Deleted(gone)
        }
        Write::Sweep(now, _) => {
            write_segments(tx, segments.drain()).await?;
            Answer::Swept(sweep(tx, retention, *now).await?)
        }
        Write::Flush(_) => Answer::Done,
    })
}

/// Deletes expired final records, then the oldest final ones while the
/// store holds more than its budget; how many went.
async fn sweep(
    tx: &deadpool_postgres::Transaction<'_>,
    retention: &Retention,
    now: u64,
) -> Result<u64, tokio_postgres::Error> {
    let expired = tx
        .query(
            &format!("DELETE FROM responses WHERE expires_at <= $1 AND {FINAL} RETURNING id"),
            &[&(now as i64)],
        )
        .await?;
    let mut ids: Vec<String> = expired
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    tx.execute("DELETE FROM segments WHERE response_id = ANY($1)", &[&ids])
        .await?;
    let mut over = size(tx).await?.saturating_sub(retention.max_bytes);
    while over > 0 {
        // The oldest final records, each with the bytes it holds.
        let oldest = tx
            .query(
                &format!(
                    "SELECT id, octet_length(request) + COALESCE(octet_length(object), 0) + \
                     COALESCE((SELECT SUM(octet_length(data) + octet_length(lens)) FROM segments \
                     WHERE response_id = responses.id), 0)::BIGINT FROM responses WHERE {FINAL} \
                     ORDER BY created_at, id LIMIT $1"
                ),
                &[&SHED],
            )
            .await?;
        if oldest.is_empty() {
            break; // only unfinished generations left: they stay
        }
        let mut shed = Vec::new();
        for row in &oldest {
            if over == 0 {
                break;
            }
            shed.push(row.try_get::<_, String>(0)?);
            over = over.saturating_sub(row.try_get::<_, i64>(1)?.max(0) as u64);
        }
        tx.execute("DELETE FROM responses WHERE id = ANY($1)", &[&shed])
            .await?;
        tx.execute("DELETE FROM segments WHERE response_id = ANY($1)", &[&shed])
            .await?;
        ids.extend(shed);
    }
    Ok(ids.len() as u64)
}
