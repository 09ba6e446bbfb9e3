//! Engine threads behind a bounded queue. Forward passes never run on the
//! async runtime: each worker thread owns one sequence at a time, with its own
//! KV cache over the shared weights. A full queue refuses at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};

use backstop_adapter::{BackendError, FailureKind};

use crate::generate::{self, Event, Job};
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
            .name("backstop-load".into())
            .spawn(move || match LoadedModel::load(&config) {
                Ok(model) => {
                    tracing::info!(
                        model = %config.model.display(),
                        context = model.context,
                        workers = config.workers,
                        "local model loaded"
                    );
                    let model = Arc::new(model);
                    let jobs = Arc::new(Mutex::new(jobs));
                    for i in 0..config.workers.max(1) {
                        let (model, jobs) = (model.clone(), jobs.clone());
                        let _ = std::thread::Builder::new()
                            .name(format!("backstop-engine-{i}"))
                            .spawn(move || work(&model, &jobs));
                    }
                    flag.store(true, Ordering::Release);
                }
                Err(e) => {
                    tracing::error!("local model not available: {e}");
                    let message = format!("the local model is not available: {e}");
                    while let Ok(job) = jobs.recv() {
                        let err = BackendError::new(FailureKind::ServerError, message.clone());
                        let _ = job.events.blocking_send(Event::Failed(err));
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

fn work(model: &LoadedModel, jobs: &Mutex<Receiver<Job>>) {
    // The worker's KV cache, grown to the largest sequence it has run.
    let mut cache = None;
    loop {
        let job = match jobs.lock().unwrap_or_else(PoisonError::into_inner).recv() {
            Ok(job) => job,
            Err(_) => return, // the engine is gone
        };
        if job.events.is_closed() {
            continue; // its client left while it waited
        }
        generate::run(model, &mut cache, job);
    }
}
