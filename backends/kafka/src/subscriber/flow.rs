//! The driver's chores between polls: flow control (C6) and commits (C9).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::rebalance::SubContext;
use super::{COMMIT_INTERVAL, Phase, Shared, State, Tp};

impl Shared {
    /// The driver's chores between polls: release due retries, pause or resume
    /// fetching, commit. Returns how long the next poll may block, or `None` when
    /// the driver should stop.
    pub(super) fn chores(
        &self,
        consumer: &BaseConsumer<SubContext>,
        last_commit: &mut Instant,
    ) -> Option<Duration> {
        let mut state = self.lock();
        if matches!(state.phase, Phase::Stopping | Phase::Stopped) {
            return None;
        }
        let now = Instant::now();
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
            self.wake(&mut state);
        }
        // Flow control (C6): fetch only while there is room.
        let full = state.phase != Phase::Running
            || state.ready.len() + state.outstanding >= self.sub.prefetch as usize;
        // The steady state, with room and nothing paused, costs no set work
        // per record.
        let holding = state.held.iter().any(|p| p.holds_partition);
        if full || holding || !state.paused.is_empty() {
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
            if !pause.is_empty() && consumer.pause(&tpl(&pause)).is_ok() {
                state.paused.extend(pause);
            }
            if !resume.is_empty() && consumer.resume(&tpl(&resume)).is_ok() {
                for tp in &resume {
                    state.paused.remove(tp);
                }
            }
        }
        if state.dirty && last_commit.elapsed() >= COMMIT_INTERVAL {
            let positions = Self::positions(&mut state, None);
            state.dirty = false;
            *last_commit = Instant::now();
            drop(state);
            if positions.count() > 0
                && let Err(e) = consumer.commit(&positions, CommitMode::Async)
            {
                tracing::debug!(error = %e, "committing offsets failed; retried at the next commit");
            }
            state = self.lock();
        }
        // Paused for want of room: resumption waits on a settlement, which
        // does not wake `poll`, so poll briefly.
        let mut wait = if full && state.phase == Phase::Running {
            Duration::from_millis(5)
        } else {
            Duration::from_millis(100)
        };
        if state.dirty {
            wait = wait.min(COMMIT_INTERVAL);
        }
        if let Some(due) = next_due {
            wait = wait.min(due.saturating_duration_since(now));
        }
        Some(wait)
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
