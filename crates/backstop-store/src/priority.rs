//! When the embedded store's writer runs (Linux; elsewhere it runs as any
//! thread). Its work can wait and the streams' cannot: while it keeps up it
//! runs only in the time nothing else wants (`SCHED_IDLE`, which any
//! waking thread preempts at once), and once it falls behind it runs as an
//! ordinary thread at a lower priority (nice [`NICE`]), so that it still
//! gets its share of a saturated machine instead of starving while memory
//! fills. Someone waiting for a commit (a flush) does not wait for idle
//! time either: asking for one makes the writer ordinary until it is done.
//!
//! A thread leaves `SCHED_IDLE` only with `CAP_SYS_NICE` or a nice limit
//! (`RLIMIT_NICE`, `ulimit -e`) of at least `20 - NICE`; without either,
//! going idle would be for good, so the writer stays an ordinary thread at
//! nice [`NICE`].

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

/// The writer's nice value while it is an ordinary thread.
const NICE: i32 = 10;

/// The writer thread's scheduling: set by the writer batch by batch, and
/// raised by whoever waits for it.
#[derive(Default)]
pub(crate) struct Priority {
    /// The writer thread's id, once it has started (0 before).
    tid: AtomicI32,
    /// Whether the writer may go idle and come back.
    can_idle: AtomicBool,
    /// Whether it runs in idle time only now.
    idle: AtomicBool,
    /// Flushes asked for and not yet done.
    waiting: AtomicUsize,
}

impl Priority {
    /// Called by the writer thread as it starts: lowers it to nice
    /// [`NICE`], and learns whether it may run in idle time only while it
    /// keeps up.
    pub(crate) fn lower(&self) {
        let lowered = nice(0);
        if let Err(e) = &lowered {
            tracing::warn!("the store's writer keeps its priority: {e}");
        }
        let can_idle = lowered.is_ok() && may_idle_and_return();
        if !can_idle {
            tracing::info!(
                "the store's writer runs at nice {NICE}, not in idle time only: that needs \
                 CAP_SYS_NICE or a nice limit (ulimit -e) of {} or more",
                20 - NICE
            );
        }
        self.tid.store(this_thread(), Ordering::SeqCst);
        self.can_idle.store(can_idle, Ordering::SeqCst);
    }

    /// Called by the writer before each batch: it runs in idle time only
    /// unless it is `behind` or someone waits for a flush.
    pub(crate) fn keep_up(&self, behind: bool) {
        let idle = self.can_idle.load(Ordering::SeqCst)
            && !behind
            && self.waiting.load(Ordering::SeqCst) == 0;
        if idle == self.idle.load(Ordering::SeqCst) {
            return;
        }
        if !idle {
            self.ordinary(0);
            return;
        }
        // Said before it is done, so that a flush asked for meanwhile
        // raises it (see `urge`); and undone if one was.
        self.idle.store(true, Ordering::SeqCst);
        if let Err(e) = set_idle(0, true) {
            tracing::warn!("the store's writer cannot change its scheduling: {e}");
            self.can_idle.store(false, Ordering::SeqCst);
        }
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.ordinary(0);
        }
    }

    /// Called before a flush is sent: the writer runs as an ordinary thread
    /// until it has done it.
    pub(crate) fn urge(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let tid = self.tid.load(Ordering::SeqCst);
        if tid != 0 && self.idle.load(Ordering::SeqCst) {
            self.ordinary(tid);
        }
    }

    /// Called by the writer once it has done `n` flushes.
    pub(crate) fn flushed(&self, n: usize) {
        if n > 0 {
            self.waiting.fetch_sub(n, Ordering::SeqCst);
        }
    }

    /// Makes thread `tid` (0: the calling one) an ordinary thread at nice
    /// [`NICE`].
    fn ordinary(&self, tid: i32) {
        self.idle.store(false, Ordering::SeqCst);
        if let Err(e) = set_idle(tid, false).and_then(|()| nice(tid)) {
            tracing::warn!("the store's writer cannot change its scheduling: {e}");
            self.can_idle.store(false, Ordering::SeqCst);
        }
    }
}

/// The calling thread's id (Linux; 0 elsewhere).
fn this_thread() -> i32 {
    #[cfg(target_os = "linux")]
    return rustix::thread::gettid().as_raw_nonzero().get();
    #[cfg(not(target_os = "linux"))]
    0
}

/// Sets thread `tid`'s (0: the calling one's) nice value to [`NICE`].
fn nice(tid: i32) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let tid = match tid {
            0 => rustix::thread::gettid(),
            tid => rustix::process::Pid::from_raw(tid).ok_or(std::io::ErrorKind::InvalidInput)?,
        };
        rustix::process::setpriority_process(Some(tid), NICE)?;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = tid;
    Ok(())
}

/// Puts thread `tid` (0: the calling one) in `SCHED_IDLE`, or back in
/// `SCHED_OTHER`.
fn set_idle(tid: i32, idle: bool) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let policy = if idle {
            libc::SCHED_IDLE
        } else {
            libc::SCHED_OTHER
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a live sched_param, read during the call only;
        // `tid` is a thread of this process (0: the calling one).
        #[allow(unsafe_code)]
        let set = unsafe { libc::sched_setscheduler(tid, policy, &param) };
        if set != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (tid, idle);
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// Whether a thread at nice [`NICE`] may go idle and come back: tried on a
/// thread of its own, which is left idle if it may not.
fn may_idle_and_return() -> bool {
    std::thread::scope(|scope| {
        scope
            .spawn(|| nice(0).is_ok() && set_idle(0, true).is_ok() && set_idle(0, false).is_ok())
            .join()
            .unwrap_or(false)
    })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{mpsc, Arc};

    use super::*;

    /// Whether thread `tid` runs in idle time only.
    fn is_idle(tid: i32) -> bool {
        // SAFETY: no arguments but a thread id.
        #[allow(unsafe_code)]
        let policy = unsafe { libc::sched_getscheduler(tid) };
        policy == libc::SCHED_IDLE
    }

    #[test]
    fn the_writer_idles_while_it_keeps_up_and_not_once_behind_or_waited_for() {
        let priority = Arc::new(Priority::default());
        let (to_writer, batches) = mpsc::channel::<bool>();
        let (done, seen) = mpsc::channel();
        let writer = {
            let priority = priority.clone();
            std::thread::spawn(move || {
                priority.lower();
                done.send(this_thread()).unwrap();
                for behind in batches {
                    priority.keep_up(behind);
                    done.send(this_thread()).unwrap();
                }
            })
        };
        let tid = seen.recv().unwrap();
        let may = priority.can_idle.load(Ordering::SeqCst);
        // Whoever may not come back never goes idle.
        assert_eq!(may, may_idle_and_return());
        let batch = |behind| {
            to_writer.send(behind).unwrap();
            seen.recv().unwrap();
            is_idle(tid)
        };
        assert_eq!(batch(false), may, "idle while keeping up, where allowed");
        assert!(!batch(true), "an ordinary thread once behind");
        assert_eq!(batch(false), may);
        // A flush asked for raises it at once, and it stays raised until
        // the flush is done.
        priority.urge();
        assert!(!is_idle(tid));
        assert!(!batch(false));
        priority.flushed(1);
        assert_eq!(batch(false), may);
        drop(to_writer);
        writer.join().unwrap();
    }
}
