#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;

use crate::{Inserted, Kind, Record, Retention, Sqlite, Status, Store};

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

#[tokio::test]
async fn records_and_their_events_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Sqlite::open(dir.path(), Retention::default()).unwrap();
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
            store.append("r1", seq, Bytes::from(format!("event {seq}")));
        }
        store.flush().await.unwrap();
        let after = store.events("r1", Some(2)).await.unwrap();
        let seqs: Vec<u64> = after.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, [3, 4]);
        assert_eq!(after[0].1, Bytes::from("event 3"));
    }
    let store = Sqlite::open(dir.path(), Retention::default()).unwrap();
    let r = store.get("r1").await.unwrap().unwrap();
    assert_eq!(r.status, Status::InProgress);
    assert_eq!(r.object.as_deref(), Some(&b"{}"[..]));
    assert_eq!(r.owner.as_deref(), Some("billing"));
    assert_eq!(store.events("r1", None).await.unwrap().len(), 5);
    let unfinished = store.unfinished().await.unwrap();
    assert_eq!(unfinished.len(), 1);
    assert!(store.get("nope").await.unwrap().is_none());
}

#[tokio::test]
async fn one_generation_per_idempotency_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = Sqlite::open(dir.path(), Retention::default()).unwrap();
    assert_eq!(
        store.insert(record("a", Some("k"), 1)).await.unwrap(),
        Inserted::New
    );
    match store.insert(record("b", Some("k"), 2)).await.unwrap() {
        Inserted::Exists(r) => assert_eq!(r.id, "a"),
        other => panic!("{other:?}"),
    }
    assert_eq!(store.by_key("k").await.unwrap().unwrap().id, "a");
    assert!(store.get("b").await.unwrap().is_none());
}

#[tokio::test]
async fn the_sweeper_deletes_expired_final_records_and_keeps_to_the_disk_budget() {
    let dir = tempfile::tempdir().unwrap();
    let store = Sqlite::open(dir.path(), Retention::default()).unwrap();
    store.insert(record("done", None, 1)).await.unwrap();
    store.update("done", Status::Completed, None).await.unwrap();
    store.insert(record("running", None, 1)).await.unwrap();
    store
        .update("running", Status::InProgress, None)
        .await
        .unwrap();
    store.append("done", 0, Bytes::from_static(b"e"));
    // Not yet expired: nothing goes.
    assert_eq!(store.sweep(50).await.unwrap(), 0);
    // Expired: the finished one goes with its events; the running one stays.
    assert_eq!(store.sweep(1000).await.unwrap(), 1);
    assert!(store.get("done").await.unwrap().is_none());
    assert!(store.events("done", None).await.unwrap().is_empty());
    assert!(store.get("running").await.unwrap().is_some());

    let dir = tempfile::tempdir().unwrap();
    let budget = Retention {
        max_bytes: 512 << 10,
        ..Retention::default()
    };
    let store = Sqlite::open(dir.path(), budget).unwrap();
    // Bytes that do not compress: the budget counts what is on disk.
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
        store.append(&format!("r{i}"), 0, big.clone());
    }
    store.flush().await.unwrap();
    assert!(store.size().await.unwrap() > 512 << 10);
    let gone = store.sweep(0).await.unwrap();
    assert!(gone > 0);
    assert!(store.size().await.unwrap() <= 512 << 10);
    // The oldest went first.
    assert!(store.get("r0").await.unwrap().is_none());
    assert!(store.get("r99").await.unwrap().is_some());
}

#[tokio::test]
async fn deleting_removes_the_record_and_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = Sqlite::open(dir.path(), Retention::default()).unwrap();
    store.insert(record("r", None, 1)).await.unwrap();
    store.append("r", 0, Bytes::from_static(b"e"));
    assert!(store.delete("r").await.unwrap());
    assert!(!store.delete("r").await.unwrap());
    assert!(store.events("r", None).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_log_read_from_any_event_whatever_rows_its_batches_made() {
    let dir = tempfile::tempdir().unwrap();
    let store = Sqlite::open(dir.path(), Retention::default()).unwrap();
    // Two generations' events interleaved, committed in three batches; one
    // event appended twice (a retry), and an empty event.
    for seq in 0..4 {
        store.append("a", seq, Bytes::from(format!("a{seq}")));
        store.append("b", seq, Bytes::from(format!("b{seq}")));
    }
    store.flush().await.unwrap();
    store.append("a", 3, Bytes::from_static(b"a3"));
    store.append("a", 4, Bytes::new());
    store.append("a", 5, Bytes::from_static(b"a5"));
    store.flush().await.unwrap();
    store.append("a", 6, Bytes::from_static(b"a6"));
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
    store.append("r", 2, Bytes::from_static(b"e2"));
    store.flush().await.unwrap();
    let events = store.events("r", Some(0)).await.unwrap();
    assert_eq!(
        events,
        [
            (1, Bytes::from_static(b"e1")),
            (2, Bytes::from_static(b"e2"))
        ]
    );
    assert_eq!(store.unfinished().await.unwrap().len(), 1);
}

#[tokio::test]
async fn segments_are_compressed_and_those_of_the_second_version_read_on() {
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
    // A stream's events: the same fields again and again, as JSON events are.
    let event = |seq: u64| {
        Bytes::from(format!(
            r#"{{"type":"response.output_text.delta","item_id":"msg_1","output_index":0,"content_index":0,"delta":"word{seq} ","sequence_number":{seq}}}"#
        ))
    };
    let mut want = vec![
        (0, Bytes::from_static(b"e0")),
        (1, Bytes::from_static(b"e1")),
    ];
    for seq in 2..40 {
        store.append("r", seq, event(seq));
        want.push((seq, event(seq)));
    }
    // Too short to gain from compressing: kept as it is.
    store.append("short", 0, Bytes::from_static(b"tiny"));
    store.flush().await.unwrap();
    assert_eq!(store.events("r", None).await.unwrap(), want);
    assert_eq!(store.events("r", Some(20)).await.unwrap(), want[21..]);
    assert_eq!(store.events("short", None).await.unwrap().len(), 1);

    let raw = rusqlite::Connection::open(dir.path().join("backstop.db")).unwrap();
    let (codec, stored): (i64, usize) = raw
        .query_row(
            "SELECT codec, length(data) FROM segments WHERE response_id = 'r' AND seq = 2",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    let plain: usize = want[2..].iter().map(|(_, e)| e.len()).sum();
    assert_eq!(codec, crate::sqlite::LZ4);
    assert!(stored * 3 < plain, "{stored} bytes stored for {plain}");
    let codecs: Vec<i64> = raw
        .prepare("SELECT codec FROM segments WHERE response_id IN ('r', 'short') ORDER BY response_id, seq")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(codecs, [0, 1, 0]);
}

#[tokio::test]
async fn an_append_says_when_the_writer_has_fallen_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = Sqlite::open(dir.path(), Retention::default())
        .unwrap()
        .max_unwritten(1 << 20);
    assert!(!store.append("r", 0, Bytes::from_static(b"e")));
    // More than the bound, appended at once.
    let big = Bytes::from(vec![b'x'; 64 << 10]);
    let behind = (1..=256).find(|&seq| store.append("r", seq, big.clone()));
    assert!(behind.is_some(), "never behind");
    store.flush().await.unwrap();
    let next = behind.unwrap() + 1;
    assert!(!store.append("r", next, Bytes::from_static(b"e")));
    store.flush().await.unwrap();
    assert_eq!(
        store.events("r", None).await.unwrap().len() as u64,
        next + 1
    );
}
