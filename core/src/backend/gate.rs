//! The gate of a bus (closed state and operations in flight), and the one wait
//! helper every close and drain uses.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{Error, Result};

/// Wait until `done()` holds, re-checking each time `notify` is signalled, until
/// `deadline` (`None`: as long as it takes). Returns whether `done()` held.
///
/// The waiter is registered before `done()` is checked, so a signal sent between
/// the check and the wait is not missed. Whoever changes what `done()` reads
/// calls `notify.notify_waiters()` afterwards.
pub async fn wait_until(
    notify: &Notify,
    deadline: Option<Instant>,
    mut done: impl FnMut() -> bool,
) -> bool {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done() {
            return true;
        }
        match deadline {
            None => notified.await,
            Some(at) => {
                if tokio::time::timeout_at(at, notified).await.is_err() {
                    return done();
                }
            }
        }
    }
}

/// Counts a bus's operations in flight, so `close` can wait for them (C10).
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    count: AtomicUsize,
    idle: Notify,
    /// Set once somebody waits for idleness: only then does the last operation
    /// out signal `idle` (whose waiter list takes a lock, too dear for every
    /// message).
    awaited: AtomicBool,
}

/// One operation in flight, until dropped.
#[derive(Debug)]
pub(crate) struct InFlightGuard<'a>(&'a InFlight);

impl InFlight {
    fn enter(&self) -> InFlightGuard<'_> {
        self.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self)
    }

    async fn idle(&self) {
        // SeqCst with the guard's drop: either the drop sees `awaited` and
        // signals, or this check sees the count it left.
        self.awaited.store(true, Ordering::SeqCst);
        wait_until(&self.idle, None, || self.count.load(Ordering::SeqCst) == 0).await;
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 && self.0.awaited.load(Ordering::SeqCst)
        {
            self.0.idle.notify_waiters();
        }
    }
}

/// Whether a bus still takes work, and what it has in flight: checked by
/// [`Bus`](crate::Bus) before any backend sees an operation.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    closed: AtomicBool,
    in_flight: InFlight,
}

impl Gate {
    /// Admit one operation called `what` on the `backend` bus, or refuse it with
    /// a [`Closed`](crate::Kind::Closed) error once the bus is closed.
    pub(crate) fn enter(&self, what: &str, backend: &str) -> Result<InFlightGuard<'_>> {
        let guard = self.in_flight.enter();
        // Checked after counting, so `close` either sees this operation or this
        // operation sees `closed`: both sides write then read, which needs
        // SeqCst on all four accesses (Acquire/Release would allow both to miss).
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::closed(format!(
                "cannot {what}: the {backend} bus is closed"
            )));
        }
        Ok(guard)
    }

    /// Refuse new work, then wait for the work admitted before.
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.in_flight.idle().await;
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}
