//! A subscription: one Kafka consumer in the subscription's consumer group,
//! driven by a thread of its own.
//!
//! Why a thread: librdkafka runs the rebalance callback inside `poll`, and that
//! callback must make blocking calls (committed offsets, watermarks, a
//! synchronous commit) before it hands the assignment back. A dedicated thread
//! keeps those off the async runtime.
//!
//! The thread polls records into a small `ready` buffer; the stream hands them
//! out. Fetching is paused whenever buffered plus unsettled deliveries reach the
//! prefetch (C6), so nothing is buffered without bound. Each partition tracks its
//! unsettled offsets, and only the lowest unsettled offset is committed (C9).
//! The commit's metadata records which record at that offset was handed out,
//! and as which attempt, so the next owner of the partition counts a crash as an
//! attempt (C8).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use polybus_core::topic::Segment;
use polybus_core::{
    Acker, Delivery, DeliverySource, Error, Kind, Message, Pattern, Result, RetryPolicy,
    SettleFuture, Settlement, StartFrom, Topic, TopicCache, ValidSubscription, async_trait, header,
};
use rdkafka::ClientContext;
use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use tokio::runtime::Handle;
use tokio::sync::{Notify, oneshot};

use crate::connection::{Connector, kafka_error};
use crate::mapping;

/// The prefix of each durable group's retry topic.
pub(crate) const RETRY_PREFIX: &str = "polybus.retry";
/// Broker calls made inside the rebalance callback wait at most this long.
const REBALANCE_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often settled offsets are committed while records flow.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// The version of the commit metadata format below.
const METADATA_TAG: &str = "polybus1";

/// A topic partition. Its topic is shared (see `State::topics`), so a record
/// from the same topic as the one before it costs no allocation.
type Tp = (Topic, i32);

/// A regular expression (librdkafka's dialect: POSIX-like, no look-around) that
/// matches exactly the topics `pattern` matches, leaving aside the reserved
/// `polybus.` namespace, which records are filtered by on receipt.
pub(crate) fn regex(pattern: &Pattern) -> String {
    const WORD: &str = "[-A-Za-z0-9_]+";
    // `#.#` means what `#` means; collapsing runs keeps the translation simple.
    let mut segs: Vec<&Segment> = Vec::new();
    for s in pattern.segments() {
        if !(matches!(s, Segment::Hash) && matches!(segs.last(), Some(Segment::Hash))) {
            segs.push(s);
        }
    }
    let mut out = String::from("^");
    if let [Segment::Hash] = segs[..] {
        out.push_str(&format!("{WORD}(\\.{WORD})*$"));
        return out;
    }
    for (i, seg) in segs.iter().enumerate() {
        let after_leading_hash = i == 1 && matches!(segs[0], Segment::Hash);
        match seg {
            // A leading `#` takes its dot with each word: `(w\.)*`.
            Segment::Hash if i == 0 => out.push_str(&format!("({WORD}\\.)*")),
            // Any other `#` takes the dot before each word: `(\.w)*`.
            Segment::Hash => out.push_str(&format!("(\\.{WORD})*")),
            word => {
                if i > 0 && !after_leading_hash {
                    out.push_str("\\.");
                }
                match word {
                    Segment::Word(w) => out.push_str(&w.replace('-', "\\-")),
                    _ => out.push_str(WORD),
                }
            }
        }
    }
    out.push('$');
    out
}

/// What a subscription's pieces share: its options, the records in flight, and
/// the bookkeeping of its partitions.
pub(crate) struct Shared {
    pub(crate) connector: Arc<Connector>,
    pub(crate) sub: ValidSubscription,
    /// The group's retry topic (durable groups; private ones retry in memory).
    pub(crate) retry_topic: Option<String>,
    /// Matching topics that existed when the subscription was made: a partition of
    /// one of these without a committed offset starts at its end ("now", C3);
    /// topics created later are read from their beginning.
    known: HashSet<String>,
    /// Partitions of the retry topic.
    retry_partitions: i32,
    state: Mutex<State>,
    /// Signalled on every settlement and when the driver stops.
    changed: Notify,
    rt: Handle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// `close` was called: hand nothing more out, wait for settlements.
    Draining,
    /// Closed or dropped: the driver leaves the group; late settlements fail.
    Stopping,
    Stopped,
}

struct State {
    parts: HashMap<Tp, Part>,
    next_epoch: u64,
    /// Records due for delivery, not yet handed out.
    ready: VecDeque<Pending>,
    /// Records waiting for their retry delay.
    held: Vec<Pending>,
    /// Handed out and not yet settled.
    outstanding: usize,
    paused: HashSet<Tp>,
    dirty: bool,
    waker: Option<Waker>,
    assigned: bool,
    phase: Phase,
    /// Names of the topics records come from.
    topics: TopicCache,
    /// Names of the topics retried copies were first published to.
    origins: TopicCache,
}

/// One assigned partition.
struct Part {
    /// Changes with every assignment, so deliveries of a revoked partition fail.
    epoch: u64,
    /// The offset after the last record received.
    next: i64,
    /// Received and not settled, by offset.
    unsettled: BTreeMap<i64, Slot>,
    /// What the last owner recorded: the record at `head` was handed out as
    /// attempt `attempt`, and records up to `through` were handed out too.
    prior: Option<Prior>,
    /// The last position committed, with its metadata.
    committed: (i64, String),
}

/// A received, unsettled record.
#[derive(Default)]
struct Slot {
    /// What was handed out, as which attempt; `None` while buffered.
    handed: Option<(Arc<Message>, Topic, u32)>,
}

impl Slot {
    fn attempt(&self) -> u32 {
        self.handed.as_ref().map_or(0, |h| h.2)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Prior {
    head: i64,
    attempt: u32,
    through: i64,
}

impl Prior {
    fn encode(&self) -> String {
        format!(
            "{METADATA_TAG}:{}:{}:{}",
            self.head, self.attempt, self.through
        )
    }

    fn decode(metadata: &str, committed: i64) -> Option<Prior> {
        let mut it = metadata.strip_prefix(METADATA_TAG)?.split(':').skip(1);
        let head = it.next()?.parse().ok()?;
        let attempt = it.next()?.parse().ok()?;
        let through = it.next()?.parse().ok()?;
        (head == committed).then_some(Prior {
            head,
            attempt,
            through,
        })
    }
}

impl Part {
    /// Where the group resumes: the lowest unsettled offset, or past everything.
    fn position(&self) -> (i64, String) {
        match self.unsettled.first_key_value() {
            Some((&head, slot)) if slot.attempt() > 0 => {
                let attempt = slot.attempt();
                let through = self
                    .unsettled
                    .iter()
                    .rev()
                    .find(|(_, s)| s.attempt() > 0)
                    .map_or(head, |(o, _)| *o);
                let prior = Prior {
                    head,
                    attempt,
                    through,
                };
                (head, prior.encode())
            }
            Some((&head, _)) => (head, String::new()),
            None => (self.next, String::new()),
        }
    }
}

/// One delivery of a record: where it sits, in which assignment, and what it
/// carries. A pending record and the acker of a handed-out one both hold it.
struct Record {
    tp: Tp,
    offset: i64,
    epoch: u64,
    message: Arc<Message>,
    topic: Topic,
    attempt: u32,
}

/// A record on its way to the subscriber.
struct Pending {
    record: Record,
    redelivered: bool,
    due: Option<Instant>,
    /// Whether its partition is paused until it is due (retry-topic copies).
    holds_partition: bool,
}

impl Shared {
    pub(crate) fn new(
        connector: Arc<Connector>,
        sub: ValidSubscription,
        known: HashSet<String>,
        retry_partitions: i32,
    ) -> Arc<Self> {
        let retry_topic = sub.durable.then(|| format!("{RETRY_PREFIX}.{}", sub.group));
        Arc::new(Shared {
            connector,
            sub,
            retry_topic,
            known,
            retry_partitions,
            state: Mutex::new(State {
                parts: HashMap::new(),
                next_epoch: 1,
                ready: VecDeque::new(),
                held: Vec::new(),
                outstanding: 0,
                paused: HashSet::new(),
                dirty: false,
                waker: None,
                assigned: false,
                phase: Phase::Running,
                topics: TopicCache::default(),
                origins: TopicCache::default(),
            }),
            changed: Notify::new(),
            rt: Handle::current(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain bookkeeping behind; carry on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self, state: &mut State) {
        if let Some(w) = state.waker.take() {
            w.wake();
        }
    }

    /// A record from the broker.
    fn on_record(self: &Arc<Self>, record: &BorrowedMessage<'_>) {
        let offset = record.offset();
        let from_retry = self.retry_topic.as_deref() == Some(record.topic());
        // The regex cannot leave out the reserved namespace; the matcher can.
        let skip = !from_retry && !self.sub.matches(record.topic());
        let received = (!skip).then(|| mapping::receive(record));
        let mut state = self.lock();
        let State {
            parts,
            ready,
            held,
            dirty,
            topics,
            origins,
            ..
        } = &mut *state;
        let tp: Tp = (topics.topic(record.topic()), record.partition());
        let Some(part) = parts.get_mut(&tp) else {
            return; // revoked while it was in flight
        };
        part.next = offset + 1;
        let Some(r) = received else {
            *dirty = true;
            return;
        };
        let topic = match (&r.topic, from_retry) {
            (Some(t), true) => origins.topic(t),
            _ => tp.0.clone(),
        };
        let mut attempt = r.attempt;
        let mut redelivered = attempt > 1;
        if let Some(prior) = part.prior {
            if offset == prior.head {
                attempt = attempt.max(prior.attempt + 1);
                redelivered = true;
            } else if offset <= prior.through {
                attempt += 1;
                redelivered = true;
            }
        }
        part.unsettled.insert(offset, Slot::default());
        let pending = Pending {
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
        };
        if attempt > self.sub.retry.attempts() {
            // Exhausted by crashes: dead-letter on receipt, never hand it out.
            drop(state);
            self.dead_letter_on_receipt(pending.record);
            return;
        }
        if pending.due.is_some_and(|d| d > Instant::now()) {
            held.push(pending);
        } else {
            ready.push_back(pending);
            self.wake(&mut state);
        }
    }

    fn dead_letter_on_receipt(self: &Arc<Shared>, p: Record) {
        let attempts = p.attempt - 1;
        let dead = p.message.dead_lettered(
            p.topic.as_str(),
            attempts,
            &format!("gave up after {attempts} attempts"),
            &self.sub.group,
        );
        let connector = self.connector.clone();
        let store = self.sub.dead_letter_topic.as_str().to_owned();
        let shared = self.clone();
        self.rt.spawn(async move {
            match connector.produce(&store, &dead, &[]).await {
                Ok(_) => {
                    shared.finish(&p.tp, p.offset, p.epoch, false);
                }
                Err((e, _)) => tracing::warn!(
                    error = %e,
                    "dead-lettering an exhausted message failed; it is read again after the next rebalance"
                ),
            }
        });
    }

    /// Whether a delivery of generation `epoch` from `tp` can still be settled.
    fn valid(state: &State, tp: &Tp, epoch: u64) -> bool {
        matches!(state.phase, Phase::Running | Phase::Draining)
            && state.parts.get(tp).is_some_and(|p| p.epoch == epoch)
    }

    fn closed_error() -> Error {
        Error::closed(
            "cannot settle: the subscription was closed or its partition was reassigned; \
             the message will be delivered again",
        )
    }

    /// A delivery is settled: its offset may be committed. `handed_out` says
    /// whether it counted against the prefetch.
    fn finish(&self, tp: &Tp, offset: i64, epoch: u64, handed_out: bool) -> bool {
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
    fn hold_again(&self, d: &Record, attempt: u32, delay: Duration) -> bool {
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
            // The commit metadata now records this hand-out (see `Prior`).
            state.dirty = true;
            let (message, topic, attempt) = (p.message.clone(), p.topic.clone(), p.attempt);
            let acker = KafkaAcker {
                shared: self.clone(),
                record: p,
            };
            return Poll::Ready(Some(Ok(Delivery::new(
                message,
                topic,
                attempt,
                redelivered,
                Box::new(acker),
            ))));
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The driver's chores between polls: release due retries, pause or resume
    /// fetching, commit. Returns how long the next poll may block, or `None` when
    /// the driver should stop.
    fn chores(
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
    fn positions(state: &mut State, only: Option<&HashSet<Tp>>) -> TopicPartitionList {
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

    /// The rebalance callback's assignment: resolve where each partition starts,
    /// commit the starts the group did not have yet (so a new group's "now" is
    /// kept while no member runs), then assign.
    fn assign(&self, consumer: &BaseConsumer<SubContext>, offered: &TopicPartitionList) {
        // Ask for the retry topic's offsets too: a durable group commits them at
        // its very first assignment, so their absence means the group is new.
        let mut asked = offered.clone();
        if let Some(t) = &self.retry_topic {
            for p in 0..self.retry_partitions {
                if asked.find_partition(t, p).is_none() {
                    asked.add_partition(t, p);
                }
            }
        }
        let committed = match consumer.committed_offsets(asked, REBALANCE_CALL_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reading committed offsets failed; resuming from the broker's reset policy");
                offered.clone()
            }
        };
        let group_is_new = match &self.retry_topic {
            Some(t) => !committed
                .elements_for_topic(t)
                .iter()
                .any(|e| matches!(e.offset(), Offset::Offset(o) if o >= 0)),
            None => !self.lock().assigned,
        };
        let mut assignment = TopicPartitionList::new();
        let mut fresh = TopicPartitionList::new();
        let mut parts = Vec::new();
        for elem in committed.elements() {
            if offered
                .find_partition(elem.topic(), elem.partition())
                .is_none()
            {
                continue;
            }
            let (topic, partition) = (elem.topic().to_owned(), elem.partition());
            let (start, prior) = match elem.offset() {
                Offset::Offset(o) if o >= 0 => (o, Prior::decode(elem.metadata(), o)),
                _ => {
                    let (low, high) = consumer
                        .fetch_watermarks(&topic, partition, REBALANCE_CALL_TIMEOUT)
                        .unwrap_or((0, 0));
                    // A new group starts at the end of what it found ("now", C3);
                    // a partition an older group has never read appeared after
                    // the group began, so all of it is news to the group.
                    let from_start = self.sub.start == StartFrom::Earliest
                        || Topic::is_reserved(&topic)
                        || !group_is_new
                        || !self.known.contains(&topic);
                    let start = if from_start { low } else { high };
                    let _ = fresh.add_partition_offset(&topic, partition, Offset::Offset(start));
                    (start, None)
                }
            };
            let _ = assignment.add_partition_offset(&topic, partition, Offset::Offset(start));
            parts.push(((topic, partition), start, prior));
        }
        if fresh.count() > 0
            && let Err(e) = consumer.commit(&fresh, CommitMode::Sync)
        {
            tracing::warn!(error = %e, "committing a new group's starting offsets failed");
        }
        let assigned = if cooperative(consumer) {
            consumer.incremental_assign(&assignment)
        } else {
            consumer.assign(&assignment)
        };
        if let Err(e) = assigned {
            tracing::warn!(error = %e, "assigning partitions failed");
        }
        // librdkafka keeps a partition's pause across a revocation and a new
        // assignment (librdkafka#1849), but the flow control below starts each
        // assigned partition unpaused: resume them, or a partition paused for
        // want of room before a rebalance (a broker restart) stays paused for
        // good. `chores` pauses again if there is still no room.
        if assignment.count() > 0
            && let Err(e) = consumer.resume(&assignment)
        {
            tracing::warn!(error = %e, "resuming newly assigned partitions failed");
        }
        let mut state = self.lock();
        for ((topic, partition), start, prior) in parts {
            let tp: Tp = (state.topics.topic(&topic), partition);
            let epoch = state.next_epoch;
            state.next_epoch += 1;
            state.paused.remove(&tp);
            state.parts.insert(
                tp,
                Part {
                    epoch,
                    next: start,
                    unsettled: BTreeMap::new(),
                    prior,
                    committed: (start, String::new()),
                },
            );
        }
        state.assigned = true;
        drop(state);
        self.changed.notify_waiters();
    }

    /// Deliveries still handed out when their partitions go (a rebalance, a
    /// close past its grace, a dropped stream) count as an attempt, as on
    /// RabbitMQ: a durable group copies them to its retry topic with the attempt
    /// raised and commits past them, so a crash loop reaches the dead-letter
    /// topic (C8). Blocking, in the driver thread; bounded by the prefetch.
    fn hand_back(&self, gone: &HashSet<Tp>, lost: bool) {
        let Some(retry_topic) = self.retry_topic.as_deref() else {
            return; // a private group ends with its subscription
        };
        if lost {
            return; // the group has moved on: the new owner reads them again
        }
        let handed: Vec<(Tp, i64, Arc<Message>, Topic, u32)> = {
            let state = self.lock();
            gone.iter()
                .filter_map(|tp| state.parts.get(tp).map(|p| (tp, p)))
                .flat_map(|(tp, part)| {
                    part.unsettled.iter().filter_map(move |(offset, slot)| {
                        let (m, t, a) = slot.handed.as_ref()?;
                        Some((tp.clone(), *offset, m.clone(), t.clone(), *a))
                    })
                })
                .collect()
        };
        if handed.is_empty() {
            return;
        }
        let now = millis_from_now(Duration::ZERO).to_string();
        let sends: Vec<_> = handed
            .iter()
            .map(|(_, _, message, topic, attempt)| {
                let extra = [
                    (header::ATTEMPT, (attempt + 1).to_string()),
                    (mapping::TOPIC, topic.as_str().to_owned()),
                    (mapping::DUE_MS, now.clone()),
                ];
                self.connector.send_now(retry_topic, message, &extra)
            })
            .collect();
        let reports = futures::executor::block_on(futures::future::join_all(
            sends.into_iter().map(|s| async move {
                match s {
                    Ok(future) => matches!(future.await, Ok(Ok(_))),
                    Err(_) => false,
                }
            }),
        ));
        let mut state = self.lock();
        for ((tp, offset, ..), moved) in handed.iter().zip(reports) {
            if moved && let Some(part) = state.parts.get_mut(tp) {
                part.unsettled.remove(offset);
            }
        }
    }

    /// The rebalance callback's revocation: commit what is settled (C9), then
    /// forget the partitions, so their deliveries fail to settle.
    fn revoke(&self, consumer: &BaseConsumer<SubContext>, revoked: &TopicPartitionList) {
        let gone: HashSet<Tp> = revoked
            .elements()
            .iter()
            .map(|e| (Topic::from_broker(e.topic()), e.partition()))
            .collect();
        self.hand_back(&gone, consumer.assignment_lost());
        let mut state = self.lock();
        let positions = Self::positions(&mut state, Some(&gone));
        for tp in &gone {
            state.parts.remove(tp);
            state.paused.remove(tp);
        }
        state.ready.retain(|p| !gone.contains(&p.record.tp));
        state.held.retain(|p| !gone.contains(&p.record.tp));
        drop(state);
        if positions.count() > 0
            && !consumer.assignment_lost()
            && let Err(e) = consumer.commit(&positions, CommitMode::Sync)
        {
            tracing::warn!(error = %e, "committing offsets of revoked partitions failed; they are read again from the last commit");
        }
        let unassigned = if cooperative(consumer) {
            consumer.incremental_unassign(revoked)
        } else {
            consumer.unassign()
        };
        if let Err(e) = unassigned {
            tracing::warn!(error = %e, "unassigning partitions failed");
        }
        self.changed.notify_waiters();
    }
}

fn cooperative(consumer: &BaseConsumer<SubContext>) -> bool {
    matches!(
        consumer.rebalance_protocol(),
        rdkafka::consumer::RebalanceProtocol::Cooperative
    )
}

fn tpl(tps: &[Tp]) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for (t, p) in tps {
        list.add_partition(t.as_str(), *p);
    }
    list
}

fn instant_of(due_ms: u64) -> Option<Instant> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_millis() as u64;
    Some(Instant::now() + Duration::from_millis(due_ms.saturating_sub(now_ms)))
}

fn millis_from_now(delay: Duration) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // Rounded up: a retry is never due before its delay has passed.
    (now + delay).as_millis() as u64 + 1
}

/// The consumer's context: routes librdkafka's rebalance callback to [`Shared`].
pub(crate) struct SubContext {
    shared: Arc<Shared>,
}

impl ClientContext for SubContext {}

impl ConsumerContext for SubContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.shared.assign(consumer, tpl)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.shared.revoke(consumer, tpl)
            }
            other => {
                tracing::warn!(error = ?other, "rebalance failed; leaving the assignment");
                self.shared.revoke(consumer, tpl);
            }
        }
    }
}

/// Open a subscription: make its topics, join its group, and return once the
/// group has assigned this member its partitions (C3).
pub(crate) async fn open(connector: Arc<Connector>, sub: ValidSubscription) -> Result<KafkaSource> {
    // Literal topics, the dead-letter store and the retry topic exist before the
    // group joins, so the first assignment already covers them.
    for p in sub.patterns.iter().filter(|p| p.is_literal()) {
        connector.ensure_topic(p.as_str()).await?;
    }
    connector
        .ensure_topic(sub.dead_letter_topic.as_str())
        .await?;
    let retry_topic = sub.durable.then(|| format!("{RETRY_PREFIX}.{}", sub.group));
    if let Some(t) = &retry_topic {
        Topic::new(t).map_err(|e| {
            Error::invalid_input(format!(
                "group `{}` is too long for its retry topic: {e}",
                sub.group
            ))
        })?;
        connector.ensure_topic(t).await?;
    }
    let probe = connector.producer.clone();
    let timeout = connector.options.connect_timeout;
    let metadata = tokio::task::spawn_blocking(move || {
        rdkafka::producer::Producer::client(&probe).fetch_metadata(None, timeout)
    })
    .await
    .map_err(|e| Error::new(Kind::Other, format!("metadata lookup panicked: {e}")))?
    .map_err(|e| kafka_error("cannot list topics".into(), e))?;
    let known: HashSet<String> = metadata
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|t| sub.matches(t))
        .collect();
    let retry_partitions = retry_topic.as_ref().map_or(0, |r| {
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == r)
            .map_or(connector.options.partitions, |t| {
                t.partitions().len() as i32
            })
    });
    // With no topic to join for yet, librdkafka does not join the group until a
    // matching topic appears; such a topic is read from its start, so the
    // subscription is live already.
    let nothing_to_join = known.is_empty() && retry_topic.is_none();
    let mut topics: Vec<String> = sub
        .patterns
        .iter()
        .map(|p| {
            if p.is_literal() {
                p.as_str().to_owned()
            } else {
                regex(p)
            }
        })
        .collect();
    topics.extend(retry_topic.iter().cloned());
    let options = &connector.options;
    let config = Connector::config(
        options,
        &[
            ("group.id", sub.group.clone()),
            ("enable.auto.commit", "false".into()),
            ("enable.auto.offset.store", "false".into()),
            ("auto.offset.reset", "earliest".into()),
            ("allow.auto.create.topics", "false".into()),
            // New topics matching a pattern are found within a second.
            ("topic.metadata.refresh.interval.ms", "1000".into()),
            // Rebalances finish quickly when members heartbeat often.
            ("heartbeat.interval.ms", "500".into()),
            // The assignment strategy stays librdkafka's eager default (range,
            // roundrobin), which splits each topic among the members. The
            // incremental cooperative-sticky strategy balances partition counts
            // across all topics together: tried here, it gave one member every
            // partition of the group's topic and the other only the retry topic.
            //
            // Known librdkafka bug (confluentinc/librdkafka#5573, fixed in 2.16;
            // rdkafka 0.39 bundles 2.12.1): a partition removed, re-added and
            // removed again before its first fetcher stop is acknowledged aborts
            // the process (`rd_kafka_assignment_partition_stopped: Assertion
            // rktp->rktp_started failed`). Seen here only in rebalance storms,
            // when many members of killed test processes expired at once.
            ("session.timeout.ms", "10000".into()),
            ("fetch.wait.max.ms", "100".into()),
        ],
    );
    let shared = Shared::new(connector.clone(), sub, known, retry_partitions);
    let consumer: BaseConsumer<SubContext> = config
        .create_with_context(SubContext {
            shared: shared.clone(),
        })
        .map_err(|e| Error::invalid_input(format!("invalid kafka consumer configuration: {e}")))?;
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&refs)
        .map_err(|e| kafka_error("cannot subscribe".into(), e))?;
    let (done_tx, done_rx) = oneshot::channel();
    let driver_shared = shared.clone();
    std::thread::Builder::new()
        .name(format!("polybus-kafka-{}", shared.sub.group))
        .spawn(move || drive(consumer, driver_shared, done_tx))
        .map_err(|e| {
            Error::new(
                Kind::Other,
                format!("cannot start the consumer thread: {e}"),
            )
        })?;
    let source = KafkaSource {
        shared: shared.clone(),
        done: Some(done_rx),
    };
    let deadline = tokio::time::Instant::now() + options.subscribe_timeout;
    loop {
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if nothing_to_join || shared.lock().assigned {
            return Ok(source);
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            return Err(Error::new(
                Kind::Timeout,
                format!(
                    "group `{}` assigned no partitions within {} ms",
                    shared.sub.group,
                    options.subscribe_timeout.as_millis()
                ),
            ));
        }
    }
}

/// The driver thread: poll, chores, and on stop, leave the group (the
/// revocation commits what is settled).
fn drive(consumer: BaseConsumer<SubContext>, shared: Arc<Shared>, done: oneshot::Sender<()>) {
    let mut last_commit = Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        match consumer.poll(wait) {
            Some(Ok(record)) => shared.on_record(&record),
            Some(Err(e)) => log_consumer_error(&e),
            None => {}
        }
        match shared.chores(&consumer, &mut last_commit) {
            Some(w) => wait = w,
            None => break,
        }
    }
    // Dropping the consumer closes it: the revocation callback commits, and the
    // member leaves the group, so the others rebalance at once.
    drop(consumer);
    shared.lock().phase = Phase::Stopped;
    shared.changed.notify_waiters();
    let _ = done.send(());
}

fn log_consumer_error(e: &KafkaError) {
    // librdkafka reconnects by itself (C11); these are reports, not ends.
    tracing::debug!(error = %e, "kafka consumer reported an error");
}

/// The stream side of a subscription.
pub(crate) struct KafkaSource {
    shared: Arc<Shared>,
    done: Option<oneshot::Receiver<()>>,
}

#[async_trait]
impl DeliverySource for KafkaSource {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Delivery>>> {
        self.shared.poll_delivery(cx)
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
        loop {
            let changed = shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if shared.lock().outstanding == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
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

/// The settling half of one delivery.
struct KafkaAcker {
    shared: Arc<Shared>,
    record: Record,
}

impl KafkaAcker {
    fn still_valid(&self) -> bool {
        Shared::valid(&self.shared.lock(), &self.record.tp, self.record.epoch)
    }

    fn finish(&self) -> Result<()> {
        if self
            .shared
            .finish(&self.record.tp, self.record.offset, self.record.epoch, true)
        {
            Ok(())
        } else {
            Err(Shared::closed_error())
        }
    }

    /// Produce `message` to `topic` on the group's behalf; on failure, keep the
    /// delivery in memory for another attempt, so nothing is lost.
    async fn move_to(
        &self,
        topic: &str,
        message: &Message,
        extra: &[(&str, String)],
    ) -> Result<()> {
        if !self.still_valid() {
            self.shared
                .finish(&self.record.tp, self.record.offset, self.record.epoch, true);
            return Err(Shared::closed_error());
        }
        match self.shared.connector.produce(topic, message, extra).await {
            Ok(_) => self.finish(),
            Err((e, _)) => {
                let delay = self.shared.sub.retry.first_delay();
                self.shared
                    .hold_again(&self.record, self.record.attempt, delay);
                Err(e)
            }
        }
    }

    /// Any settlement, waiting where one must: a retry or dead letter produces a
    /// copy and waits for its delivery report.
    async fn settle_later(self: Box<Self>, settlement: Settlement) -> Result<()> {
        match settlement {
            Settlement::Ack => self.finish(),
            Settlement::Retry { delay } => match &self.shared.retry_topic {
                // Durable groups: a copy on the retry topic, due after the delay;
                // the partition moves on (C7), and the copy survives restarts.
                Some(retry_topic) => {
                    let extra = [
                        (header::ATTEMPT, (self.record.attempt + 1).to_string()),
                        (mapping::TOPIC, self.record.topic.as_str().to_owned()),
                        (mapping::DUE_MS, millis_from_now(delay).to_string()),
                    ];
                    self.move_to(retry_topic, &self.record.message, &extra)
                        .await
                }
                // Private groups end with their subscription: retry in memory.
                None => {
                    if self
                        .shared
                        .hold_again(&self.record, self.record.attempt + 1, delay)
                    {
                        Ok(())
                    } else {
                        Err(Shared::closed_error())
                    }
                }
            },
            Settlement::DeadLetter { reason } => {
                let dead = self.record.message.dead_lettered(
                    self.record.topic.as_str(),
                    self.record.attempt,
                    &reason,
                    &self.shared.sub.group,
                );
                let store = self.shared.sub.dead_letter_topic.as_str().to_owned();
                self.move_to(&store, &dead, &[]).await
            }
            other => {
                self.shared
                    .hold_again(&self.record, self.record.attempt, Duration::ZERO);
                Err(Error::new(
                    Kind::Unsupported,
                    format!(
                        "the kafka backend cannot settle with {other:?}; the message is delivered again"
                    ),
                ))
            }
        }
    }
}

impl Acker for KafkaAcker {
    fn retry_policy(&self) -> &RetryPolicy {
        &self.shared.sub.retry
    }

    fn settle(self: Box<Self>, settlement: Settlement) -> SettleFuture {
        // An ack only marks the offset settled (the driver commits it on its
        // clock), so it is answered at once, without boxing a future.
        match settlement {
            Settlement::Ack => SettleFuture::ready(self.finish()),
            other => SettleFuture::boxed(self.settle_later(other)),
        }
    }

    fn settle_on_drop(self: Box<Self>, settlement: Settlement) {
        let rt = self.shared.rt.clone();
        rt.spawn(async move {
            if let Err(e) = self.settle_later(settlement).await {
                tracing::debug!(error = %e, "settling a dropped delivery failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("a-b".to_string()),
            Just("polybus".to_string())
        ]
    }

    proptest! {
        /// The regex handed to librdkafka matches exactly what the C1 matcher
        /// matches, outside the reserved namespace (filtered on receipt).
        #[test]
        fn regex_agrees_with_the_pattern_matcher(
            pattern in prop::collection::vec(prop_oneof![word(), Just("*".to_string()), Just("#".to_string())], 1..5),
            topic in prop::collection::vec(word(), 1..6),
        ) {
            let pattern = Pattern::new(&pattern.join(".")).unwrap();
            let topic = topic.join(".");
            let re = ::regex::Regex::new(&regex(&pattern)).unwrap();
            if !Topic::is_reserved(&topic) || pattern.matches(&topic) {
                prop_assert_eq!(re.is_match(&topic), pattern.matches(&topic), "{} vs {}", regex(&pattern), topic);
            }
        }
    }

    #[test]
    fn regexes_read_as_expected() {
        let re = |p: &str| regex(&Pattern::new(p).unwrap());
        assert_eq!(re("a.*"), "^a\\.[-A-Za-z0-9_]+$");
        assert_eq!(re("#"), "^[-A-Za-z0-9_]+(\\.[-A-Za-z0-9_]+)*$");
        assert_eq!(re("#.b"), "^([-A-Za-z0-9_]+\\.)*b$");
    }

    #[test]
    fn commit_metadata_round_trips() {
        let p = Prior {
            head: 7,
            attempt: 2,
            through: 9,
        };
        assert_eq!(Prior::decode(&p.encode(), 7), Some(p));
        assert_eq!(Prior::decode(&p.encode(), 8), None, "stale: another offset");
        assert_eq!(Prior::decode("", 7), None);
        assert_eq!(Prior::decode("something else", 7), None);
    }
}
