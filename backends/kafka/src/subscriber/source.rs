//! The stream side of a subscription: hands ready records out within the
//! prefetch, and closes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use polybus_core::backend::{DeliveryExt, DeliverySource, Depth, DepthProbe, Wire, wait_until};
use polybus_core::{Delivery, Result, async_trait};
use tokio::sync::oneshot;

use super::acker::KafkaAcker;
use super::partitions::{Pending, Slot};
use super::{Phase, Shared};

/// The lags `lag::refresh` last stored, while the subscription lives.
fn lags(shared: &std::sync::Weak<Shared>) -> Vec<Depth> {
    match shared.upgrade() {
        Some(shared) => polybus_core::backend::lock(&shared.lags).clone(),
        None => Vec::new(),
    }
}

/// The stream side of a subscription.
pub(crate) struct KafkaSource {
    pub(super) shared: Arc<Shared>,
    pub(super) done: Option<oneshot::Receiver<()>>,
}

#[async_trait]
impl DeliverySource for KafkaSource {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Delivery>>> {
        self.shared.poll_delivery(cx)
    }

    /// Each assigned partition's lag, kept current by `lag::refresh` from the
    /// first read on: without a metrics SDK nothing reads, and nothing is asked.
    fn depth_probe(&self) -> Option<DepthProbe> {
        let shared = Arc::downgrade(&self.shared);
        let (rt, started) = (self.shared.rt.clone(), AtomicBool::new(false));
        Some(Arc::new(move || {
            if !started.swap(true, Ordering::Relaxed) {
                rt.spawn(super::lag::refresh(shared.clone()));
            }
            lags(&shared)
        }))
    }

    async fn close(&mut self, grace: Duration) -> Result<()> {
        let shared = &self.shared;
        {
            let mut state = shared.lock();
            if state.phase == Phase::Running {
                state.phase = Phase::Draining;
            }
        }
        let deadline = polybus_core::retry::deadline_after(grace);
        wait_until(&shared.changed, Some(deadline), || {
            shared.lock().outstanding == 0
        })
        .await;
        {
            let mut state = shared.lock();
            if state.phase != Phase::Stopped {
                state.phase = Phase::Stopping;
            }
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
        Ok(())
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        // A crash, as far as the group can tell: the driver leaves it, and what
        // is unsettled is delivered again (C9).
        let mut state = self.shared.lock();
        if state.phase != Phase::Stopped {
            state.phase = Phase::Stopping;
        }
    }
}

impl Shared {
    /// The next delivery for the stream, if one is ready and the prefetch allows.
    fn poll_delivery(self: &Arc<Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Delivery>>> {
        let mut state = self.lock();
        if matches!(state.phase, Phase::Stopping | Phase::Stopped) {
            return Poll::Ready(None);
        }
        while state.outstanding < self.sub.prefetch as usize {
            let Some(Pending {
                record: p,
                redelivered,
                ..
            }) = state.ready.pop_front()
            else {
                break;
            };
            let Some(part) = state
                .parts
                .get_mut(&p.tp)
                .filter(|part| part.epoch == p.epoch)
            else {
                continue; // its partition was revoked
            };
            part.unsettled.insert(
                p.offset,
                Slot {
                    handed: Some((p.message.clone(), p.topic.clone(), p.attempt)),
                },
            );
            state.outstanding += 1;
            // The commit metadata now records this hand-out (see `offsets::Prior`).
            state.dirty = true;
            let (message, topic, attempt) = (p.message.clone(), p.topic.clone(), p.attempt);
            let wire = Wire::record(p.tp.1, p.offset);
            let acker = KafkaAcker {
                shared: self.clone(),
                record: p,
            };
            let delivery = Delivery::new(message, topic, attempt, redelivered, Box::new(acker));
            return Poll::Ready(Some(Ok(delivery.with_wire(wire))));
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}
