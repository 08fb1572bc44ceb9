//! Awaiting a batch's publishes together without giving up their order.

use std::future::Future;
use std::task::Poll;

/// Await `futures` together, polling each pending one in order on every wake,
/// so their first polls (where lapin queues a publish's frames and numbers its
/// confirm) run in the order given: the batch keeps its order (C5).
/// `join_all` does this only for lists of up to 30; longer ones go through
/// `FuturesOrdered`, whose first polls need not run in order.
pub(crate) async fn in_order<F: Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<_> = futures.map(|f| Some(Box::pin(f))).collect();
    let mut outputs: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (slot, output) in pending.iter_mut().zip(outputs.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    Poll::Ready(out) => {
                        *output = Some(out);
                        *slot = None;
                    }
                    Poll::Pending => waiting = true,
                }
            }
        }
        if waiting {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// More than `join_all` keeps in order.
    const CHUNK: usize = 256;

    /// C5 for a batch: lapin queues a publish in its first poll, so first polls
    /// must run in the batch's order, beyond the 30 that `join_all` keeps in order.
    #[tokio::test]
    async fn batch_writes_are_first_polled_in_order_and_answered_in_order() {
        let first_polls = Mutex::new(Vec::new());
        let writes = (0..CHUNK).map(|i| {
            let first_polls = &first_polls;
            async move {
                first_polls.lock().unwrap().push(i);
                // Pending once, answered later, as a write is.
                tokio::task::yield_now().await;
                i * 2
            }
        });
        let outputs = in_order(writes).await;
        let order: Vec<usize> = (0..CHUNK).collect();
        assert_eq!(*first_polls.lock().unwrap(), order);
        assert_eq!(outputs, order.iter().map(|i| i * 2).collect::<Vec<_>>());
    }
}
