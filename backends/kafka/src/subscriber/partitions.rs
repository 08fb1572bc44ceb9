//! The bookkeeping of assigned partitions: unsettled offsets, epochs, and the
//! records on their way to the subscriber.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use polybus_core::{Error, Message, Topic};

use super::offsets::{self, Prior};
use super::{Phase, Shared, State, Tp};

/// One assigned partition.
pub(super) struct Part {
    /// Changes with every assignment, so deliveries of a revoked partition fail.
    pub(super) epoch: u64,
    /// The offset after the last record received.
    pub(super) next: i64,
    /// Received and not settled, by offset.
    pub(super) unsettled: BTreeMap<i64, Slot>,
    /// What the last owner recorded: the record at `head` was handed out as
    /// attempt `attempt`, and records up to `through` were handed out too.
    pub(super) prior: Option<Prior>,
    /// The last position committed, with its metadata.
    pub(super) committed: (i64, String),
}

/// A received, unsettled record.
#[derive(Default)]
pub(super) struct Slot {
    /// What was handed out, as which attempt; `None` while buffered.
    pub(super) handed: Option<(Arc<Message>, Topic, u32)>,
}

impl Slot {
    pub(super) fn attempt(&self) -> u32 {
        self.handed.as_ref().map_or(0, |h| h.2)
    }
}

impl Part {
    /// Where the group resumes: the lowest unsettled offset, or past everything.
    /// With the metadata to commit there (see `offsets::commit_position`).
    pub(super) fn position(&self) -> (i64, String) {
        let unsettled = self.unsettled.iter().map(|(o, s)| (*o, s.attempt()));
        offsets::commit_position(self.next, unsettled)
    }
}

/// One delivery of a record: where it sits, in which assignment, and what it
/// carries. A pending record and the acker of a handed-out one both hold it.
pub(super) struct Record {
    pub(super) tp: Tp,
    pub(super) offset: i64,
    pub(super) epoch: u64,
    pub(super) message: Arc<Message>,
    pub(super) topic: Topic,
    pub(super) attempt: u32,
}

/// A record on its way to the subscriber.
pub(super) struct Pending {
    pub(super) record: Record,
    pub(super) redelivered: bool,
    pub(super) due: Option<Instant>,
    /// Whether its partition is paused until it is due (retry-topic copies).
    pub(super) holds_partition: bool,
}

/// Records polled and not yet handed out: the subscription's read-ahead,
/// bounded apart from the prefetch (see `flow::out_of_room`), with the bytes
/// of their payloads counted.
#[derive(Default)]
pub(super) struct Ready {
    queue: VecDeque<Pending>,
    bytes: usize,
}

impl Ready {
    pub(super) fn push_back(&mut self, p: Pending) {
        self.bytes += p.record.message.payload().len();
        self.queue.push_back(p);
    }

    pub(super) fn pop_front(&mut self) -> Option<Pending> {
        let p = self.queue.pop_front()?;
        self.bytes -= p.record.message.payload().len();
        Some(p)
    }

    /// Drop the records of the partitions in `gone`.
    pub(super) fn drop_partitions(&mut self, gone: &HashSet<Tp>) {
        self.queue.retain(|p| !gone.contains(&p.record.tp));
        self.bytes = self
            .queue
            .iter()
            .map(|p| p.record.message.payload().len())
            .sum();
    }

    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Shared {
    /// Whether a delivery of generation `epoch` from `tp` can still be settled.
    pub(super) fn valid(state: &State, tp: &Tp, epoch: u64) -> bool {
        matches!(state.phase, Phase::Running | Phase::Draining)
            && state.parts.get(tp).is_some_and(|p| p.epoch == epoch)
    }

    pub(super) fn closed_error() -> Error {
        Error::closed(
            "cannot settle: the subscription was closed or its partition was reassigned; \
             the message will be delivered again",
        )
    }

    /// A delivery is settled: its offset may be committed. `handed_out` says
    /// whether it counted against the prefetch.
    pub(super) fn finish(&self, tp: &Tp, offset: i64, epoch: u64, handed_out: bool) -> bool {
        let mut state = self.lock();
        if handed_out {
            state.outstanding = state.outstanding.saturating_sub(1);
        }
        let ok = Self::valid(&state, tp, epoch);
        if ok && let Some(part) = state.parts.get_mut(tp) {
            part.unsettled.remove(&offset);
            state.dirty = true;
        }
        self.wake(&mut state);
        drop(state);
        self.changed.notify_waiters();
        ok
    }

    /// Give a handed-out delivery back to be delivered again from memory after
    /// `delay`, as `attempt`; its offset stays uncommitted meanwhile.
    pub(super) fn hold_again(&self, d: &Record, attempt: u32, delay: Duration) -> bool {
        let mut state = self.lock();
        state.outstanding = state.outstanding.saturating_sub(1);
        let ok = Self::valid(&state, &d.tp, d.epoch);
        if ok {
            state.held.push(Pending {
                record: Record {
                    tp: d.tp.clone(),
                    message: d.message.clone(),
                    topic: d.topic.clone(),
                    attempt,
                    ..*d
                },
                redelivered: true,
                due: Some(Instant::now() + delay),
                holds_partition: false,
            });
        }
        self.wake(&mut state);
        drop(state);
        self.changed.notify_waiters();
        ok
    }
}
