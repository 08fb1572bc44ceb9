//! One group's queue: ready messages, delayed retries, and the unsettled
//! deliveries of each member (C2, C6, C7, C9).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;

use polybus_core::backend::{DeadLetter, Settlement, is_exhausted_on_receipt};
use polybus_core::retry::MAX_DELAY;
use polybus_core::{Error, Message, Overflow, RetryPolicy, Topic};

use crate::queue::Ready;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

/// A queued message: owned while only one group holds it, shared once fanned
/// out or handed to a consumer.
///
/// Owned matters for speed: the `Arc` is then made on the consumer's thread, at
/// hand-out, so publisher and consumer never free each other's allocations
/// (a cross-thread free takes the allocator's arena lock; profiled, it was a
/// sixth of the end-to-end time).
pub(crate) enum Body {
    Owned(Message),
    Shared(Arc<Message>),
}

impl Body {
    /// The message itself, for handing back to its publisher.
    pub(crate) fn into_message(self) -> Message {
        match self {
            Body::Owned(m) => m,
            Body::Shared(m) => Arc::unwrap_or_clone(m),
        }
    }

    /// The message as a delivery and the group's unsettled copy share it.
    pub(crate) fn into_arc(self) -> Arc<Message> {
        match self {
            Body::Shared(m) => m,
            Body::Owned(m) => Arc::new(m),
        }
    }
}

impl std::ops::Deref for Body {
    type Target = Message;
    fn deref(&self) -> &Message {
        match self {
            Body::Owned(m) => m,
            Body::Shared(m) => m,
        }
    }
}

/// A message in a group's queue.
pub(crate) struct Entry {
    pub(crate) message: Body,
    pub(crate) topic: Topic,
    /// The attempt number of this message's next delivery, from 1.
    pub(crate) attempt: u32,
    pub(crate) redelivered: bool,
}

impl Entry {
    pub(crate) fn new(message: Body, topic: Topic) -> Self {
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

/// A delivery in flight, as its member holds it: small, so keeping it and
/// settling it moves a few words, not a whole message.
pub(crate) struct Inflight {
    pub(crate) message: Arc<Message>,
    pub(crate) topic: Topic,
    pub(crate) attempt: u32,
    pub(crate) redelivered: bool,
}

impl Inflight {
    fn share(&self) -> Self {
        Inflight {
            message: self.message.clone(),
            topic: self.topic.clone(),
            attempt: self.attempt,
            redelivered: self.redelivered,
        }
    }

    pub(crate) fn into_entry(self) -> Entry {
        Entry {
            message: Body::Shared(self.message),
            topic: self.topic,
            attempt: self.attempt,
            redelivered: self.redelivered,
        }
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

/// How full a bounded group may get, and what a publish to a full one does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bound {
    pub(crate) max: usize,
    pub(crate) overflow: Overflow,
}

impl Bound {
    /// Publishers held back by a full group resume once it has drained to here,
    /// a quarter below the bound, so one consumed message does not wake every
    /// waiting publisher for one slot (RabbitMQ's credit flow resumes in blocks
    /// too).
    fn resume_at(&self) -> usize {
        self.max - self.max / 4
    }
}

/// A member's own state: its deliveries in flight, behind its own lock, so an
/// ack (the common settlement) never takes the group's lock that publishers
/// contend for.
pub(crate) struct Slot {
    prefetch: usize,
    retry: RetryPolicy,
    local: Mutex<Local>,
}

struct Local {
    /// The tag of `unsettled[0]`; tags count this member's deliveries from 0.
    base: u64,
    /// Deliveries in tag order; `None` once settled out of order. Tags are
    /// sequence numbers, so finding one is an index, not a hash lookup, and
    /// acks in order pop the front.
    unsettled: VecDeque<Option<Inflight>>,
    live: usize,
    /// The tag of the next delivery to hand out: from here to the end,
    /// `unsettled` holds messages fetched in a batch that no consumer has seen.
    handed: u64,
    /// Woken by a settlement while the member is at its prefetch.
    waker: Option<Waker>,
    closing: bool,
    left: bool,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, Local> {
        polybus_core::backend::lock(&self.local)
    }
}

impl Local {
    /// Fetched in a batch, not yet handed out.
    fn unseen(&self) -> usize {
        (self.base + self.unsettled.len() as u64 - self.handed) as usize
    }

    /// The next fetched message, handed to the consumer.
    fn hand_out(&mut self) -> Option<Fetch> {
        let i = usize::try_from(self.handed - self.base).ok()?;
        let inflight = self.unsettled.get(i)?.as_ref()?.share();
        let tag = self.handed;
        self.handed += 1;
        Some(Fetch::Delivered(tag, inflight))
    }
}

/// Most messages moved from a group to a member at once.
const BATCH: usize = 8;

struct Joined {
    slot: Arc<Slot>,
    /// Woken when a message becomes ready (or the group goes away).
    waker: Option<Waker>,
}

#[derive(Default)]
struct State {
    ready: Ready<Entry>,
    delayed: BinaryHeap<Delayed>,
    /// Few members per group: a vector beats a map.
    members: Vec<Joined>,
    next_delay_seq: u64,
    deleted: bool,
    /// The bound was reached: publishes wait (or are refused) until the group
    /// has drained to the bound's resume mark.
    full: bool,
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
        for member in &mut self.members {
            if let Some(w) = member.waker.take() {
                w.wake();
            }
        }
    }
}

pub(crate) struct Group {
    name: String,
    durable: bool,
    bound: Option<Bound>,
    state: Mutex<State>,
    /// Signalled when a full group has drained to its resume mark, or is deleted.
    room: Notify,
}

/// What a member's fetch found.
pub(crate) enum Fetch {
    Delivered(u64, Inflight),
    /// Nothing handed out, but the group may hold more: fetch again.
    Again,
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
    pub(crate) dead_letter: Option<(Inflight, DeadLetter)>,
    /// The member is closing and waits to hear of each settlement.
    pub(crate) member_closing: bool,
}

impl Group {
    pub(crate) fn new(name: String, durable: bool, bound: Option<Bound>) -> Self {
        Group {
            name,
            durable,
            bound,
            state: Mutex::new(State::default()),
            room: Notify::new(),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn bound(&self) -> Option<Bound> {
        self.bound
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the queue consistent (every
        // mutation is a single push or pop), so recover rather than propagate.
        polybus_core::backend::lock(&self.state)
    }

    /// Queue `entry` whatever the bound: retries, returns and dead letters are
    /// messages the broker already holds, never refused.
    pub(crate) fn push(&self, entry: Entry) {
        let mut state = self.lock();
        if state.deleted {
            return;
        }
        state.ready.push_back(entry);
        state.wake_all();
    }

    /// Queue a newly published `entry`, or hand it back if the group is full.
    // The error hands the message back by value, as `PublishError` does;
    // boxing it would allocate each time a full group turns a publish away.
    #[allow(clippy::result_large_err)]
    pub(crate) fn try_push(&self, entry: Entry) -> Result<(), Entry> {
        let mut state = self.lock();
        if state.deleted {
            return Ok(());
        }
        if self.at_bound(&mut state) {
            return Err(entry);
        }
        state.ready.push_back(entry);
        state.wake_all();
        Ok(())
    }

    /// Whether a publish now would find the group full.
    pub(crate) fn is_full(&self) -> bool {
        self.bound.is_some() && {
            let mut state = self.lock();
            !state.deleted && self.at_bound(&mut state)
        }
    }

    fn at_bound(&self, state: &mut State) -> bool {
        let Some(bound) = self.bound else {
            return false;
        };
        match bound.overflow {
            // Refused only while at the bound, as RabbitMQ's reject-publish.
            Overflow::RejectPublish => state.ready.len() >= bound.max,
            _ => {
                if !state.full && state.ready.len() >= bound.max {
                    state.full = true;
                }
                state.full
            }
        }
    }

    /// A future that completes when a full group may have room again; enable
    /// it before checking [`is_full`](Self::is_full), so no signal is missed.
    pub(crate) fn room(&self) -> Notified<'_> {
        self.room.notified()
    }

    /// After messages left `ready`: let waiting publishers go once it has
    /// drained to the resume mark.
    fn drained(&self, state: &mut State) {
        if state.full
            && let Some(bound) = self.bound
            && state.ready.len() <= bound.resume_at()
        {
            state.full = false;
            self.room.notify_waiters();
        }
    }

    pub(crate) fn join(&self, prefetch: u32, retry: RetryPolicy) -> Arc<Slot> {
        let mut state = self.lock();
        let slot = Arc::new(Slot {
            prefetch: prefetch as usize,
            retry,
            local: Mutex::new(Local {
                base: 0,
                unsettled: VecDeque::new(),
                live: 0,
                handed: 0,
                waker: None,
                closing: false,
                left: false,
            }),
        });
        state.members.push(Joined {
            slot: slot.clone(),
            waker: None,
        });
        slot
    }

    /// The member's next delivery. Messages move from the group to the member
    /// in batches (one lock of the group, which publishers contend for, serves
    /// many deliveries), within the member's prefetch, and wait in its slot
    /// until handed out; they count as delivered, as messages a RabbitMQ
    /// consumer has prefetched do. Entries found past their last attempt are
    /// left in `exhausted`, for the caller to dead-letter.
    pub(crate) fn fetch(
        &self,
        slot: &Arc<Slot>,
        waker: &Waker,
        exhausted: &mut Vec<Entry>,
    ) -> Fetch {
        let credit = {
            let mut local = slot.lock();
            if local.closing || local.left {
                return Fetch::Closed;
            }
            if let Some(delivered) = local.hand_out() {
                return delivered;
            }
            // At capacity, only a settlement (which wakes us) can make room.
            if local.live >= slot.prefetch {
                register(&mut local.waker, waker);
                return Fetch::Pending(None);
            }
            slot.prefetch - local.live
        };
        {
            let mut guard = self.lock();
            let state = &mut *guard;
            if state.deleted {
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
            if state.ready.is_empty() {
                if let Some(me) = state
                    .members
                    .iter_mut()
                    .find(|m| Arc::ptr_eq(&m.slot, slot))
                {
                    register(&mut me.waker, waker);
                }
                return Fetch::Pending(state.delayed.peek().map(|d| d.due));
            }
            // Each member's share of what is ready, so one member does not take
            // what its idle peers could be handling.
            let share = state.ready.len().div_ceil(state.members.len().max(1));
            let take = credit.min(BATCH).min(share);
            // Straight from the group to the member (group lock, then member
            // lock): a hop through a buffer outside the group's lock copied
            // every message once more and measured no faster.
            let mut local = slot.lock();
            for entry in std::iter::from_fn(|| state.ready.pop_front()).take(take) {
                if is_exhausted_on_receipt(&slot.retry, entry.attempt) {
                    exhausted.push(entry);
                    continue;
                }
                local.unsettled.push_back(Some(Inflight {
                    message: entry.message.into_arc(),
                    topic: entry.topic,
                    attempt: entry.attempt,
                    redelivered: entry.redelivered,
                }));
                local.live += 1;
            }
            self.drained(state);
            local.hand_out().unwrap_or(Fetch::Again)
        }
    }

    /// Give the member's fetched but not yet handed out messages back to the
    /// head of the queue, unmarked: no consumer saw them (C10).
    pub(crate) fn give_back(&self, slot: &Arc<Slot>) {
        let mut state = self.lock();
        let mut local = slot.lock();
        let unseen = local.unseen();
        let kept = local.unsettled.len() - unseen;
        for inflight in local.unsettled.drain(kept..).rev().flatten() {
            state.ready.push_front(inflight.into_entry());
        }
        local.live -= unseen;
        if unseen > 0 {
            state.wake_all();
        }
    }

    pub(crate) fn settle(
        &self,
        slot: &Slot,
        tag: u64,
        settlement: Settlement,
    ) -> Result<Settled, Error> {
        let (inflight, member_closing) = {
            let mut guard = slot.lock();
            let local = &mut *guard;
            // Only tags handed out can be settled; settled ones left `None`.
            let entry = if (local.base..local.handed).contains(&tag) {
                let i = (tag - local.base) as usize;
                local.unsettled.get_mut(i).and_then(Option::take)
            } else {
                None
            };
            let Some(entry) = entry else {
                return Err(Error::closed(format!(
                    "delivery {tag} of group `{}` can no longer be settled: its subscription \
                     was closed and the message is redelivered",
                    self.name
                )));
            };
            local.live -= 1;
            while local.unsettled.front().is_some_and(Option::is_none) {
                local.unsettled.pop_front();
                local.base += 1;
            }
            if let Some(w) = local.waker.take() {
                w.wake();
            }
            (entry, local.closing)
        };
        let mut dead_letter = None;
        match settlement {
            Settlement::Ack => {}
            Settlement::Retry { delay } => self.hold_back(inflight.into_entry().returned(), delay),
            Settlement::DeadLetter(why) => dead_letter = Some((inflight, why)),
            // An early scheduled message: held back as the same attempt.
            Settlement::Defer { delay } => self.hold_back(inflight.into_entry(), delay),
            // A settlement this backend does not know is a bug in the core; keep
            // the message rather than lose it.
            #[allow(unreachable_patterns)]
            _ => self.push(inflight.into_entry().returned()),
        }
        Ok(Settled {
            dead_letter,
            member_closing,
        })
    }

    /// Keep `entry` back for `delay`, unless the group is gone.
    fn hold_back(&self, entry: Entry, delay: Duration) {
        let mut state = self.lock();
        if !state.deleted {
            state.retry_after(entry, delay);
        }
    }

    /// Stop handing deliveries to the member; wakes it so its stream ends.
    pub(crate) fn set_closing(&self, slot: &Arc<Slot>) {
        let mut state = self.lock();
        if let Some(me) = state
            .members
            .iter_mut()
            .find(|m| Arc::ptr_eq(&m.slot, slot))
            && let Some(w) = me.waker.take()
        {
            w.wake();
        }
        let mut local = slot.lock();
        local.closing = true;
        if let Some(w) = local.waker.take() {
            w.wake();
        }
    }

    /// Deliveries handed out and not settled yet.
    pub(crate) fn unsettled(&self, slot: &Slot) -> usize {
        let local = slot.lock();
        local.live - local.unseen()
    }

    /// Remove the member; its unsettled deliveries go back to the head of the queue,
    /// in their original order, marked redelivered, except those that have now used
    /// up the member's attempts, which are returned for dead-lettering (C8). Those
    /// it fetched but never handed out go back as they were.
    pub(crate) fn leave(&self, slot: &Arc<Slot>) -> Left {
        let mut state = self.lock();
        let Some(at) = state
            .members
            .iter()
            .position(|m| Arc::ptr_eq(&m.slot, slot))
        else {
            return Left::default();
        };
        state.members.swap_remove(at);
        let (returned, handed) = {
            let mut local = slot.lock();
            local.left = true;
            local.live = 0;
            let base = local.base;
            (std::mem::take(&mut local.unsettled), local.handed - base)
        };
        let mut exhausted = Vec::new();
        for (i, inflight) in returned.into_iter().enumerate().rev() {
            let Some(inflight) = inflight else { continue };
            let entry = if (i as u64) < handed {
                inflight.into_entry().returned()
            } else {
                inflight.into_entry()
            };
            if is_exhausted_on_receipt(&slot.retry, entry.attempt) {
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
            state.full = false;
            // Publishers waiting for room find the group gone: their messages
            // are dropped as unroutable ones are.
            self.room.notify_waiters();
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
        let unsettled = state.members.iter().map(|m| m.slot.lock().live).sum();
        (state.ready.len(), state.delayed.len(), unsettled)
    }
}

/// Keep `waker` in `slot`, cloning only when it would wake another task.
fn register(slot: &mut Option<Waker>, waker: &Waker) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
        *slot = Some(waker.clone());
    }
}
