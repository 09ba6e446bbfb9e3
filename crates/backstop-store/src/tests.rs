#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! The conformance suite every store passes (`conformance!` runs each test
//! against SQLite and against PostgreSQL), then the embedded store's own.

use bytes::Bytes;

use crate::{
    Budget, Inserted, Kind, Postgres, Record, Retention, Shared, Sqlite, Status, Store,
    Verification,
};

/// Where a test's store lives: opening it again reads what an earlier
/// opening wrote.
enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl Backend {
    fn sqlite() -> Self {
        Backend::Sqlite(tempfile::tempdir().unwrap())
    }

    /// A database of its own on the test server.
    async fn postgres() -> Self {
        Backend::Postgres(backstop_testkit::postgres::database().await.unwrap())
    }

    async fn open(&self, retention: Retention) -> Box<dyn Store> {
        self.open_with(retention, None).await
    }

    async fn open_with(
        &self,
        retention: Retention,
        max_unwritten: Option<usize>,
    ) -> Box<dyn Store> {
        match self {
            Backend::Sqlite(dir) => {
                let store = Sqlite::open(dir.path(), retention).unwrap();
                Box::new(match max_unwritten {
                    Some(bytes) => store.max_unwritten(bytes),
                    None => store,
                })
            }
            Backend::Postgres(url) => {
                let store = Postgres::connect(url, retention, LEASE).await.unwrap();
                Box::new(match max_unwritten {
                    Some(bytes) => store.max_unwritten(bytes),
                    None => store,
                })
            }
        }
    }
}

/// The leases PostgreSQL stores hold generations by in these tests: short,
/// so that a store opened again (a new replica) claims what an earlier one
/// left soon.
const LEASE: std::time::Duration = std::time::Duration::from_millis(500);

/// Claims until something is claimed (a lease may have to run out first).
async fn claim_some(store: &dyn Store) -> Vec<Record> {
    for _ in 0..200 {
        let claimed = store.claim().await.unwrap();
        if !claimed.is_empty() {
            return claimed;
        }
        tokio::time::sleep(LEASE / 5).await;
    }
    panic!("nothing was ever claimed");
}

/// Runs each named test against each store.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::Backend::sqlite()).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::Backend::postgres().await).await
                }
            )*
        }
    };
}

conformance!(
    records_and_their_events_survive_a_reopen,
    one_generation_per_idempotency_key,
    the_sweeper_deletes_expired_final_records,
    the_sweeper_keeps_to_the_size_budget,
    deleting_removes_the_record_and_its_log,
    a_log_read_from_any_event_whatever_rows_its_batches_made,
    segments_are_compressed,
    an_append_says_when_the_writer_has_fallen_behind,
    a_record_inserted_and_updated_in_one_batch_ends_as_updated,
);

fn record(id: &str, key: Option<&str>, created_at: u64) -> Record {
    Record {
        id: id.into(),
        kind: Kind::Response,
        status: Status::Queued,
        background: true,
        stored: true,
        key: key.map(Into::into),
        request: Bytes::from_static(br#"{"model":"m","input":"hi"}"#),
        object: None,
        created_at,
        expires_at: created_at + 100,
        owner: None,
    }
}

/// Writes queued back to back share a batch (the writer gathers for a
/// moment after the first), where each store folds a record's updates into its insert:
/// the outcome is the same as one write after the other.
async fn a_record_inserted_and_updated_in_one_batch_ends_as_updated(backend: Backend) {
    let store = backend.open(Retention::default()).await;
    let object = |n: u8| Some(Bytes::from(format!(r#"{{"n":{n}}}"#)));
    let (inserted, started, ended) = tokio::join!(
        store.insert(record("a", Some("k"), 1)),
        store.update("a", Status::InProgress, object(1)),
        store.update("a", Status::Completed, object(2)),
    );
    assert!(matches!(inserted.unwrap(), Inserted::New));
    started.unwrap();
    ended.unwrap();
    let kept = store.get("a").await.unwrap().unwrap();
    assert_eq!((kept.status, kept.object), (Status::Completed, object(2)));
    assert_eq!(kept.key.as_deref(), Some("k"));

    // The same record again, updated in the same batch: the insert finds
    // the first, and the update is applied to it.
    let (again, failed) = tokio::join!(
        store.insert(record("a", Some("k"), 1)),
        store.update("a", Status::Failed, None),
    );
    match again.unwrap() {
        Inserted::Exists(existing) => assert_eq!(existing.status, Status::Completed),
        Inserted::New => panic!("a second record for the same id"),
    }
    failed.unwrap();
    let kept = store.get("a").await.unwrap().unwrap();
    assert_eq!((kept.status, kept.object), (Status::Failed, None));

    // Another id under the same key: not inserted, and its update finds
    // nothing to change.
    let (other, update) = tokio::join!(
        store.insert(record("b", Some("k"), 1)),
        store.update("b", Status::Completed, object(3)),
    );
    assert!(matches!(other.unwrap(), Inserted::Exists(e) if e.id == "a"));
    update.unwrap();
    assert!(store.get("b").await.unwrap().is_none());
    assert_eq!(
        store.get("a").await.unwrap().unwrap().status,
        Status::Failed
    );
}

async fn records_and_their_events_survive_a_reopen(backend: Backend) {
    {
        let store = backend.open(Retention::default()).await;
        let owned = Record {
            owner: Some("billing".into()),
            ..record("r1", None, 1)
        };
        assert_eq!(store.insert(owned).await.unwrap(), Inserted::New);
        store
            .update("r1", Status::InProgress, Some(Bytes::from_static(b"{}")))
            .await
            .unwrap();
        for seq in 0..5 {
            store.append("r1", seq, vec![Bytes::from(format!("event {seq}"))]);
        }
        store.flush().await.unwrap();
        let after = store.events("r1", Some(2)).await.unwrap();
        let seqs: Vec<u64> = after.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, [3, 4]);
        assert_eq!(after[0].1, Bytes::from("event 3"));
    }
    let store = backend.open(Retention::default()).await;
    let r = store.get("r1").await.unwrap().unwrap();
    assert_eq!(
        r,
        Record {
            status: Status::InProgress,
            object: Some(Bytes::from_static(b"{}")),
            owner: Some("billing".into()),
            ..record("r1", None, 1)
        }
    );
    assert_eq!(store.events("r1", None).await.unwrap().len(), 5);
    // What the last run left unfinished is this one's to finish, once.
    let claimed = claim_some(&*store).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, "r1");
    assert!(store.claim().await.unwrap().is_empty());
    assert!(store.get("nope").await.unwrap().is_none());
}

async fn one_generation_per_idempotency_key(backend: Backend) {
    let store = backend.open(Retention::default()).await;
    assert_eq!(
        store.insert(record("a", Some("k"), 1)).await.unwrap(),
        Inserted::New
    );
    match store.insert(record("b", Some("k"), 2)).await.unwrap() {
        Inserted::Exists(r) => assert_eq!(r.id, "a"),
        other => panic!("{other:?}"),
    }
    // The same id again (a retried insert) finds itself.
    match store.insert(record("a", None, 3)).await.unwrap() {
        Inserted::Exists(r) => assert_eq!(r.key.as_deref(), Some("k")),
        other => panic!("{other:?}"),
    }
    assert_eq!(store.by_key("k").await.unwrap().unwrap().id, "a");
    assert!(store.by_key("other").await.unwrap().is_none());
    assert!(store.get("b").await.unwrap().is_none());
}

async fn the_sweeper_deletes_expired_final_records(backend: Backend) {
    let store = backend.open(Retention::default()).await;
    store.insert(record("done", None, 1)).await.unwrap();
    store.update("done", Status::Completed, None).await.unwrap();
    store.insert(record("running", None, 1)).await.unwrap();
    store
        .update("running", Status::InProgress, None)
        .await
        .unwrap();
    store.append("done", 0, vec![Bytes::from_static(b"e")]);
    store.append("running", 0, vec![Bytes::from_static(b"e")]);
    // Not yet expired: nothing goes.
    assert_eq!(store.sweep(50).await.unwrap(), 0);
    // Expired: the finished one goes with its events; the running one stays.
    assert_eq!(store.sweep(1000).await.unwrap(), 1);
    assert!(store.get("done").await.unwrap().is_none());
    assert!(store.events("done", None).await.unwrap().is_empty());
    assert!(store.get("running").await.unwrap().is_some());
    assert_eq!(store.events("running", None).await.unwrap().len(), 1);
}

async fn the_sweeper_keeps_to_the_size_budget(backend: Backend) {
    let budget = Retention {
        max_bytes: 512 << 10,
        ..Retention::default()
    };
    let store = backend.open(budget).await;
    // Bytes that do not compress: the budget counts what is kept.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let big: Bytes = (0..8 << 10)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    for i in 0..100u64 {
        store
            .insert(record(&format!("r{i}"), None, i))
            .await
            .unwrap();
        store
            .update(&format!("r{i}"), Status::Completed, None)
            .await
            .unwrap();
        store.append(&format!("r{i}"), 0, vec![big.clone()]);
    }
    // One still running, the oldest of all: it stays whatever its size.
    store.insert(record("running", None, 0)).await.unwrap();
    store.append("running", 0, vec![big.clone()]);
    store.flush().await.unwrap();
    assert!(store.size().await.unwrap() > 512 << 10);
    let gone = store.sweep(0).await.unwrap();
    assert!(gone > 0);
    assert!(gone < 100, "{gone} went");
    assert!(store.size().await.unwrap() <= 512 << 10);
    // The oldest went first.
    assert!(store.get("r0").await.unwrap().is_none());
    assert!(store.get("r99").await.unwrap().is_some());
    assert!(store.get("running").await.unwrap().is_some());
}

async fn deleting_removes_the_record_and_its_log(backend: Backend) {
    let store = backend.open(Retention::default()).await;
    store.insert(record("r", None, 1)).await.unwrap();
    store.append("r", 0, vec![Bytes::from_static(b"e")]);
    assert!(store.delete("r").await.unwrap());
    assert!(!store.delete("r").await.unwrap());
    assert!(store.get("r").await.unwrap().is_none());
    assert!(store.events("r", None).await.unwrap().is_empty());
}

async fn a_log_read_from_any_event_whatever_rows_its_batches_made(backend: Backend) {
    let store = backend.open(Retention::default()).await;
    // Two generations' events interleaved, committed in three batches; one
    // event appended twice (a retry, in a frame with the next two), and an
    // empty event.
    for seq in 0..4 {
        store.append("a", seq, vec![Bytes::from(format!("a{seq}"))]);
        store.append("b", seq, vec![Bytes::from(format!("b{seq}"))]);
    }
    store.flush().await.unwrap();
    // A frame of three events at once, the first already kept.
    let frame = [&b"a3"[..], b"", b"a5"].map(Bytes::from_static).to_vec();
    store.append("a", 3, frame);
    store.flush().await.unwrap();
    store.append("a", 6, vec![Bytes::from_static(b"a6")]);
    store.flush().await.unwrap();
    let texts = |events: Vec<(u64, Bytes)>| -> Vec<(u64, String)> {
        events
            .into_iter()
            .map(|(s, e)| (s, String::from_utf8(e.to_vec()).unwrap()))
            .collect()
    };
    let all = texts(store.events("a", None).await.unwrap());
    let want: Vec<(u64, String)> = [
        (0, "a0"),
        (1, "a1"),
        (2, "a2"),
        (3, "a3"),
        (4, ""),
        (5, "a5"),
        (6, "a6"),
    ]
    .into_iter()
    .map(|(s, e)| (s, e.to_string()))
    .collect();
    assert_eq!(all, want);
    for after in 0..7u64 {
        let got = texts(store.events("a", Some(after)).await.unwrap());
        assert_eq!(got, want[after as usize + 1..], "after {after}");
    }
    assert_eq!(store.events("b", Some(1)).await.unwrap().len(), 2);
    assert!(store.events("b", Some(3)).await.unwrap().is_empty());
}

/// A stream's events: the same fields again and again, as JSON events are.
fn delta(seq: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"type":"response.output_text.delta","item_id":"msg_1","output_index":0,"content_index":0,"delta":"word{seq} ","sequence_number":{seq}}}"#
    ))
}

async fn segments_are_compressed(backend: Backend) {
    let store = backend.open(Retention::default()).await;
    let want: Vec<(u64, Bytes)> = (0..40).map(|seq| (seq, delta(seq))).collect();
    for (seq, event) in &want {
        store.append("r", *seq, vec![event.clone()]);
    }
    // Too short to gain from compressing: kept as it is.
    store.append("short", 0, vec![Bytes::from_static(b"tiny")]);
    store.flush().await.unwrap();
    assert_eq!(store.events("r", None).await.unwrap(), want);
    assert_eq!(store.events("r", Some(20)).await.unwrap(), want[21..]);
    assert_eq!(
        store.events("short", None).await.unwrap(),
        [(0, Bytes::from_static(b"tiny"))]
    );
    let plain: u64 = want.iter().map(|(_, e)| e.len() as u64).sum();
    if let Backend::Postgres(_) = backend {
        // What PostgreSQL's store counts is what it keeps.
        assert!(store.size().await.unwrap() * 3 < plain);
    }
}

async fn an_append_says_when_the_writer_has_fallen_behind(backend: Backend) {
    let store = backend.open_with(Retention::default(), Some(1 << 20)).await;
    assert!(!store.append("r", 0, vec![Bytes::from_static(b"e")]));
    // More than the bound, appended at once.
    let big = Bytes::from(vec![b'x'; 64 << 10]);
    let behind = (1..=256).find(|&seq| store.append("r", seq, vec![big.clone()]));
    assert!(behind.is_some(), "never behind");
    store.flush().await.unwrap();
    let next = behind.unwrap() + 1;
    assert!(!store.append("r", next, vec![Bytes::from_static(b"e")]));
    store.flush().await.unwrap();
    assert_eq!(
        store.events("r", None).await.unwrap().len() as u64,
        next + 1
    );
}

#[tokio::test]
async fn replicas_starting_together_migrate_the_schema_once() {
    let Backend::Postgres(url) = Backend::postgres().await else {
        unreachable!()
    };
    let (a, b, c) = tokio::join!(
        Postgres::connect(&url, Retention::default(), LEASE),
        Postgres::connect(&url, Retention::default(), LEASE),
        Postgres::connect(&url, Retention::default(), LEASE),
    );
    let (a, b, _) = (a.unwrap(), b.unwrap(), c.unwrap());
    // What one writes the others read.
    a.insert(record("r", None, 1)).await.unwrap();
    a.append("r", 0, vec![Bytes::from_static(b"e")]);
    a.flush().await.unwrap();
    assert!(b.get("r").await.unwrap().is_some());
    assert_eq!(b.events("r", None).await.unwrap().len(), 1);
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let versions = client
        .query_one("SELECT count(*) FROM backstop_schema", &[])
        .await
        .unwrap();
    assert_eq!(
        versions.get::<_, i64>(0),
        crate::postgres::MIGRATIONS.len() as i64
    );
}

#[tokio::test]
async fn a_database_of_the_first_version_is_read_on() {
    let dir = tempfile::tempdir().unwrap();
    {
        let old = rusqlite::Connection::open(dir.path().join("backstop.db")).unwrap();
        old.execute_batch(
            "CREATE TABLE responses (id TEXT PRIMARY KEY, kind TEXT NOT NULL, \
             status TEXT NOT NULL, background INTEGER NOT NULL, stored INTEGER NOT NULL, \
             key TEXT UNIQUE, request BLOB NOT NULL, object BLOB, created_at INTEGER NOT NULL, \
             expires_at INTEGER NOT NULL);
             CREATE TABLE events (response_id TEXT NOT NULL, seq INTEGER NOT NULL, \
             data BLOB NOT NULL, PRIMARY KEY (response_id, seq)) WITHOUT ROWID;
             INSERT INTO responses VALUES ('r', 'response', 'in_progress', 1, 1, NULL, \
             X'7B7D', NULL, 1, 2);
             INSERT INTO events VALUES ('r', 0, X'6530'), ('r', 1, X'6531');",
        )
        .unwrap();
    }
    let store = Sqlite::open(dir.path(), Retention::default()).unwrap();
    store.append("r", 2, vec![Bytes::from_static(b"e2")]);
    store.flush().await.unwrap();
    let events = store.events("r", Some(0)).await.unwrap();
    assert_eq!(
        events,
        [
            (1, Bytes::from_static(b"e1")),
            (2, Bytes::from_static(b"e2"))
        ]
    );
    assert_eq!(store.claim().await.unwrap().len(), 1);
}

#[tokio::test]
async fn sqlite_segments_are_lz4_and_those_of_the_second_version_read_on() {
    let dir = tempfile::tempdir().unwrap();
    {
        // The second version: segments without a codec, kept as they are.
        let old = rusqlite::Connection::open(dir.path().join("backstop.db")).unwrap();
        old.execute_batch(
            "CREATE TABLE segments (response_id TEXT NOT NULL, seq INTEGER NOT NULL, \
             lens TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (response_id, seq));
             INSERT INTO segments VALUES ('r', 0, '2 2', X'65306531');",
        )
        .unwrap();
    }
    let store = Sqlite::open(dir.path(), Retention::default()).unwrap();
    let mut want = vec![
        (0, Bytes::from_static(b"e0")),
        (1, Bytes::from_static(b"e1")),
    ];
    for seq in 2..40 {
        store.append("r", seq, vec![delta(seq)]);
        want.push((seq, delta(seq)));
    }
    store.append("short", 0, vec![Bytes::from_static(b"tiny")]);
    store.flush().await.unwrap();
    assert_eq!(store.events("r", None).await.unwrap(), want);

    let raw = rusqlite::Connection::open(dir.path().join("backstop.db")).unwrap();
    let (codec, stored): (i16, usize) = raw
        .query_row(
            "SELECT codec, length(data) FROM segments WHERE response_id = 'r' AND seq = 2",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    let plain: usize = want[2..].iter().map(|(_, e)| e.len()).sum();
    assert_eq!(codec, crate::segment::LZ4);
    assert!(stored * 3 < plain, "{stored} bytes stored for {plain}");
    let codecs: Vec<i16> = raw
        .prepare("SELECT codec FROM segments WHERE response_id IN ('r', 'short') ORDER BY response_id, seq")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(codecs, [0, 1, 0]);
}

#[tokio::test]
async fn postgres_writes_wait_while_the_database_is_away_and_land_when_it_is_back() {
    let Backend::Postgres(url) = Backend::postgres().await else {
        unreachable!()
    };
    let relay = backstop_testkit::postgres::Relay::to(&url).await.unwrap();
    let store = Postgres::connect(&relay.url, Retention::default(), LEASE)
        .await
        .unwrap();
    store.insert(record("r", None, 1)).await.unwrap();
    relay.cut();
    for seq in 0..10 {
        store.append("r", seq, vec![delta(seq)]);
    }
    let update = store.update("r", Status::Completed, None);
    let mut flush = std::pin::pin!(store.flush());
    // Away: the writes wait rather than fail.
    let waited = tokio::time::timeout(std::time::Duration::from_millis(500), &mut flush).await;
    assert!(
        waited.is_err(),
        "a flush finished while the database was away"
    );
    relay.restore();
    tokio::time::timeout(std::time::Duration::from_secs(20), flush)
        .await
        .expect("the writes never landed")
        .unwrap();
    update.await.unwrap();
    assert_eq!(
        store.events("r", None).await.unwrap(),
        (0..10).map(|seq| (seq, delta(seq))).collect::<Vec<_>>()
    );
    assert_eq!(
        store.get("r").await.unwrap().unwrap().status,
        Status::Completed
    );
}

#[tokio::test]
async fn postgres_replicas_hear_of_each_others_changes_as_they_commit() {
    let Backend::Postgres(url) = Backend::postgres().await else {
        unreachable!()
    };
    let a = Postgres::connect(&url, Retention::default(), LEASE)
        .await
        .unwrap();
    let b = Postgres::connect(&url, Retention::default(), LEASE)
        .await
        .unwrap();
    let long = std::time::Duration::from_secs(60);
    let bound = std::time::Duration::from_secs(20);
    a.insert(record("r", None, 1)).await.unwrap();
    // Watches started before the change: one for it, one for another id.
    let heard = b.changed("r", long);
    let mut other = std::pin::pin!(b.changed("other", long));
    a.append("r", 0, vec![delta(0)]);
    a.flush().await.unwrap();
    tokio::time::timeout(bound, heard)
        .await
        .expect("an append was not heard");
    assert_eq!(b.events("r", None).await.unwrap().len(), 1);
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(300), &mut other).await;
    assert!(quiet.is_err(), "a change to r woke a watch of another id");
    // A status is heard too.
    let heard = b.changed("r", long);
    a.update("r", Status::Completed, None).await.unwrap();
    tokio::time::timeout(bound, heard)
        .await
        .expect("an update was not heard");
    assert_eq!(b.get("r").await.unwrap().unwrap().status, Status::Completed);
}

#[tokio::test]
async fn postgres_a_gone_replicas_generation_goes_to_one_claimer_only() {
    let Backend::Postgres(url) = Backend::postgres().await else {
        unreachable!()
    };
    {
        let gone = Postgres::connect(&url, Retention::default(), LEASE)
            .await
            .unwrap();
        gone.insert(record("r", None, 1)).await.unwrap();
        gone.append("r", 0, vec![delta(0)]);
        gone.flush().await.unwrap();
        // Running elsewhere, held: nobody else may claim it.
        let other = Postgres::connect(&url, Retention::default(), LEASE)
            .await
            .unwrap();
        assert!(other.claim().await.unwrap().is_empty());
    } // gone: its leases are no longer renewed
    let claimers = futures_util::future::join_all((0..3).map(|_| async {
        let store = Postgres::connect(&url, Retention::default(), LEASE)
            .await
            .unwrap();
        // Each tries for four leases' time, together.
        let mut claimed = Vec::new();
        for _ in 0..20 {
            claimed.extend(store.claim().await.unwrap());
            tokio::time::sleep(LEASE / 5).await;
        }
        (store, claimed)
    }))
    .await;
    let claimed: Vec<&Record> = claimers.iter().flat_map(|(_, c)| c).collect();
    assert_eq!(claimed.len(), 1, "claimed by {claimed:?}");
    assert_eq!(claimed[0].id, "r");
}

#[tokio::test]
async fn postgres_a_replica_that_lost_its_lease_cannot_write_over_its_successor() {
    let Backend::Postgres(url) = Backend::postgres().await else {
        unreachable!()
    };
    let relay = backstop_testkit::postgres::Relay::to(&url).await.unwrap();
    let old = Postgres::connect(&relay.url, Retention::default(), LEASE)
        .await
        .unwrap();
    old.insert(record("r", None, 1)).await.unwrap();
    for seq in 0..3 {
        old.append("r", seq, vec![delta(seq)]);
    }
    old.flush().await.unwrap();
    let released = old.released("r");
    // Cut off from the database, the old holder's lease runs out, and a
    // successor claims the generation and goes on with it.
    relay.cut();
    let new = Postgres::connect(&url, Retention::default(), LEASE)
        .await
        .unwrap();
    let claimed = claim_some(&new).await;
    assert_eq!(claimed[0].id, "r");
    let theirs = |seq: u64| Bytes::from(format!("successor {seq}"));
    for seq in 3..5 {
        new.append("r", seq, vec![theirs(seq)]);
    }
    new.flush().await.unwrap();
    // The old holder comes back and writes on: fenced out, and told so.
    relay.restore();
    for seq in 3..6 {
        old.append("r", seq, vec![delta(seq)]);
    }
    let ended = old.update("r", Status::Completed, None);
    tokio::time::timeout(std::time::Duration::from_secs(20), old.flush())
        .await
        .unwrap()
        .unwrap();
    ended.await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(20), released)
        .await
        .expect("the old holder was never told it lost the generation");
    let log = new.events("r", None).await.unwrap();
    let want: Vec<(u64, Bytes)> = (0..3)
        .map(|seq| (seq, delta(seq)))
        .chain((3..5).map(|seq| (seq, theirs(seq))))
        .collect();
    assert_eq!(log, want);
    assert_eq!(
        new.get("r").await.unwrap().unwrap().status,
        Status::Queued,
        "the old holder's end was dropped"
    );
    // Another replica's cancel ends the successor's hold too.
    let released = new.released("r");
    old.update("r", Status::Cancelled, None).await.unwrap();
    new.append("r", 5, vec![theirs(5)]);
    new.flush().await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(20), released)
        .await
        .expect("a cancel elsewhere did not release the generation");
    assert_eq!(new.events("r", None).await.unwrap().len(), 5);
}

#[tokio::test]
async fn postgres_replicas_share_one_budget_and_sqlite_shares_none() {
    let sqlite = Backend::sqlite().open(Retention::default()).await;
    assert_eq!(sqlite.share_budgets(Vec::new()).await.unwrap(), None);

    let Backend::Postgres(url) = Backend::postgres().await else {
        unreachable!()
    };
    let a = Postgres::connect(&url, Retention::default(), LEASE)
        .await
        .unwrap();
    let b = Postgres::connect(&url, Retention::default(), LEASE)
        .await
        .unwrap();
    let report = |spent: f64, remaining: Option<f64>, held_ms: u64| Budget {
        name: "up#0".into(),
        per_minute: [Some(60.0), None],
        spent: [spent, 0.0],
        remaining: [remaining, None],
        held_ms,
    };
    let level = |shared: &[Shared]| shared[0].level[0].unwrap();
    let first = a
        .share_budgets(vec![report(10.0, None, 0)])
        .await
        .unwrap()
        .unwrap();
    // A full minute's worth, less what A spent (and a moment's refill).
    assert!((50.0..51.0).contains(&level(&first)), "{first:?}");
    assert_eq!(first[0].replicas, 1);
    let second = b
        .share_budgets(vec![report(5.0, None, 0)])
        .await
        .unwrap()
        .unwrap();
    assert!((45.0..46.0).contains(&level(&second)), "{second:?}");
    assert_eq!(second[0].replicas, 2);
    // The upstream's own count rules, and a hold reaches every replica.
    let said = b
        .share_budgets(vec![report(0.0, Some(20.0), 5_000)])
        .await
        .unwrap()
        .unwrap();
    assert!(level(&said) <= 20.0, "{said:?}");
    let seen = a
        .share_budgets(vec![report(0.0, None, 0)])
        .await
        .unwrap()
        .unwrap();
    assert!(seen[0].held_ms > 4_000, "{seen:?}");
    assert!(level(&seen) <= 21.0, "{seen:?}");
}

#[tokio::test]
async fn postgres_one_replica_verifies_a_target_for_the_fleet_and_the_others_follow() {
    let sqlite = Backend::sqlite().open(Retention::default()).await;
    assert_eq!(sqlite.verifiers(Vec::new()).await.unwrap(), None);
    assert!(!sqlite.shared());

    let Backend::Postgres(url) = Backend::postgres().await else {
        unreachable!()
    };
    let a = Postgres::connect(&url, Retention::default(), LEASE)
        .await
        .unwrap();
    let b = Postgres::connect(&url, Retention::default(), LEASE)
        .await
        .unwrap();
    assert!(a.shared());
    async fn ask(store: &Postgres, verifying: bool, publish: Option<f64>) -> crate::Verifier {
        let report = vec![Verification {
            target: "up".into(),
            open: verifying,
            verifying,
            publish,
        }];
        store.verifiers(report).await.unwrap().unwrap().remove(0)
    }
    // Both verifying: the first to ask verifies for the fleet.
    let first = ask(&a, true, None).await;
    assert!(first.leads);
    let second = ask(&b, true, None).await;
    assert!(!second.leads);
    assert_eq!(second.open_replicas, 2);
    // What the verifier reached, the other hears, once each time.
    assert!(ask(&a, true, Some(0.5)).await.leads);
    let heard = ask(&b, true, None).await;
    assert_eq!((heard.fraction, heard.seq), (0.5, 1));
    // Serving again, the verifier tells its last step and gives way.
    let done = ask(&a, false, Some(1.0)).await;
    assert!(!done.leads);
    assert_eq!(done.open_replicas, 1);
    let took = ask(&b, true, None).await;
    assert!(took.leads, "the lease was given up: {took:?}");
    assert_eq!((took.fraction, took.seq), (1.0, 2));
    // A verifier that is gone leaves the lease to lapse.
    drop(b);
    let mut taken = false;
    for _ in 0..100 {
        if ask(&a, true, None).await.leads {
            taken = true;
            break;
        }
        tokio::time::sleep(LEASE / 5).await;
    }
    assert!(taken, "a gone verifier's lease never lapsed");
}
