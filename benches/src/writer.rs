//! What the embedded store's writer costs a stream, in CPU time: streams
//! made at a fixed rate straight into a SQLite store (no HTTP, no upstream),
//! each as the server keeps one (its record queued, its events appended
//! frame by frame, its end), and the CPU time the writer thread and the
//! whole process used, read from `/proc`. CPU time, unlike latency, barely
//! moves with this shared machine's noise, so two builds can be compared
//! run against run.
//!
//! Usage: bench-writer [STREAMS_PER_SECOND] [SECONDS]   (defaults 1000, 10)
//!
//! Each stream is a Responses stream shaped like the mock upstream's: 20
//! events (the created and in-progress objects, eleven text deltas, the
//! done events and the completed object), about 5 KB, in three frames.

use std::time::Duration;

use backstop_store::{Kind, Record, Retention, Sqlite, Status, Store};
use bytes::Bytes;
use serde_json::json;

/// The allocator the `backstop` binary uses: the writer frees what the
/// streams allocated, and what that costs depends on it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// CPU time (user + system) of a thread of this process whose name is
/// `comm`, or of the whole process for `None`, in microseconds.
fn cpu_us(comm: Option<&str>) -> anyhow::Result<u64> {
    let tick = 10_000; // Linux's USER_HZ is 100
    let stat = |path: &std::path::Path| -> anyhow::Result<u64> {
        let text = std::fs::read_to_string(path)?;
        // The fields after the name, which is in parentheses.
        let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        Ok((field(11).unwrap_or(0) + field(12).unwrap_or(0)) * tick)
    };
    let Some(comm) = comm else {
        return stat(std::path::Path::new("/proc/self/stat"));
    };
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let task = task?.path();
        if std::fs::read_to_string(task.join("comm"))?.trim() == comm {
            total += stat(&task.join("stat"))?;
        }
    }
    Ok(total)
}

fn event(kind: &str, data: serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// A stream's frames, as the server's pump splits them into events.
fn frames(id: &str) -> Vec<Vec<Bytes>> {
    let object = |status: &str, output: serde_json::Value| {
        json!({"background": false, "created_at": 1_700_000_000, "error": null, "id": id,
               "incomplete_details": null, "instructions": null, "model": "gpt-4o-mini",
               "object": "response", "output": output, "previous_response_id": null,
               "status": status, "usage": null})
    };
    let words = [
        "You ",
        "asked ",
        "about ",
        "failover ",
        "routers: ",
        "they ",
        "keep ",
        "answers ",
        "coming ",
        "when ",
        "upstreams fail.",
    ];
    let text: String = words.concat();
    let item = |status: &str, text: &str| {
        json!({"content": [{"annotations": [], "text": text, "type": "output_text"}],
               "id": "msg_1", "role": "assistant", "status": status, "type": "message"})
    };
    let mut seq = 0;
    let mut next = || {
        seq += 1;
        seq - 1
    };
    let start = vec![
        event(
            "response.created",
            json!({"response": object("in_progress", json!([])), "sequence_number": next(), "type": "response.created"}),
        ),
        event(
            "response.in_progress",
            json!({"response": object("in_progress", json!([])), "sequence_number": next(), "type": "response.in_progress"}),
        ),
        event(
            "response.output_item.added",
            json!({"item": item("in_progress", ""), "output_index": 0, "sequence_number": next(), "type": "response.output_item.added"}),
        ),
        event(
            "response.content_part.added",
            json!({"content_index": 0, "item_id": "msg_1", "output_index": 0, "part": {"annotations": [], "text": "", "type": "output_text"}, "sequence_number": next(), "type": "response.content_part.added"}),
        ),
    ];
    let deltas = words
        .iter()
        .map(|w| {
            event(
                "response.output_text.delta",
                json!({"content_index": 0, "delta": w, "item_id": "msg_1", "logprobs": [], "output_index": 0, "sequence_number": next(), "type": "response.output_text.delta"}),
            )
        })
        .collect();
    let end = vec![
        event(
            "response.output_text.done",
            json!({"content_index": 0, "item_id": "msg_1", "logprobs": [], "output_index": 0, "sequence_number": next(), "text": text, "type": "response.output_text.done"}),
        ),
        event(
            "response.content_part.done",
            json!({"content_index": 0, "item_id": "msg_1", "output_index": 0, "part": {"annotations": [], "text": text, "type": "output_text"}, "sequence_number": next(), "type": "response.content_part.done"}),
        ),
        event(
            "response.output_item.done",
            json!({"item": item("completed", &text), "output_index": 0, "sequence_number": next(), "type": "response.output_item.done"}),
        ),
        event(
            "response.completed",
            json!({"response": object("completed", json!([item("completed", &text)])), "sequence_number": next(), "type": "response.completed"}),
        ),
    ];
    vec![start, deltas, end]
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rate: u64 = args.next().map_or(Ok(1000), |s| s.parse())?;
    let secs: u64 = args.next().map_or(Ok(10), |s| s.parse())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let data = std::env::temp_dir().join(format!("bench-writer-{}", std::process::id()));
        let store = Sqlite::open(&data, Retention::default())?;
        let request = Bytes::from(
            json!({"model": "gpt-4o-mini", "stream": true,
                   "input": "Tell me about failover routers in one short paragraph."})
            .to_string(),
        );
        let streams = rate * secs;
        let (writer0, process0) = (cpu_us(Some("backstop-store"))?, cpu_us(None)?);
        let mut every = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
        let mut bytes = 0;
        for n in 0..streams {
            every.tick().await;
            let id = format!("resp_{n:012x}{:032x}", 0);
            let record = Record {
                id: id.clone(),
                kind: Kind::Response,
                status: Status::InProgress,
                background: false,
                stored: true,
                key: None,
                request: request.clone(),
                object: None,
                created_at: 1_700_000_000,
                expires_at: 1_800_000_000,
                owner: None,
            };
            // As the server queues them: nothing waited for.
            drop(store.insert(record));
            let mut seq = 0;
            for frame in frames(&id) {
                let n = frame.len() as u64;
                bytes += frame.iter().map(Bytes::len).sum::<usize>();
                let _ = store.append(&id, seq, frame);
                seq += n;
            }
            drop(store.update(&id, Status::Completed, None));
        }
        store.flush().await?;
        let writer = cpu_us(Some("backstop-store"))? - writer0;
        let process = cpu_us(None)? - process0;
        let size = store.size().await?;
        println!(
            "{streams} streams at {rate}/s, {} bytes of events each: the writer used {:.1} µs of CPU a stream, \
             the process {:.1}; {} bytes a stream in the database",
            bytes / streams.max(1) as usize,
            writer as f64 / streams as f64,
            process as f64 / streams as f64,
            size / streams.max(1)
        );
        drop(store);
        let _ = std::fs::remove_dir_all(&data);
        Ok(())
    })
}
