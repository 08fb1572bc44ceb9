//! A subscription: one Kafka consumer in the subscription's consumer group,
//! driven by a thread of its own.
//!
//! Why a thread: librdkafka runs the rebalance callback inside `poll`, and that
//! callback must make blocking calls (committed offsets, watermarks, a
//! synchronous commit) before it hands the assignment back. A dedicated thread
//! keeps those off the async runtime.
//!
//! The thread polls records into a `ready` buffer, the read-ahead; the stream
//! hands them out, never more than the prefetch unsettled (C6). Fetching is
//! paused while the read-ahead is full (10,000 records or 16 MiB), so nothing is
//! buffered without bound. Each partition tracks its
//! unsettled offsets, and only the lowest unsettled offset is committed (C9).
//! The commit's metadata records which record at that offset was handed out,
//! and as which attempt, so the next owner of the partition counts a crash as an
//! attempt (C8).
//!
//! The files, one concern each:
//!
//! | file | what it does |
//! |---|---|
//! | `mod.rs` | what the pieces share: [`Shared`], its `State`, the phases of a subscription |
//! | `open.rs` | the subscribe path: topics made, the group's topics listed, the consumer made and subscribed, the first assignment awaited |
//! | `config.rs` | the consumer's configuration, and why each setting |
//! | `pattern.rs` | a pattern as the regex librdkafka subscribes with |
//! | `driver.rs` | the driver thread: poll, then chores, until stopped |
//! | `intake.rs` | a polled record into the `ready` buffer (or held until due, or dead-lettered if exhausted) |
//! | `source.rs` | the stream: hands `ready` records out within the prefetch; close and drop |
//! | `acker.rs` | settling a delivery: ack, retry (retry topic or memory), dead letter |
//! | `partitions.rs` | per-partition bookkeeping: unsettled offsets, epochs, finishing and holding deliveries |
//! | `flow.rs` | the driver's chores: release due retries, pause and resume fetching (C6), commit |
//! | `rebalance.rs` | the rebalance callback: where assigned partitions start, handing back and committing revoked ones |
//! | `offsets.rs` | the offset arithmetic, pure and unit-tested: commit metadata, starts, what is committed |
//! | `lag.rs` | each assigned partition's lag behind its high watermark, for telemetry |
//!
//! How a record flows, intake → ready buffer → stream → acker → commit:
//!
//! 1. the driver polls it; `intake` files its offset as unsettled in its
//!    partition and queues it in `ready` (or in `held` until a retry is due,
//!    when `flow` moves it to `ready`);
//! 2. the stream (`source`) hands it out with a `KafkaAcker`, within the
//!    prefetch;
//! 3. the acker settles it, and its offset leaves the unsettled set (a dead
//!    letter, or a durable group's retry, first produces a copy; a private
//!    group's retry stays unsettled, back in `held`);
//! 4. `flow` commits each partition's lowest unsettled offset on the driver's
//!    clock (synchronously, on a short-lived thread, one commit at a time, so a
//!    failure is seen and sent again), and `rebalance` does when the partition
//!    goes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use polybus_core::Topic;
use polybus_core::backend::{TopicCache, ValidSubscription};
use polybus_core::names::retry_store;
use tokio::runtime::Handle;
use tokio::sync::Notify;

use crate::connection::Connector;

mod acker;
mod config;
mod driver;
mod flow;
mod intake;
mod lag;
mod offsets;
mod open;
mod partitions;
mod pattern;
mod rebalance;
mod source;

pub(crate) use lag::backlog;
pub(crate) use open::open;

use partitions::{Part, Pending, Ready};

/// Broker calls made inside the rebalance callback wait at most this long.
const REBALANCE_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often settled offsets are committed while records flow.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// A topic partition. Its topic is shared (see `State::topics`), so a record
/// from the same topic as the one before it costs no allocation.
type Tp = (Topic, i32);

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
    /// Each assigned partition's lag, as `lag::refresh` last asked it.
    pub(crate) lags: std::sync::Mutex<Vec<polybus_core::backend::Depth>>,
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
    ready: Ready,
    /// Records waiting for their retry delay.
    held: Vec<Pending>,
    /// Handed out and not yet settled.
    outstanding: usize,
    paused: HashSet<Tp>,
    /// Fetching is paused for want of room (see `flow::out_of_room`).
    room_paused: bool,
    dirty: bool,
    /// A periodic commit is in flight (see `flow::commit_if_due`).
    committing: bool,
    waker: Option<Waker>,
    assigned: bool,
    /// What librdkafka last reported of this member's group, until assigned.
    group_view: Option<open::GroupView>,
    phase: Phase,
    /// Names of the topics records come from.
    topics: TopicCache,
    /// Names of the topics retried copies were first published to.
    origins: TopicCache,
}

impl Shared {
    pub(crate) fn new(
        connector: Arc<Connector>,
        sub: ValidSubscription,
        known: HashSet<String>,
        retry_partitions: i32,
    ) -> Arc<Self> {
        let retry_topic = sub.durable.then(|| retry_store(&sub.group));
        Arc::new(Shared {
            connector,
            sub,
            retry_topic,
            known,
            retry_partitions,
            state: Mutex::new(State {
                parts: HashMap::new(),
                next_epoch: 1,
                ready: Ready::default(),
                held: Vec::new(),
                outstanding: 0,
                paused: HashSet::new(),
                room_paused: false,
                dirty: false,
                committing: false,
                waker: None,
                assigned: false,
                group_view: None,
                phase: Phase::Running,
                topics: TopicCache::default(),
                origins: TopicCache::default(),
            }),
            changed: Notify::new(),
            rt: Handle::current(),
            lags: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain bookkeeping behind; carry on.
        polybus_core::backend::lock(&self.state)
    }

    fn wake(&self, state: &mut State) {
        if let Some(w) = state.waker.take() {
            w.wake();
        }
    }
}

fn millis_from_now(delay: Duration) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // Rounded up: a retry is never due before its delay has passed.
    (now + delay).as_millis() as u64 + 1
}
