//! [`BackendFuture`]: the future of one publish or settlement.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::FutureExt;
use futures::future::{BoxFuture, Either, Ready};

use crate::backend::gate::InFlightGuard;

/// The future a backend returns for one publish or settlement.
///
/// A named type rather than an `async fn`, so that a backend that never waits
/// (the in-memory broker) answers at once without allocating a future for every
/// message; a backend that does I/O wraps its `async` block with
/// [`BackendFuture::boxed`].
///
/// A backend may do the work when called rather than when polled (the in-memory
/// broker enqueues at once): dropping the future does not undo an operation
/// that has started, and its outcome is then unknown, as with a time-out.
#[must_use = "the outcome is lost unless the future is awaited"]
pub struct BackendFuture<'a, T> {
    inner: Either<Ready<T>, BoxFuture<'a, T>>,
    /// Counts the operation in its bus's gate until it finishes or is dropped,
    /// so `close` waits for it (C10); set by [`Bus`](crate::Bus), not by backends.
    guard: Option<InFlightGuard<'a>>,
}

impl<'a, T> BackendFuture<'a, T> {
    /// An operation still to be done by `future`, which is boxed.
    pub fn boxed(future: impl Future<Output = T> + Send + 'a) -> Self {
        BackendFuture {
            inner: Either::Right(Box::pin(future)),
            guard: None,
        }
    }

    /// An operation already done.
    pub fn ready(output: T) -> Self {
        BackendFuture {
            inner: Either::Left(futures::future::ready(output)),
            guard: None,
        }
    }

    /// The output, if the operation is already done; the future otherwise.
    #[cfg(feature = "otel")]
    pub(crate) fn into_ready(self) -> Result<T, Self> {
        match self.inner {
            Either::Left(ready) => Ok(ready.into_inner()),
            inner => Err(BackendFuture { inner, ..self }),
        }
    }

    /// Count the operation as in flight until it finishes or is dropped. An
    /// operation already done is not counted: a future that is ready but not
    /// awaited yet must not hold up `close`.
    pub(crate) fn guarded(mut self, guard: InFlightGuard<'a>) -> Self {
        if matches!(self.inner, Either::Right(_)) {
            self.guard = Some(guard);
        }
        self
    }
}

impl<T> Future for BackendFuture<'_, T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let out = self.inner.poll_unpin(cx);
        if out.is_ready() {
            // Finished: no longer in flight, even if the caller keeps the future.
            self.guard = None;
        }
        out
    }
}

impl<T> fmt::Debug for BackendFuture<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.inner {
            Either::Left(_) => "ready",
            Either::Right(_) => "boxed",
        };
        f.debug_tuple("BackendFuture")
            .field(&format_args!("{state}"))
            .finish()
    }
}
