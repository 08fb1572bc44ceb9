//! Record intake: a polled record becomes a pending delivery.

use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use polybus_core::backend::{exhausted_dead_letter, is_exhausted_on_receipt};
use rdkafka::Message as _;
use rdkafka::message::BorrowedMessage;

use super::offsets;
use super::partitions::{Pending, Record, Slot};
use super::{Shared, State, Tp};
use crate::mapping::{self, Received};

impl Shared {
    /// A record from the broker.
    pub(super) fn on_record(self: &Arc<Self>, record: &BorrowedMessage<'_>) {
        let from_retry = self.retry_topic.as_deref() == Some(record.topic());
        // The regex cannot leave out the reserved namespace; the matcher can.
        let skip = !from_retry && !self.sub.matches(record.topic());
        let received = (!skip).then(|| mapping::receive(record));
        let mut state = self.lock();
        if let Some(pending) = Self::admit(&mut state, record, received, from_retry) {
            self.route(state, pending);
        }
    }

    /// File a record in its partition as unsettled, and make its delivery:
    /// `None` if its partition is gone or the record is skipped (a skipped
    /// offset is settled at once).
    fn admit(
        state: &mut State,
        record: &BorrowedMessage<'_>,
        received: Option<Received>,
        from_retry: bool,
    ) -> Option<Pending> {
        let offset = record.offset();
        let State {
            parts,
            dirty,
            topics,
            origins,
            ..
        } = state;
        let tp: Tp = (topics.topic(record.topic()), record.partition());
        let Some(part) = parts.get_mut(&tp) else {
            return None; // revoked while it was in flight
        };
        part.next = offset + 1;
        let Some(r) = received else {
            *dirty = true;
            return None;
        };
        let topic = match (&r.topic, from_retry) {
            (Some(t), true) => origins.topic(t),
            _ => tp.0.clone(),
        };
        let (attempt, redelivered) = offsets::counted_attempt(part.prior, offset, r.attempt);
        part.unsettled.insert(offset, Slot::default());
        Some(Pending {
            record: Record {
                tp,
                offset,
                epoch: part.epoch,
                message: Arc::new(r.message),
                topic,
                attempt,
            },
            redelivered,
            due: r.due_ms.and_then(instant_of),
            holds_partition: from_retry,
        })
    }

    /// Send a new delivery on: dead-lettered if crashes exhausted it, held
    /// until it is due, or ready for the stream.
    fn route(self: &Arc<Self>, mut state: MutexGuard<'_, State>, pending: Pending) {
        if is_exhausted_on_receipt(&self.sub.retry, pending.record.attempt) {
            // Exhausted by crashes: dead-letter on receipt, never hand it out.
            drop(state);
            self.dead_letter_on_receipt(pending.record);
            return;
        }
        if pending.due.is_some_and(|d| d > Instant::now()) {
            state.held.push(pending);
        } else {
            state.ready.push_back(pending);
            self.wake(&mut state);
        }
    }

    fn dead_letter_on_receipt(self: &Arc<Shared>, p: Record) {
        let dead = exhausted_dead_letter(&p.message, p.topic.as_str(), p.attempt, &self.sub.group);
        let connector = self.connector.clone();
        let store = self.sub.dead_letter_topic.as_str().to_owned();
        let shared = self.clone();
        self.rt.spawn(async move {
            match connector.produce(&store, &dead, &[]).await {
                Ok(_) => {
                    shared.finish(&p.tp, p.offset, p.epoch, false);
                }
                Err(failure) => tracing::warn!(
                    error = %failure.error(),
                    "dead-lettering an exhausted message failed; it is read again after the next rebalance"
                ),
            }
        });
    }
}

fn instant_of(due_ms: u64) -> Option<Instant> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_millis() as u64;
    Some(Instant::now() + Duration::from_millis(due_ms.saturating_sub(now_ms)))
}
