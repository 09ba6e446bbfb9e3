//! When the embedded store's writer runs (Linux; elsewhere it runs as any
//! thread). Its work can wait and the streams' cannot: while it keeps up it
//! runs only in the time nothing else wants (`SCHED_IDLE`, which any
//! waking thread preempts at once), and once it falls behind it runs as an
//! ordinary thread at a lower priority (nice [`NICE`]), so that it still
//! gets its share of a saturated machine instead of starving while memory
//! fills.
//!
//! A thread leaves `SCHED_IDLE` only with `CAP_SYS_NICE` or a nice limit
//! (`RLIMIT_NICE`, `ulimit -e`) of at least `20 - NICE`; without either,
//! going idle would be for good, so the writer stays an ordinary thread at
//! nice [`NICE`].

/// The writer's nice value while it is an ordinary thread.
const NICE: i32 = 10;

/// The calling thread's scheduling, as the writer sets it batch by batch.
pub(crate) struct Priority {
    /// Whether this thread may go idle and come back.
    can_idle: bool,
    /// Whether it runs in idle time only now.
    idle: bool,
}

impl Priority {
    /// Lowers the calling thread to nice [`NICE`], and learns whether it
    /// may run in idle time only while it keeps up.
    pub(crate) fn lower() -> Self {
        let lowered = nice();
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
        Priority {
            can_idle,
            idle: false,
        }
    }

    /// Runs the calling thread in idle time only unless it is `behind`.
    pub(crate) fn keep_up(&mut self, behind: bool) {
        let idle = self.can_idle && !behind;
        if idle == self.idle {
            return;
        }
        match set_idle(idle).and_then(|()| if idle { Ok(()) } else { nice() }) {
            Ok(()) => self.idle = idle,
            Err(e) => {
                tracing::warn!("the store's writer cannot change its scheduling: {e}");
                self.can_idle = false;
            }
        }
    }
}

/// Sets the calling thread's nice value to [`NICE`].
fn nice() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::process::setpriority_process(Some(rustix::thread::gettid()), NICE)?;
    Ok(())
}

/// Puts the calling thread in `SCHED_IDLE`, or back in `SCHED_OTHER`.
fn set_idle(idle: bool) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let policy = if idle {
            libc::SCHED_IDLE
        } else {
            libc::SCHED_OTHER
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a live sched_param, read during the call only;
        // pid 0 is the calling thread.
        #[allow(unsafe_code)]
        let set = unsafe { libc::sched_setscheduler(0, policy, &param) };
        if set != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = idle;
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// Whether a thread at nice [`NICE`] may go idle and come back: tried on a
/// thread of its own, which is left idle if it may not.
fn may_idle_and_return() -> bool {
    std::thread::scope(|scope| {
        scope
            .spawn(|| nice().is_ok() && set_idle(true).is_ok() && set_idle(false).is_ok())
            .join()
            .unwrap_or(false)
    })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Whether the calling thread runs in idle time only.
    fn is_idle() -> bool {
        // SAFETY: no arguments but the calling thread's pid 0.
        #[allow(unsafe_code)]
        let policy = unsafe { libc::sched_getscheduler(0) };
        policy == libc::SCHED_IDLE
    }

    #[test]
    fn the_writer_idles_while_it_keeps_up_and_not_once_behind() {
        std::thread::spawn(|| {
            let mut priority = Priority::lower();
            let may = priority.can_idle;
            priority.keep_up(false);
            assert_eq!(is_idle(), may, "idle while keeping up, where allowed");
            priority.keep_up(true);
            assert!(!is_idle(), "an ordinary thread once behind");
            priority.keep_up(false);
            assert_eq!(is_idle(), may);
            // Whoever may not come back never goes idle.
            assert_eq!(may, may_idle_and_return());
        })
        .join()
        .unwrap();
    }
}
