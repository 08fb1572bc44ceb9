//! One group's queue: ready messages, delayed retries, and the unsettled
//! deliveries of each member (C2, C6, C7, C9).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;

use polybus_core::backend::{DeadLetter, Settlement, is_exhausted_on_receipt};
use polybus_core::retry::MAX_DELAY;
use polybus_core::{Error, Message, RetryPolicy, Topic};
use tokio::time::Instant;

/// A message in a group's queue.
#[derive(Clone)]
pub(crate) struct Entry {
    pub(crate) message: Arc<Message>,
    pub(crate) topic: Topic,
    /// The attempt number of this message's next delivery, from 1.
    pub(crate) attempt: u32,
    pub(crate) redelivered: bool,
}

impl Entry {
    pub(crate) fn new(message: Arc<Message>, topic: Topic) -> Self {
        Entry {
            message,
            topic,
            attempt: 1,
            redelivered: false,
        }
    }

    /// Handed back without settlement (its member left): it counts as an attempt,
    /// so a message that crashes every consumer still reaches its dead letter (C8).
    fn returned(mut self) -> Self {
        self.attempt += 1;
        self.redelivered = true;
        self
    }
}

struct Delayed {
    due: Instant,
    seq: u64,
    entry: Entry,
}

// Ordered so the BinaryHeap (a max-heap) pops the earliest due first, FIFO on ties.
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Delayed {}

struct Member {
    prefetch: usize,
    retry: RetryPolicy,
    unsettled: HashMap<u64, Entry>,
    waker: Option<Waker>,
    closing: bool,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Entry>,
    delayed: BinaryHeap<Delayed>,
    members: HashMap<u64, Member>,
    next_member: u64,
    next_tag: u64,
    next_delay_seq: u64,
    deleted: bool,
}

impl State {
    /// Deliver `entry` again after `delay`: at once, or from the delayed heap.
    fn retry_after(&mut self, entry: Entry, delay: Duration) {
        if delay == Duration::ZERO {
            self.ready.push_back(entry);
        } else {
            let seq = self.next_delay_seq;
            self.next_delay_seq += 1;
            let now = Instant::now();
            self.delayed.push(Delayed {
                // RetryPolicy caps delays at a week; this guards any other caller.
                due: now.checked_add(delay).unwrap_or(now + MAX_DELAY),
                seq,
                entry,
            });
        }
        self.wake_all();
    }

    fn wake_all(&mut self) {
        for member in self.members.values_mut() {
            if let Some(w) = member.waker.take() {
                w.wake();
            }
        }
    }
}

pub(crate) struct Group {
    name: String,
    durable: bool,
    state: Mutex<State>,
}

/// What a member's fetch found.
pub(crate) enum Fetch {
    Delivered(u64, Entry),
    /// Past its last attempt: to be dead-lettered, not delivered.
    Exhausted(Entry),
    /// Nothing to deliver now; retry at `Some(due)` if a delayed message waits.
    Pending(Option<Instant>),
    Closed,
}

/// What a member's leaving left to do.
#[derive(Default)]
pub(crate) struct Left {
    /// Entries past their last attempt, to dead-letter.
    pub(crate) exhausted: Vec<Entry>,
    /// The group is ephemeral and now empty: delete it.
    pub(crate) delete_group: bool,
}

/// The result of a settlement the group accepted.
pub(crate) struct Settled {
    /// Set for a dead letter: the entry and the reason.
    pub(crate) dead_letter: Option<(Entry, DeadLetter)>,
    /// The member is closing and waits to hear of each settlement.
    pub(crate) member_closing: bool,
}

impl Group {
    pub(crate) fn new(name: String, durable: bool) -> Self {
        Group {
            name,
            durable,
            state: Mutex::new(State::default()),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the queue consistent (every
        // mutation is a single push or pop), so recover rather than propagate.
        polybus_core::backend::lock(&self.state)
    }

    pub(crate) fn push(&self, entry: Entry) {
        let mut state = self.lock();
        if state.deleted {
            return;
        }
        state.ready.push_back(entry);
        state.wake_all();
    }

    pub(crate) fn join(&self, prefetch: u32, retry: RetryPolicy) -> u64 {
        let mut state = self.lock();
        let id = state.next_member;
        state.next_member += 1;
        state.members.insert(
            id,
            Member {
                prefetch: prefetch as usize,
                retry,
                unsettled: HashMap::new(),
                waker: None,
                closing: false,
            },
        );
        id
    }

    pub(crate) fn fetch(&self, member_id: u64, waker: &Waker) -> Fetch {
        let mut guard = self.lock();
        let state = &mut *guard;
        if state.deleted {
            return Fetch::Closed;
        }
        let Some(member) = state.members.get_mut(&member_id) else {
            return Fetch::Closed;
        };
        if member.closing {
            return Fetch::Closed;
        }
        // Read the clock only when a retry waits, not on every fetch.
        let now = (!state.delayed.is_empty()).then(Instant::now);
        while let Some(now) = now
            && state.delayed.peek().is_some_and(|d| d.due <= now)
        {
            let d = state.delayed.pop().expect("peeked");
            state.ready.push_back(d.entry);
        }
        if member.unsettled.len() < member.prefetch
            && let Some(entry) = state.ready.pop_front()
        {
            if is_exhausted_on_receipt(&member.retry, entry.attempt) {
                return Fetch::Exhausted(entry);
            }
            let tag = state.next_tag;
            state.next_tag += 1;
            member.unsettled.insert(tag, entry.clone());
            return Fetch::Delivered(tag, entry);
        }
        if !member.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            member.waker = Some(waker.clone());
        }
        // At capacity, only a settlement (which wakes us) can make room.
        let next_due = if member.unsettled.len() < member.prefetch {
            state.delayed.peek().map(|d| d.due)
        } else {
            None
        };
        Fetch::Pending(next_due)
    }

    pub(crate) fn settle(
        &self,
        member_id: u64,
        tag: u64,
        settlement: Settlement,
    ) -> Result<Settled, Error> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let member = state.members.get_mut(&member_id);
        let Some(mut entry) = member.and_then(|m| {
            let e = m.unsettled.remove(&tag)?;
            if let Some(w) = m.waker.take() {
                w.wake();
            }
            Some(e)
        }) else {
            return Err(Error::closed(format!(
                "delivery {tag} of group `{}` can no longer be settled: its subscription \
                 was closed and the message is redelivered",
                self.name
            )));
        };
        let member_closing = state.members.get(&member_id).is_some_and(|m| m.closing);
        let mut dead_letter = None;
        match settlement {
            Settlement::Ack => {}
            Settlement::Retry { delay } => {
                entry = Entry {
                    attempt: entry.attempt.saturating_add(1),
                    redelivered: true,
                    ..entry
                };
                state.retry_after(entry, delay);
            }
            Settlement::DeadLetter(why) => dead_letter = Some((entry, why)),
            // A settlement this backend does not know is a bug in the core; keep
            // the message rather than lose it.
            #[allow(unreachable_patterns)]
            _ => {
                state.ready.push_back(entry.returned());
                state.wake_all();
            }
        }
        Ok(Settled {
            dead_letter,
            member_closing,
        })
    }

    /// Stop handing deliveries to the member; wakes it so its stream ends.
    pub(crate) fn set_closing(&self, member_id: u64) {
        let mut state = self.lock();
        if let Some(m) = state.members.get_mut(&member_id) {
            m.closing = true;
            if let Some(w) = m.waker.take() {
                w.wake();
            }
        }
    }

    pub(crate) fn unsettled(&self, member_id: u64) -> usize {
        self.lock()
            .members
            .get(&member_id)
            .map_or(0, |m| m.unsettled.len())
    }

    /// Remove the member; its unsettled deliveries go back to the head of the queue,
    /// in their original order, marked redelivered, except those that have now used
    /// up the member's attempts, which are returned for dead-lettering (C8).
    pub(crate) fn leave(&self, member_id: u64) -> Left {
        let mut state = self.lock();
        let Some(member) = state.members.remove(&member_id) else {
            return Left::default();
        };
        let mut returned: Vec<(u64, Entry)> = member.unsettled.into_iter().collect();
        returned.sort_unstable_by_key(|(tag, _)| *tag);
        let mut exhausted = Vec::new();
        for (_, entry) in returned.into_iter().rev() {
            let entry = entry.returned();
            if is_exhausted_on_receipt(&member.retry, entry.attempt) {
                exhausted.push(entry);
            } else {
                state.ready.push_front(entry);
            }
        }
        exhausted.reverse();
        state.wake_all();
        let mut delete_group = false;
        if !self.durable && state.members.is_empty() {
            state.deleted = true;
            state.ready.clear();
            state.delayed.clear();
            delete_group = true;
        }
        Left {
            exhausted,
            delete_group,
        }
    }

    /// (ready, delayed, unsettled) counts.
    pub(crate) fn depth(&self) -> (usize, usize, usize) {
        let state = self.lock();
        let unsettled = state.members.values().map(|m| m.unsettled.len()).sum();
        (state.ready.len(), state.delayed.len(), unsettled)
    }
}
