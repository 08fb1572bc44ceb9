//! Operating a group's dead letters: count them, list them without settling
//! them, send them back to their topic (redrive), or drop them (purge).
//!
//! Written once over the [`Bus`], so every backend behaves alike: each
//! operation reads the dead-letter store (`polybus.dead-letter.<group>`) as a
//! member of its group, as [`Subscription::dead_letters_of`] does, and settles
//! a dead letter only once what it was taken for is done. Only the count is
//! the backend's own ([`Backend::backlog`](crate::backend::Backend::backlog)):
//! it is asked of the broker, and an operation takes at most the dead letters
//! counted when it starts, so dead letters that arrive meanwhile (a redriven
//! message that fails again) wait for the next operation.
//!
//! ```
//! # async fn demo(bus: polybus_core::Bus) -> polybus_core::Result<()> {
//! use polybus_core::dead_letters::Take;
//!
//! let dead = bus.dead_letters("billing")?;
//! for letter in dead.list(20).await? {
//!     println!("{} from {}: {}", letter.id, letter.original_topic, letter.reason);
//! }
//! // Send back the ones that failed on a since-fixed bug, 100 a second.
//! let report = dead
//!     .redrive(Take::all().matching(|l| l.reason.contains("timeout")).rate(100))
//!     .await?;
//! println!("{} redriven, {} kept", report.done, report.kept);
//! # Ok(()) }
//! ```
//!
//! # What each operation means on each broker
//!
//! - **list** takes up to `limit` dead letters without settling them, then
//!   closes, which gives them back (C10). A delivery given back counts as one on
//!   brokers that count deliveries (RabbitMQ quorum queues' `x-delivery-count`,
//!   the in-memory broker), as RabbitMQ's management UI "get messages, requeue"
//!   does: a service that reads its dead letters with a bounded retry policy
//!   sees those attempts. These operations read with unlimited attempts, so a
//!   listing never moves a dead letter anywhere. On Kafka nothing is counted: a
//!   listing is a read that commits nothing.
//! - **redrive** republishes each taken dead letter to its original topic
//!   (`polybus-original-topic`), with the library's headers dropped (so its
//!   attempts start again at 1), its id, key, headers and payload kept, and
//!   [`header::REDRIVEN_AT`] set; only once that publish is confirmed is the
//!   dead letter acked. At least once: interrupted (the future dropped, the
//!   process killed), a dead letter whose publish was confirmed but whose ack
//!   was not sent is redriven again next time; none is lost. Every group on the
//!   original topic receives it again, as any republish; consumers deduplicate
//!   by id (C4).
//! - **purge** acks each taken dead letter. On Kafka a log keeps its records
//!   until retention removes them; purging moves the dead-letter group's
//!   committed position past them, so no reader of the group sees them again.
//! - A **filter** keeps the dead letters it does not match: they are held
//!   unsettled while the operation runs and given back at its end. On Kafka a
//!   group keeps one position per partition, which cannot pass a kept record:
//!   records taken after a kept one in the same partition are read again by
//!   the group's next reader (a redriven one may be redriven twice). Without a
//!   filter, or with a limit alone, nothing comes back.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;

use crate::bus::Bus;
use crate::delivery::Delivery;
use crate::error::{Error, Result};
use crate::message::{Message, millis_since_epoch};
use crate::names::{dead_letter_topic, header};
use crate::retry::RetryPolicy;
use crate::stream::DeliveryStream;
use crate::subscription::{MAX_PREFETCH, Subscription, validate_group};
use crate::topic::Topic;

/// The most dead letters one [`list`](DeadLetters::list), or one filtered
/// operation, holds at once: each is a delivery held unsettled, within one
/// subscription's prefetch.
pub const MAX_HELD: usize = 10_000;

/// How long an operation waits for the next dead letter it expects, by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);

/// The dead letters of one durable group; made by [`Bus::dead_letters`].
#[derive(Clone)]
pub struct DeadLetters {
    bus: Bus,
    group: String,
    store: String,
    wait: Duration,
}

impl fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetters")
            .field("group", &self.group)
            .field("store", &self.store)
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

/// One dead letter, as [`DeadLetters::list`] shows it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetterRecord {
    /// The message's id (C13).
    pub id: String,
    /// The topic it was first published to.
    pub original_topic: String,
    /// The group that dead-lettered it.
    pub group: String,
    /// Why (`polybus-dead-letter-reason`).
    pub reason: String,
    /// The error of its last attempt, when its attempts ran out after failures.
    pub last_error: Option<String>,
    /// How many times it was delivered before it was dead-lettered.
    pub attempts: u32,
    /// When it was dead-lettered (dead letters stored before polybus 0.1 said
    /// so carry no time).
    pub dead_lettered_at: Option<SystemTime>,
    /// When it was last redriven, if it was.
    pub redriven_at: Option<SystemTime>,
    /// The payload's size in bytes.
    pub payload_size: usize,
    /// The message's own headers (the library's `polybus-` ones are the fields
    /// above).
    pub headers: BTreeMap<String, String>,
    /// The whole message, as stored.
    pub message: Message,
}

impl DeadLetterRecord {
    fn of(message: &Message, topic: &Topic) -> Self {
        let text = |name| message.header(name).map(str::to_owned);
        let time = |name| {
            message
                .header(name)
                .and_then(|v| v.parse::<u64>().ok())
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
        };
        DeadLetterRecord {
            id: message.id().to_owned(),
            original_topic: text(header::ORIGINAL_TOPIC).unwrap_or_else(|| topic.to_string()),
            group: text(header::GROUP).unwrap_or_default(),
            reason: text(header::DEAD_LETTER_REASON).unwrap_or_default(),
            last_error: text(header::LAST_ERROR),
            attempts: message
                .header(header::ATTEMPTS)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            dead_lettered_at: time(header::DEAD_LETTERED_AT),
            redriven_at: time(header::REDRIVEN_AT),
            payload_size: message.payload().len(),
            headers: message
                .headers()
                .iter()
                .filter(|(k, _)| !header::is_reserved(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            message: message.clone(),
        }
    }
}

type Filter = Arc<dyn Fn(&DeadLetterRecord) -> bool + Send + Sync>;
type Progress = Arc<dyn Fn(&DeadLetterReport) + Send + Sync>;

/// Which dead letters a [`redrive`](DeadLetters::redrive) or
/// [`purge`](DeadLetters::purge) takes, and how fast.
#[derive(Clone, Default)]
pub struct Take {
    filter: Option<Filter>,
    limit: Option<u64>,
    rate: Option<u32>,
    progress: Option<Progress>,
}

impl fmt::Debug for Take {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Take")
            .field("filtered", &self.filter.is_some())
            .field("limit", &self.limit)
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

impl Take {
    /// Every dead letter counted when the operation starts.
    pub fn all() -> Self {
        Take::default()
    }

    /// At most `n` dead letters, oldest first.
    pub fn first(n: u64) -> Self {
        Take::all().limit(n)
    }

    /// Only those `filter` matches; the others are kept (see the module docs
    /// for what that means on Kafka).
    pub fn matching(
        mut self,
        filter: impl Fn(&DeadLetterRecord) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.filter = Some(Arc::new(filter));
        self
    }

    /// Stop after `n` taken.
    pub fn limit(mut self, n: u64) -> Self {
        self.limit = Some(n);
        self
    }

    /// At most `per_second` taken each second (at least 1).
    pub fn rate(mut self, per_second: u32) -> Self {
        self.rate = Some(per_second.max(1));
        self
    }

    /// Call `progress` after each dead letter is dealt with (for a progress bar).
    pub fn on_progress(
        mut self,
        progress: impl Fn(&DeadLetterReport) + Send + Sync + 'static,
    ) -> Self {
        self.progress = Some(Arc::new(progress));
        self
    }
}

/// What a [`redrive`](DeadLetters::redrive) or [`purge`](DeadLetters::purge)
/// did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct DeadLetterReport {
    /// The dead letters counted when it started.
    pub counted: u64,
    /// Dead letters redriven (confirmed, then acked) or purged.
    pub done: u64,
    /// Dead letters the filter did not match, given back.
    pub kept: u64,
    /// Why it stopped before taking everything it counted: a failed publish or
    /// settlement (that dead letter was given back), or the wait for the next
    /// dead letter ran out. `None` when it took all it was asked to.
    pub stopped_by: Option<Error>,
}

impl DeadLetterReport {
    fn counted(counted: u64) -> Self {
        DeadLetterReport {
            counted,
            ..DeadLetterReport::default()
        }
    }
}

/// What a redrive did; see [`DeadLetterReport`].
pub type RedriveReport = DeadLetterReport;

/// One tick every `1 / per_second` seconds, late ticks not caught up.
fn pace(per_second: u32) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// A delivery an operation holds unsettled, abandoned (never nacked) when
/// dropped: given back by the broker when the subscription ends, even if the
/// operation's future is dropped midway.
struct Held(Option<Delivery>);

impl Held {
    fn get(&self) -> &Delivery {
        self.0.as_ref().expect("held until dropped or taken")
    }

    fn take(mut self) -> Delivery {
        self.0.take().expect("held until dropped or taken")
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            d.abandon();
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Redrive,
    Purge,
}

impl DeadLetters {
    pub(crate) fn new(bus: Bus, group: &str) -> Result<Self> {
        validate_group(group)?;
        let store = dead_letter_topic(group);
        Topic::new(&store).map_err(|e| {
            Error::invalid_input(format!(
                "group `{group}` is too long for its dead-letter store: {e}"
            ))
        })?;
        Ok(DeadLetters {
            bus,
            group: group.to_owned(),
            store,
            wait: DEFAULT_WAIT,
        })
    }

    /// How long to wait for the next dead letter expected (default 5 s). The
    /// count is a snapshot: dead letters another reader held when it was taken
    /// are not handed out until that reader gives them back, and the wait for
    /// them ends the operation with a [`Timeout`](crate::Kind::Timeout) in its
    /// report.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// The group whose dead letters these are.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The dead-letter store: a topic read by a durable group of the same name.
    pub fn store(&self) -> &str {
        &self.store
    }

    /// How many dead letters wait, as the broker counts them now (those a
    /// reader holds unsettled are not counted).
    pub async fn count(&self) -> Result<u64> {
        self.bus.backlog(&self.store, &self.store).await
    }

    /// Up to `limit` (at most [`MAX_HELD`]) dead letters, oldest first where
    /// the broker keeps an order, without settling them; see the module docs.
    pub async fn list(&self, limit: usize) -> Result<Vec<DeadLetterRecord>> {
        let want = self.count().await?.min(limit.min(MAX_HELD) as u64) as usize;
        if want == 0 {
            return Ok(Vec::new());
        }
        let mut stream = self.open(want).await?;
        let mut held = Vec::with_capacity(want);
        while held.len() < want {
            match self.next(&mut stream).await {
                Ok(d) => held.push(Held(Some(d))),
                Err(e) if held.is_empty() => {
                    stream.close(Duration::ZERO).await?;
                    return Err(e);
                }
                // Fewer than counted (a reader took some meanwhile).
                Err(_) => break,
            }
        }
        let records = held
            .iter()
            .map(|d| DeadLetterRecord::of(d.get().message(), d.get().topic()))
            .collect();
        drop(held);
        stream.close(Duration::ZERO).await.map(|()| records)
    }

    /// Send the dead letters `take` selects back to their original topics; see
    /// the module docs. Fails only if the store cannot be read at all; what
    /// stopped it midway is in the report.
    pub async fn redrive(&self, take: Take) -> Result<DeadLetterReport> {
        self.run(take, Op::Redrive).await
    }

    /// Drop the dead letters `take` selects; see the module docs.
    pub async fn purge(&self, take: Take) -> Result<DeadLetterReport> {
        self.run(take, Op::Purge).await
    }

    async fn run(&self, take: Take, op: Op) -> Result<DeadLetterReport> {
        let counted = self.count().await?;
        let mut report = DeadLetterReport::counted(counted);
        let want = take.limit.map_or(counted, |n| n.min(counted));
        if want == 0 {
            return Ok(report);
        }
        // Kept ones are held unsettled until the end, so a filtered run needs
        // room for every one it may keep.
        let prefetch = match take.filter {
            Some(_) => counted.min(MAX_HELD as u64) as usize,
            None => want.min(256) as usize,
        };
        let mut stream = self.open(prefetch).await?;
        let mut kept = Vec::new();
        let mut pace = take.rate.map(pace);
        while report.done < want && report.done + report.kept < counted {
            if kept.len() >= prefetch {
                report.stopped_by = Some(Error::invalid_input(format!(
                    "the filter kept {prefetch} dead letters, as many as one operation \
                     holds; purge or redrive those first"
                )));
                break;
            }
            let d = match self.next(&mut stream).await {
                Ok(d) => Held(Some(d)),
                Err(e) => {
                    report.stopped_by = Some(e);
                    break;
                }
            };
            if let Some(filter) = &take.filter
                && !filter(&DeadLetterRecord::of(d.get().message(), d.get().topic()))
            {
                report.kept += 1;
                kept.push(d);
                continue;
            }
            if let Some(tick) = &mut pace {
                tick.tick().await;
            }
            let settled = self.settle(d, op, &mut kept).await;
            match settled {
                Ok(()) => report.done += 1,
                Err(e) => {
                    report.stopped_by = Some(e);
                    break;
                }
            }
            if let Some(progress) = &take.progress {
                progress(&report);
            }
        }
        drop(kept);
        let closed = stream.close(Duration::ZERO).await;
        if let (Err(e), None) = (closed, &report.stopped_by) {
            report.stopped_by = Some(e);
        }
        Ok(report)
    }

    /// Redrive or purge taken dead letter `d`; a failed redrive joins `kept`,
    /// given back at the close.
    async fn settle(&self, d: Held, op: Op, kept: &mut Vec<Held>) -> Result<()> {
        match op {
            Op::Redrive => match self.republish(d.get()).await {
                Ok(()) => d.take().ack().await,
                Err(e) => {
                    kept.push(d);
                    Err(e)
                }
            },
            Op::Purge => d.take().ack().await,
        }
    }

    /// Publish dead letter `d` to its original topic, confirmed.
    async fn republish(&self, d: &Delivery) -> Result<()> {
        let message = d.message().clone();
        let topic = message
            .header(header::ORIGINAL_TOPIC)
            .map(str::to_owned)
            .ok_or_else(|| {
                Error::invalid_input(format!(
                    "dead letter {} names no original topic (no `{}` header): \
                     it cannot be redriven",
                    message.id(),
                    header::ORIGINAL_TOPIC
                ))
            })?;
        let now = millis_since_epoch(SystemTime::now()).to_string();
        self.bus
            .publish_marked(&topic, message, Some((header::REDRIVEN_AT, now)))
            .await
            .map(drop)
            .map_err(|e| e.into_parts().0)
    }

    async fn open(&self, prefetch: usize) -> Result<DeliveryStream> {
        let sub = Subscription::dead_letters_of(&self.group)
            .prefetch((prefetch.max(1) as u32).min(MAX_PREFETCH))
            // Never dead-letter a dead letter for having been looked at.
            .retry(RetryPolicy::default().max_attempts(u32::MAX));
        self.bus.subscribe(sub).await
    }

    async fn next(&self, stream: &mut DeliveryStream) -> Result<Delivery> {
        match tokio::time::timeout(self.wait, stream.next()).await {
            Ok(Some(delivery)) => delivery,
            Ok(None) => Err(Error::closed(format!(
                "the dead-letter store of group `{}` closed while being read",
                self.group
            ))),
            Err(_) => Err(Error::new(
                crate::Kind::Timeout,
                format!(
                    "no dead letter of group `{}` came within {:?}, though the broker \
                     counted more (another reader may hold them)",
                    self.group, self.wait
                ),
            )),
        }
    }
}
