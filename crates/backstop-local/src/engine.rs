//! The engine: one thread behind a bounded queue that runs every active
//! sequence in one batched forward pass per step (continuous batching).
//! Sequences join between steps as they arrive, up to the batch size, and
//! leave as they finish, each with its own KV cache over the shared weights;
//! forward passes never run on the async runtime. A full queue refuses at
//! once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use backstop_adapter::{BackendError, FailureKind};

use crate::generate::{self, Event, Job, Sequence};
use crate::llama::{Cache, Segment};
use crate::model::LoadedModel;
use crate::LocalConfig;

/// The running engine; cheap to share.
#[derive(Clone)]
pub struct Engine {
    queue: SyncSender<Job>,
    ready: Arc<AtomicBool>,
}

impl Engine {
    /// Starts loading the model on a thread of its own and returns at once;
    /// jobs queue up until it is loaded. If loading fails, every job is
    /// answered with the reason.
    pub fn start(config: LocalConfig) -> Self {
        let (queue, jobs) = sync_channel::<Job>(config.queue);
        let ready = Arc::new(AtomicBool::new(false));
        let flag = ready.clone();
        let spawned = std::thread::Builder::new()
            .name("backstop-engine".into())
            .spawn(move || match LoadedModel::load(&config) {
                Ok(model) => {
                    tracing::info!(
                        model = %config.model.display(),
                        context = model.context,
                        batch = config.batch,
                        "local model loaded"
                    );
                    flag.store(true, Ordering::Release);
                    serve(&model, &jobs, config.batch.max(1));
                }
                Err(e) => {
                    tracing::error!("local model not available: {e}");
                    let message = format!(
                        "the local model is not available: {}",
                        generate::describe(&e)
                    );
                    while let Ok(job) = jobs.recv() {
                        let err = BackendError::new(FailureKind::ServerError, message.clone());
                        let _ = job.events.send(Event::Failed(err));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the model loader thread: {e}");
        }
        Engine { queue, ready }
    }

    /// Whether the model is loaded and serving.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Queues a job, or refuses at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), BackendError> {
        match self.queue.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                let mut e = BackendError::new(
                    FailureKind::Overloaded,
                    "the local model is busy: its queue is full; retry shortly",
                );
                e.headers.push(("retry-after".into(), "1".into()));
                Err(e)
            }
            Err(TrySendError::Disconnected(_)) => Err(BackendError::new(
                FailureKind::ServerError,
                "the local model's engine has stopped",
            )),
        }
    }
}

/// Runs steps until the engine is dropped: admits waiting jobs while there
/// is room (blocking only when idle), runs one step for every active
/// sequence, and retires the finished ones, keeping their caches for the
/// next.
fn serve(model: &LoadedModel, jobs: &Receiver<Job>, batch: usize) {
    let mut active: Vec<Sequence> = Vec::with_capacity(batch);
    let mut free: Vec<Cache> = Vec::new();
    let chunk = model.llama.prefill_chunk();
    loop {
        while active.len() < batch {
            let job = if active.is_empty() {
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => return, // the engine is gone
                }
            } else {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            };
            if job.events.is_closed() {
                continue; // its client left while it waited
            }
            if job
                .params
                .deadline
                .is_some_and(|d| tokio::time::Instant::now() >= d)
            {
                let e = BackendError::new(
                    FailureKind::FirstByteTimeout,
                    "the request's deadline passed while it waited for the local model",
                );
                let _ = job.events.send(Event::Failed(e));
                continue;
            }
            active.extend(Sequence::start(model, job, &mut free));
        }
        if active.is_empty() {
            continue;
        }
        let limit = if active.len() > 1 { chunk } else { usize::MAX };
        let mut segments: Vec<Segment<'_>> = active.iter_mut().map(|s| s.segment(limit)).collect();
        let started = tokio::time::Instant::now();
        let logits = model.llama.forward_batch(&mut segments);
        let step = started.elapsed();
        drop(segments);
        let going: Vec<bool> = match logits {
            Ok(logits) => active
                .iter_mut()
                .enumerate()
                .map(|(i, seq)| match logits.get(i) {
                    Ok(row) => seq.advance(model, row, step),
                    Err(e) => {
                        seq.fail(generate::model_failure(e));
                        false
                    }
                })
                .collect(),
            Err(e) => {
                let message = format!("local model failed: {}", generate::describe(&e));
                for seq in &active {
                    let err = BackendError::new(FailureKind::ServerError, message.clone());
                    seq.fail(Event::Failed(err));
                }
                vec![false; active.len()]
            }
        };
        for (seq, going) in std::mem::take(&mut active).into_iter().zip(going) {
            if going {
                active.push(seq);
            } else {
                free.push(seq.into_cache());
            }
        }
        // Keep the largest caches, as many as can run at once.
        if free.len() > batch {
            free.sort_by_key(|c| std::cmp::Reverse(c.capacity()));
            free.truncate(batch);
        }
    }
}
