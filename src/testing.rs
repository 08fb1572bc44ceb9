//! Testing services that use polybus (feature `testing`): a bus that records
//! what is published and how every delivery ends, waits until the broker is
//! idle, and hands out deliveries for calling a handler directly.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> polybus::Result<()> {
//! use polybus::consumer::{Consumer, HandlerError};
//! use polybus::testing::TestBus;
//! use polybus::{Message, Subscription};
//!
//! let t = TestBus::memory();
//! let running = Consumer::new(t.bus().clone(), Subscription::new("order.*").group("billing"))
//!     .start(|m: Message| async move {
//!         if m.payload().is_empty() {
//!             return Err(HandlerError::permanent("an empty order"));
//!         }
//!         Ok(())
//!     })
//!     .await?;
//! t.bus().publish("order.placed", Message::new("o1")).await?;
//! t.bus().publish("order.placed", Message::new("")).await?;
//! t.idle().await?;
//! assert_eq!(t.acked("billing").len(), 1);
//! assert_eq!(t.dead_lettered("billing")[0].1, "an empty order");
//! running.stop().await?;
//! # Ok(()) }
//! ```
//!
//! On `memory://` (what [`TestBus::memory`] opens, a broker of its own per test)
//! "idle" is exact: no group holds a message that is ready, waiting for a retry
//! delay, or unsettled. Under `tokio::time::pause()` retry delays pass at once.
//! [`TestBus::connect`] records on any URL, so an integration test can switch to
//! `amqp://` or `kafka://`; there "idle" means nothing unsettled, no retry still
//! due, and nothing recorded for [`quiet`](TestBus::quiet) (the brokers' depths
//! are not read, and their delays run in real time: do not pause time there).
//!
//! Recorded: settlements as the broker took them (a refused one is
//! [`Outcome::SettleFailed`]), and a dropped delivery as the nack it is. Not
//! recorded: what a backend dead-letters on receipt, unseen by any handler (a
//! message whose earlier consumers all died holding it).

use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use polybus_core::backend::{
    Acker, Backend, DeliveryExt, DeliverySource, DepthProbe, Endpoint, SettleFuture, Settlement,
    ValidSubscription, lock,
};
use polybus_core::{
    Bus, Capabilities, Delivery, Error, Kind, Message, Pattern, PublishError, PublishFuture,
    Receipt, Result, RetryPolicy, Topic, async_trait,
};
use polybus_memory::{MemoryBus, MemoryOptions};

/// How a delivery ended, as a handler or a test settled it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Acked.
    Acked,
    /// Nacked: to be delivered again (attempt + 1) after the retry delay.
    Nacked,
    /// Dead-lettered, with this reason.
    DeadLettered(String),
    /// The broker did not take the settlement (the subscription was closed, the
    /// connection lost): the message comes again. The error, as text.
    SettleFailed(String),
}

/// One delivery and how it ended.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Handled {
    /// The group that received it.
    pub group: String,
    /// The topic it was published to.
    pub topic: Topic,
    /// Which delivery to the group this was, from 1.
    pub attempt: u32,
    /// The message.
    pub message: Arc<Message>,
    /// How it ended.
    pub outcome: Outcome,
}

#[derive(Default)]
struct Log {
    published: Vec<(String, Message)>,
    handled: Vec<Handled>,
    /// Handed out and not settled yet.
    unsettled: usize,
    /// Publishes and settlements recorded so far: "something happened".
    events: u64,
    /// When the last retry asked for is due: a broker holds it until then.
    retry_due: Option<tokio::time::Instant>,
    /// The dead-letter stores of the subscriptions seen: what waits there is
    /// kept until read, not work left to do.
    stores: std::collections::HashSet<String>,
}

type Shared = Arc<Mutex<Log>>;

/// A bus for tests: every publish and every settlement through it is recorded.
pub struct TestBus {
    bus: Bus,
    log: Shared,
    inspector: Option<MemoryBus>,
    quiet: Duration,
    limit: Duration,
}

impl TestBus {
    /// A new in-memory broker of its own (tests running in parallel never
    /// share one), recorded.
    pub fn memory() -> Self {
        let name = unique_name();
        let log = Shared::default();
        let backend = MemoryBus::open(MemoryOptions::named(&name));
        // A second handle on the same named broker reads its depths; it lives as
        // long as the test bus, and so does the broker.
        let inspector = MemoryBus::open(MemoryOptions::named(&name));
        TestBus::wrap(Recorder::new(backend, log.clone()), log, Some(inspector))
    }

    /// Record a bus on any URL: `memory://` (then `idle` reads the depths, as
    /// with [`memory`](Self::memory)), `amqp://` or `kafka://`.
    pub async fn connect(url: &str) -> Result<Self> {
        if url.starts_with("memory://") {
            // Named, so the inspector joins the same broker.
            let options = MemoryOptions::from_url(url)?.or_named(unique_name());
            let backend = MemoryBus::open(options.clone());
            let log = Shared::default();
            let inspector = MemoryBus::open(options);
            return Ok(TestBus::wrap(
                Recorder::new(backend, log.clone()),
                log,
                Some(inspector),
            ));
        }
        let log = Shared::default();
        let recorder = Recorder::new(broker(url).await?, log.clone());
        Ok(TestBus::wrap(recorder, log, None))
    }

    fn wrap(recorder: impl Backend, log: Shared, inspector: Option<MemoryBus>) -> Self {
        TestBus {
            bus: Bus::new(recorder),
            log,
            inspector,
            quiet: Duration::from_millis(500),
            limit: Duration::from_secs(60),
        }
    }

    /// On a broker, how long nothing must happen to count as idle (default 500 ms).
    pub fn quiet(mut self, quiet: Duration) -> Self {
        self.quiet = quiet;
        self
    }

    /// How long [`idle`](Self::idle) waits at most (default 60 s; virtual time
    /// under `tokio::time::pause()`).
    pub fn limit(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    /// The bus to hand to the code under test.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The messages published to topics matching `pattern` (`order.*`,
    /// `order.placed`), in the order their publishes resolved (concurrent
    /// publishes may resolve in another order than the broker took them).
    pub fn published(&self, pattern: &str) -> Vec<Message> {
        let pattern = Pattern::new(pattern).expect("a valid pattern");
        let log = lock(&self.log);
        log.published
            .iter()
            .filter(|(topic, _)| pattern.matches(topic))
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// Every settled delivery of `group`, in the order they were settled.
    pub fn handled(&self, group: &str) -> Vec<Handled> {
        lock(&self.log)
            .handled
            .iter()
            .filter(|h| h.group == group)
            .cloned()
            .collect()
    }

    /// The messages `group` acked.
    pub fn acked(&self, group: &str) -> Vec<Arc<Message>> {
        self.ended(group, |o| matches!(o, Outcome::Acked))
            .map(|(m, _)| m)
            .collect()
    }

    /// The messages `group` nacked, with the attempt that failed.
    pub fn nacked(&self, group: &str) -> Vec<(Arc<Message>, u32)> {
        self.ended(group, |o| matches!(o, Outcome::Nacked))
            .collect()
    }

    /// The messages `group` dead-lettered, with the reason.
    pub fn dead_lettered(&self, group: &str) -> Vec<(Arc<Message>, String)> {
        self.handled(group)
            .into_iter()
            .filter_map(|h| match h.outcome {
                Outcome::DeadLettered(reason) => Some((h.message, reason)),
                _ => None,
            })
            .collect()
    }

    fn ended(
        &self,
        group: &str,
        which: impl Fn(&Outcome) -> bool,
    ) -> impl Iterator<Item = (Arc<Message>, u32)> {
        self.handled(group)
            .into_iter()
            .filter(move |h| which(&h.outcome))
            .map(|h| (h.message, h.attempt))
    }

    /// How many messages `group` holds (memory only): ready, waiting for a retry
    /// delay, and unsettled.
    pub fn group_depth(&self, group: &str) -> Option<polybus_memory::GroupDepth> {
        self.inspector.as_ref()?.group_depth(group)
    }

    /// Wait until the broker is idle: nothing left to deliver, retry or settle
    /// (see the [module docs](self)). Fails with a [`Timeout`](Kind::Timeout)
    /// error that says what is left, after [`limit`](Self::limit).
    pub async fn idle(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.limit;
        let mut last_events = u64::MAX;
        let mut calm_since = tokio::time::Instant::now();
        loop {
            let (unsettled, events, retry_due) = {
                let log = lock(&self.log);
                (log.unsettled, log.events, log.retry_due)
            };
            let now = tokio::time::Instant::now();
            if events != last_events {
                (last_events, calm_since) = (events, now);
            }
            let left = self.left();
            let idle = unsettled == 0
                && match &left {
                    Some(left) => left.is_empty(),
                    // On a broker, a retry waits there, unseen, until it is due.
                    None => {
                        now.duration_since(calm_since) >= self.quiet
                            && retry_due.is_none_or(|due| now >= due)
                    }
                };
            if idle {
                return Ok(());
            }
            if now >= deadline {
                return Err(Error::new(
                    Kind::Timeout,
                    format!(
                        "not idle after {:?}: {unsettled} unsettled deliveries; groups holding messages: {:?}",
                        self.limit,
                        left.unwrap_or_default()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The memory broker's groups that still hold messages; `None` on a broker.
    fn left(&self) -> Option<Vec<(String, polybus_memory::GroupDepth)>> {
        let inspector = self.inspector.as_ref()?;
        let stores = lock(&self.log).stores.clone();
        Some(
            inspector
                .groups()
                .into_iter()
                .filter_map(|g| inspector.group_depth(&g).map(|d| (g, d)))
                .filter(|(_, d)| d.ready + d.delayed + d.unsettled > 0)
                // Dead letters wait in their store until read: that is not work.
                .filter(|(g, _)| !stores.contains(g))
                .collect(),
        )
    }
}

impl fmt::Debug for TestBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestBus")
            .field("bus", &self.bus)
            .finish_non_exhaustive()
    }
}

/// A delivery of `message` from `topic`, for calling a handler directly, and a
/// probe that says how it was settled.
pub fn delivery(topic: &str, message: Message) -> (Delivery, Settled) {
    let settled = Settled(Arc::default());
    let acker = ProbeAcker {
        retry: RetryPolicy::default(),
        probe: settled.0.clone(),
    };
    let topic = Topic::new(topic).expect("a valid topic");
    let delivery = Delivery::new(Arc::new(message), topic, 1, false, Box::new(acker));
    (delivery, settled)
}

/// How a delivery from [`delivery`] was settled.
#[derive(Debug, Clone)]
pub struct Settled(Arc<Mutex<Option<Outcome>>>);

impl Settled {
    /// The outcome, once the delivery is settled (or dropped: a nack).
    pub fn outcome(&self) -> Option<Outcome> {
        lock(&self.0).clone()
    }
}

struct ProbeAcker {
    retry: RetryPolicy,
    probe: Arc<Mutex<Option<Outcome>>>,
}

impl Acker for ProbeAcker {
    fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    fn settle(self: Box<Self>, settlement: Settlement) -> SettleFuture {
        *lock(&self.probe) = Some(outcome(&settlement));
        SettleFuture::ready(Ok(()))
    }

    fn settle_on_drop(self: Box<Self>, settlement: Settlement) {
        *lock(&self.probe) = Some(outcome(&settlement));
    }
}

fn outcome(settlement: &Settlement) -> Outcome {
    match settlement {
        Settlement::Ack => Outcome::Acked,
        Settlement::DeadLetter(why) => Outcome::DeadLettered(why.reason.clone()),
        _ => Outcome::Nacked,
    }
}

/// The backend of a [`TestBus`]: forwards everything, records publishes and
/// settlements.
struct Recorder<B> {
    inner: B,
    log: Shared,
}

impl<B: Backend> Recorder<B> {
    fn new(inner: B, log: Shared) -> Self {
        Recorder { inner, log }
    }
}

impl<B: fmt::Debug> fmt::Debug for Recorder<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Recorder").field(&self.inner).finish()
    }
}

fn record_publish(log: &Shared, topic: &str, message: &Message) {
    let mut log = lock(log);
    log.published.push((topic.to_owned(), message.clone()));
    log.events += 1;
}

#[async_trait]
impl<B: Backend> Backend for Recorder<B> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
        // Recorded once the broker took it, so a refused publish is not "published".
        let copy = message.clone();
        let publishing = self.inner.publish(topic, message);
        PublishFuture::boxed(async move {
            let result: Result<Receipt, PublishError> = publishing.await;
            if result.is_ok() {
                record_publish(&self.log, topic, &copy);
            }
            result
        })
    }

    async fn subscribe(&self, sub: ValidSubscription) -> Result<Box<dyn DeliverySource>> {
        let group = sub.group.clone();
        lock(&self.log)
            .stores
            .insert(sub.dead_letter_topic.as_str().to_owned());
        let source = self.inner.subscribe(sub).await?;
        Ok(Box::new(RecordedSource {
            inner: source,
            log: self.log.clone(),
            group,
        }))
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }

    async fn backlog(&self, group: &str, topic: &str) -> Result<u64> {
        self.inner.backlog(group, topic).await
    }

    fn endpoint(&self) -> Endpoint {
        self.inner.endpoint()
    }
}

struct RecordedSource {
    inner: Box<dyn DeliverySource>,
    log: Shared,
    group: String,
}

#[async_trait]
impl DeliverySource for RecordedSource {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Delivery>>> {
        let polled = self.inner.poll_next(cx);
        let Poll::Ready(Some(Ok(delivery))) = polled else {
            return polled;
        };
        lock(&self.log).unsettled += 1;
        let record = Record {
            log: self.log.clone(),
            group: self.group.clone(),
            topic: delivery.topic().clone(),
            attempt: delivery.attempt(),
            message: delivery.message_arc(),
        };
        Poll::Ready(Some(Ok(
            delivery.wrap_acker(|inner| Box::new(RecordedAcker { inner, record }))
        )))
    }

    async fn close(&mut self, grace: Duration) -> Result<()> {
        self.inner.close(grace).await
    }

    fn depth_probe(&self) -> Option<DepthProbe> {
        self.inner.depth_probe()
    }
}

/// What a settlement is recorded with.
struct Record {
    log: Shared,
    group: String,
    topic: Topic,
    attempt: u32,
    message: Arc<Message>,
}

impl Record {
    /// Record how the delivery ended: `asked` if the broker took it.
    fn settled(self, asked: &Settlement, taken: std::result::Result<(), &Error>) {
        let mut log = lock(&self.log);
        log.unsettled = log.unsettled.saturating_sub(1);
        log.events += 1;
        let outcome = match taken {
            Ok(()) => outcome(asked),
            Err(e) => Outcome::SettleFailed(e.to_string()),
        };
        if let (Outcome::Nacked, Settlement::Retry { delay }) = (&outcome, asked) {
            let due = tokio::time::Instant::now() + *delay;
            log.retry_due = Some(log.retry_due.map_or(due, |d| d.max(due)));
        }
        log.handled.push(Handled {
            group: self.group,
            topic: self.topic,
            attempt: self.attempt,
            message: self.message,
            outcome,
        });
    }
}

struct RecordedAcker {
    inner: Box<dyn Acker>,
    record: Record,
}

impl Acker for RecordedAcker {
    fn retry_policy(&self) -> &RetryPolicy {
        self.inner.retry_policy()
    }

    // Recorded once the broker answered, so a refused settlement is not an ack.
    fn settle(self: Box<Self>, settlement: Settlement) -> SettleFuture {
        let RecordedAcker { inner, record } = *self;
        SettleFuture::boxed(async move {
            let asked = settlement.clone();
            let taken = inner.settle(settlement).await;
            record.settled(&asked, taken.as_ref().map(|_| ()));
            taken
        })
    }

    // A dropped delivery is a nack (C7); its outcome is not reported to anyone.
    fn settle_on_drop(self: Box<Self>, settlement: Settlement) {
        let RecordedAcker { inner, record } = *self;
        record.settled(&settlement, Ok(()));
        inner.settle_on_drop(settlement);
    }
}

/// A broker backend for `url`, unwrapped, to record.
async fn broker(url: &str) -> Result<Box<dyn Backend>> {
    match url.split_once("://").map(|(scheme, _)| scheme) {
        #[cfg(feature = "amqp")]
        Some("amqp" | "amqps") => {
            let options = polybus_amqp::AmqpOptions::from_url(url)?;
            Ok(Box::new(polybus_amqp::AmqpBus::open(options).await?))
        }
        #[cfg(feature = "kafka")]
        Some("kafka") => {
            let options = polybus_kafka::KafkaOptions::from_url(url)?;
            Ok(Box::new(polybus_kafka::KafkaBus::open(options).await?))
        }
        _ => Err(Error::invalid_input(format!(
            "a test bus records memory://, amqp:// (feature amqp) or kafka:// (feature kafka), not `{}`",
            polybus_core::backend::url::redact(url)
        ))),
    }
}

/// A name no other broker of this process has, for a test's own broker.
fn unique_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("polybus-test-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}
