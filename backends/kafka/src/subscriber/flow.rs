//! The driver's chores between polls: flow control (C6) and commits (C9).

use std::collections::HashSet;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use polybus_core::Topic;
use polybus_core::backend::TopicExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::rebalance::SubContext;
use super::{COMMIT_INTERVAL, Phase, REBALANCE_CALL_TIMEOUT, Shared, State, Tp};

impl Shared {
    /// The driver's chores between polls: release due retries, pause or resume
    /// fetching, commit. Returns how long the next poll may block, or `None` when
    /// the driver should stop.
    pub(super) fn chores(
        self: &Arc<Self>,
        consumer: &Arc<BaseConsumer<SubContext>>,
        last_commit: &mut Instant,
    ) -> Option<Duration> {
        let mut state = self.lock();
        if matches!(state.phase, Phase::Stopping | Phase::Stopped) {
            return None;
        }
        let now = Instant::now();
        let next_due = self.release_due(&mut state, now);
        // Fetch only while the read-ahead has room; the prefetch (C6) bounds
        // what the stream hands out (`source`).
        let full = state.phase != Phase::Running
            || out_of_room((state.ready.len(), state.ready.bytes()), state.room_paused);
        state.room_paused = full;
        Self::pause_or_resume(&mut state, consumer, full);
        let state = self.commit_if_due(state, consumer, last_commit);
        let starved = full && state.phase == Phase::Running;
        Some(next_wait(starved, state.dirty, next_due, now))
    }

    /// Move held records that are due to `ready`; returns when the next of the
    /// others is due.
    fn release_due(&self, state: &mut State, now: Instant) -> Option<Instant> {
        let mut next_due: Option<Instant> = None;
        let mut i = 0;
        let mut woke = false;
        while i < state.held.len() {
            let due = state.held[i].due.unwrap_or(now);
            if due <= now {
                let p = state.held.swap_remove(i);
                state.ready.push_back(p);
                woke = true;
            } else {
                next_due = Some(next_due.map_or(due, |d: Instant| d.min(due)));
                i += 1;
            }
        }
        if woke {
            self.wake(state);
        }
        next_due
    }

    /// Pause every partition when `full`, and each partition whose retry copy
    /// waits to be due; resume the rest.
    fn pause_or_resume(state: &mut State, consumer: &BaseConsumer<SubContext>, full: bool) {
        // The steady state, with room and nothing paused, costs no set work
        // per record.
        let holding = state.held.iter().any(|p| p.holds_partition);
        if !(full || holding || !state.paused.is_empty()) {
            return;
        }
        let (pause, resume) = Self::pause_plan(state, full);
        if !pause.is_empty() && consumer.pause(&tpl(&pause)).is_ok() {
            state.paused.extend(pause);
        }
        if !resume.is_empty() && consumer.resume(&tpl(&resume)).is_ok() {
            for tp in &resume {
                state.paused.remove(tp);
            }
        }
    }

    /// Which partitions to pause and which to resume.
    fn pause_plan(state: &State, full: bool) -> (Vec<Tp>, Vec<Tp>) {
        let waiting: HashSet<Tp> = state
            .held
            .iter()
            .filter(|p| p.holds_partition)
            .map(|p| p.record.tp.clone())
            .collect();
        let want: HashSet<Tp> = state
            .parts
            .keys()
            .filter(|tp| full || waiting.contains(*tp))
            .cloned()
            .collect();
        let pause: Vec<Tp> = want.difference(&state.paused).cloned().collect();
        let resume: Vec<Tp> = state
            .paused
            .difference(&want)
            .filter(|tp| state.parts.contains_key(*tp))
            .cloned()
            .collect();
        (pause, resume)
    }

    /// Commit what is settled, at most every `COMMIT_INTERVAL` and one commit
    /// at a time, on a thread of its own: librdkafka reports the result of a
    /// manual asynchronous commit to nobody (no `offset_commit_cb` is set, so
    /// rdkafka's `commit_callback` hears only automatic commits), and a
    /// synchronous one in the driver would stall fetching and the resume an ack
    /// allows for a round trip to a slow broker.
    fn commit_if_due<'a>(
        self: &'a Arc<Self>,
        mut state: MutexGuard<'a, State>,
        consumer: &Arc<BaseConsumer<SubContext>>,
        last_commit: &mut Instant,
    ) -> MutexGuard<'a, State> {
        if !(state.dirty && !state.committing && last_commit.elapsed() >= COMMIT_INTERVAL) {
            return state;
        }
        let positions = Self::positions(&mut state, None);
        state.dirty = false;
        *last_commit = Instant::now();
        if positions.count() == 0 {
            return state;
        }
        state.committing = true;
        drop(state);
        let (shared, consumer, list) = (self.clone(), consumer.clone(), positions.clone());
        // A thread of its own, not the runtime's blocking pool: a runtime that
        // shuts down never runs queued jobs, and the driver waits for this one.
        let spawned = std::thread::Builder::new()
            .name("polybus-kafka-commit".into())
            .spawn(move || {
                let result = consumer.commit(&list, CommitMode::Sync);
                // The driver drops the last reference, so the member leaves the
                // group from the driver thread (see `drive`).
                drop(consumer);
                shared.commit_done(&list, result);
            });
        if spawned.is_err() {
            self.commit_done(&positions, Err(rdkafka::error::KafkaError::Canceled));
        }
        self.lock()
    }

    /// A periodic commit's result: a failed one is sent again at the next
    /// commit (its positions no longer count as committed).
    fn commit_done(&self, positions: &TopicPartitionList, result: KafkaResult<()>) {
        let mut state = self.lock();
        state.committing = false;
        if let Err(e) = result {
            tracing::debug!(error = %e, "committing offsets failed; sent again at the next commit");
            for e in positions.elements() {
                let tp = (Topic::from_broker(e.topic()), e.partition());
                if let Some(part) = state.parts.get_mut(&tp) {
                    part.committed = (UNKNOWN, String::new());
                    state.dirty = true;
                }
            }
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Block until no periodic commit is in flight (driver thread only), so a
    /// revocation's commit, or the member's leaving, comes after it; at most
    /// `REBALANCE_CALL_TIMEOUT`.
    pub(super) fn await_commit(&self) {
        let started = Instant::now();
        while self.lock().committing && started.elapsed() < REBALANCE_CALL_TIMEOUT {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The positions to commit, for `only` these partitions or all, with the
    /// metadata that records a handed-out head; advances each part's record of
    /// what it committed.
    pub(super) fn positions(state: &mut State, only: Option<&HashSet<Tp>>) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for (tp, part) in state.parts.iter_mut() {
            if only.is_some_and(|o| !o.contains(tp)) {
                continue;
            }
            let position = part.position();
            if position == part.committed {
                continue;
            }
            let mut e = list.add_partition(tp.0.as_str(), tp.1);
            if e.set_offset(Offset::Offset(position.0)).is_ok() {
                e.set_metadata(position.1.clone());
            }
            part.committed = position;
        }
        list
    }
}

fn tpl(tps: &[Tp]) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for (t, p) in tps {
        list.add_partition(t.as_str(), *p);
    }
    list
}

/// A committed position no offset equals: the next commit sends the partition.
const UNKNOWN: i64 = i64::MIN;

/// The read-ahead: records polled and not yet handed out, at most this many…
const READ_AHEAD_RECORDS: usize = 10_000;
/// …and at most this many payload bytes (librdkafka's own read-ahead,
/// `queued.max.messages.kbytes`, is 64 MiB).
const READ_AHEAD_BYTES: usize = 16 << 20;

/// Whether fetching stays paused for want of room, with `(records, bytes)`
/// read ahead: paused when either reaches its bound, resumed only once both
/// are at half of it.
///
/// Why a read-ahead apart from the prefetch, and why the gap: librdkafka's
/// pause drops the records it has fetched for the partition and its resume
/// fetches them again (librdkafka#1849), a round trip of a fetch wait. Pausing
/// when buffered plus handed-out deliveries reached the prefetch, and resuming
/// at the next settlement, paid that round trip every few records: a sustained
/// stream on the mock cluster ran at a sixth of raw rdkafka's rate with a
/// prefetch of 1,000, and level with it when the prefetch was never reached.
/// On Kafka a partition belongs to one member, so what is read ahead is
/// nobody else's to take; C6 counts what is handed out.
fn out_of_room((records, bytes): (usize, usize), paused: bool) -> bool {
    if paused {
        records > READ_AHEAD_RECORDS / 2 || bytes > READ_AHEAD_BYTES / 2
    } else {
        records >= READ_AHEAD_RECORDS || bytes >= READ_AHEAD_BYTES
    }
}

/// How long the next poll may block: briefly while `starved` (paused for want
/// of room), at most until the next commit while settlements wait to be
/// committed (`dirty`), and at most until the next held record is due.
fn next_wait(starved: bool, dirty: bool, next_due: Option<Instant>, now: Instant) -> Duration {
    // Paused for want of room: resumption waits on the stream taking records
    // out of the read-ahead, which does not wake `poll`, so poll briefly.
    let mut wait = if starved {
        Duration::from_millis(5)
    } else {
        Duration::from_millis(100)
    };
    if dirty {
        wait = wait.min(COMMIT_INTERVAL);
    }
    if let Some(due) = next_due {
        wait = wait.min(due.saturating_duration_since(now));
    }
    wait
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetching_pauses_at_the_read_ahead_and_resumes_at_half_of_it() {
        let (n, b) = (READ_AHEAD_RECORDS, READ_AHEAD_BYTES);
        assert!(!out_of_room((n - 1, b - 1), false));
        assert!(out_of_room((n, 0), false), "full of records");
        assert!(out_of_room((1, b), false), "full of bytes");
        assert!(
            out_of_room((n / 2 + 1, 0), true),
            "paused until half is free"
        );
        assert!(out_of_room((0, b / 2 + 1), true));
        assert!(!out_of_room((n / 2, b / 2), true));
    }

    #[test]
    fn the_next_poll_waits_for_room_briefly_and_for_a_due_retry_at_most() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(next_wait(false, false, None, now), ms(100));
        assert_eq!(next_wait(true, false, None, now), ms(5), "paused for room");
        assert_eq!(
            next_wait(false, true, None, now),
            COMMIT_INTERVAL.min(ms(100))
        );
        assert_eq!(next_wait(false, false, Some(now + ms(30)), now), ms(30));
        assert_eq!(next_wait(true, false, Some(now + ms(30)), now), ms(5));
        // A retry already due: poll without blocking.
        assert_eq!(next_wait(false, false, Some(now), now), Duration::ZERO);
    }
}
