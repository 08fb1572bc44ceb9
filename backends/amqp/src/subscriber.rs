//! A subscription's delivery stream over a lapin consumer, and the acker of each
//! delivery.
//!
//! Settlement on RabbitMQ:
//! - `ack`: `basic.ack`, coalesced with the acks around it (see `acks`).
//! - `nack`: the message is republished, with `polybus-attempt` + 1, to the group's
//!   retry queue for that delay (`polybus.retry.<group>.<ms>ms`, queue TTL, dead-
//!   lettering back into the group's queue), then acked. The wait happens on the
//!   broker, so it survives a consumer or broker restart (C7).
//! - `dead_letter`: republished with the reason headers straight to the
//!   dead-letter store queue (through the default exchange, so no binding of the
//!   topic exchange sees it), then acked.
//!
//! Republish-then-ack is at-least-once: a crash between the two delivers twice.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use polybus_core::backend::{
    Acker, DeliveryExt, DeliverySource, Depth, DepthProbe, MessageExt, SettleFuture, Settlement,
    TopicCache, ValidSubscription, Wire, exhausted_dead_letter, is_exhausted_on_receipt,
    spawn_settlement, wait_until,
};
use polybus_core::{
    Delivery, Error, Kind, Message, Result, RetryPolicy, Topic, async_trait, header,
};
use tokio::sync::Notify;

use crate::acks::AckBatch;
use crate::connection::{Connector, declare_subscription, map_err, reconnect_backoff};
use crate::mapping;

/// What a subscription's stream and its deliveries share.
pub(crate) struct Shared {
    pub(crate) connector: Arc<Connector>,
    pub(crate) sub: ValidSubscription,
    unsettled: AtomicUsize,
    settled: Notify,
    pub(crate) closing: AtomicBool,
    /// The runtime the subscription was opened on, for work spawned from `Drop`.
    rt: tokio::runtime::Handle,
    /// Set before the channel is closed (drop, or close past its grace): from then
    /// on the broker requeues what is unsettled, and settling must not republish
    /// a copy, or the message would come back twice.
    pub(crate) gone: AtomicBool,
}

/// The longest any broker call made while closing may take.
pub(crate) const CLOSE_RPC_TIMEOUT: Duration = Duration::from_secs(5);

type Opening = Pin<Box<dyn Future<Output = Result<(Channel, Consumer)>> + Send>>;

// One per subscription, not per message: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum State {
    Consuming {
        channel: Channel,
        consumer: Consumer,
        acks: Arc<AckBatch>,
    },
    Reconnecting(Opening),
    Done,
}

pub(crate) struct AmqpSource {
    shared: Arc<Shared>,
    state: State,
    /// Checks the channel while the consumer is quiet: when the broker closes the
    /// connection, lapin does not always end the consumer stream (seen once in
    /// about fifteen broker restarts: the stream stayed pending for good).
    watchdog: tokio::time::Interval,
    topics: TopicCache,
}

/// How often a quiet subscription checks that its channel is still open.
const WATCHDOG_PERIOD: Duration = Duration::from_secs(1);

impl Shared {
    pub(crate) fn new(connector: Arc<Connector>, sub: ValidSubscription) -> Arc<Self> {
        Arc::new(Shared {
            connector,
            sub,
            unsettled: AtomicUsize::new(0),
            settled: Notify::new(),
            closing: AtomicBool::new(false),
            rt: tokio::runtime::Handle::current(),
            gone: AtomicBool::new(false),
        })
    }

    fn settled_one(&self) {
        self.unsettled.fetch_sub(1, Ordering::AcqRel);
        self.settled.notify_waiters();
    }

    /// The consuming state of a newly opened channel, with its own coalescer:
    /// delivery tags start again at 1 on every channel.
    fn consuming(&self, channel: Channel, consumer: Consumer) -> State {
        let options = &self.connector.options;
        let acks = AckBatch::new(
            channel.clone(),
            options.ack_batch,
            self.sub.prefetch,
            options.ack_flush,
        );
        State::Consuming {
            channel,
            consumer,
            acks,
        }
    }
}

/// Open a channel, declare the topology, set the prefetch and start consuming.
/// When this returns the subscription is live (C3). Bounded by the publish
/// time-out: a broker call right after a restart (quorum queues still
/// recovering) may go unanswered, and lapin's calls have no time-out of their own.
pub(crate) async fn open(shared: &Arc<Shared>) -> Result<(Channel, Consumer)> {
    let limit = shared.connector.options.publish_timeout;
    match tokio::time::timeout(limit, open_unbounded(shared)).await {
        Ok(opened) => opened,
        Err(_) => Err(Error::new(
            Kind::Timeout,
            format!(
                "subscribing group `{}` got no answer within {limit:?}",
                shared.sub.group
            ),
        )),
    }
}

async fn open_unbounded(shared: &Arc<Shared>) -> Result<(Channel, Consumer)> {
    let sub = &shared.sub;
    let options = &shared.connector.options;
    let live = shared
        .connector
        .live(Connector::deadline_in(options.publish_timeout))
        .await?;
    let channel = live
        .conn
        .create_channel()
        .await
        .map_err(|e| map_err(e, "cannot open a channel"))?;
    declare_subscription(&channel, &shared.connector.options.exchange, sub).await?;
    // Prefetch is at most 65535 (checked by Subscription::validate).
    channel
        .basic_qos(sub.prefetch as u16, BasicQosOptions { global: false })
        .await
        .map_err(|e| map_err(e, "cannot set the prefetch"))?;
    let consumer = channel
        .basic_consume(
            sub.group.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| map_err(e, &format!("cannot consume group `{}`", sub.group)))?;
    Ok((channel, consumer))
}

/// Reopen after a lost channel or connection, with backoff, until it works or the
/// subscription closes (C11). Errors other than lost connections end the attempt
/// and are reported on the stream.
async fn reopen(shared: Arc<Shared>) -> Result<(Channel, Consumer)> {
    let mut backoff = reconnect_backoff();
    loop {
        if shared.closing.load(Ordering::Acquire) {
            return Err(Error::closed("the subscription is closing"));
        }
        match open(&shared).await {
            Ok(opened) => {
                tracing::info!(group = %shared.sub.group, "amqp subscription resumed");
                return Ok(opened);
            }
            Err(e) if e.is_connection() || e.is_timeout() => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(group = %shared.sub.group, error = %e, ?wait, "amqp resubscribe failed");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

impl AmqpSource {
    pub(crate) fn new(shared: Arc<Shared>, channel: Channel, consumer: Consumer) -> Self {
        let mut watchdog = tokio::time::interval(WATCHDOG_PERIOD);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let state = shared.consuming(channel, consumer);
        AmqpSource {
            shared,
            state,
            watchdog,
            topics: TopicCache::default(),
        }
    }

    /// Turn a lapin delivery into ours, or dead-letter it if it has used up its
    /// attempts (its consumers died holding it: quorum queues count that).
    fn accept(&mut self, d: lapin::message::Delivery, acks: Arc<AckBatch>) -> Option<Delivery> {
        let lapin::message::Delivery {
            delivery_tag,
            routing_key,
            redelivered,
            properties,
            data,
            ..
        } = d;
        acks.delivered(delivery_tag);
        let r = mapping::receive(&properties, data);
        let attempt = r.attempt.saturating_add(r.delivery_count);
        let topic = match &r.topic {
            Some(t) => self.topics.topic(t),
            None => self.topics.topic(routing_key.as_str()),
        };
        self.shared.unsettled.fetch_add(1, Ordering::AcqRel);
        let acker = AmqpAcker {
            shared: self.shared.clone(),
            acks,
            tag: delivery_tag,
            message: Arc::new(r.message),
            topic,
            attempt,
        };
        if is_exhausted_on_receipt(&self.shared.sub.retry, attempt) {
            tokio::spawn(async move {
                let _guard = Unsettled {
                    shared: acker.shared.clone(),
                    requeue: None,
                };
                let dead = exhausted_dead_letter(
                    &acker.message,
                    acker.topic.as_str(),
                    attempt,
                    &acker.shared.sub.group,
                );
                if let Err(e) = acker.dead_letter(&dead).await {
                    tracing::warn!(error = %e, "dead-lettering an exhausted message failed; the broker redelivers it");
                }
            });
            return None;
        }
        let message = acker.message.clone();
        let topic = acker.topic.clone();
        let wire = Wire::delivery_tag(acker.tag);
        Some(
            Delivery::new(
                message,
                topic,
                attempt,
                redelivered || attempt > 1,
                Box::new(acker),
            )
            .with_wire(wire),
        )
    }
}

#[async_trait]
impl DeliverySource for AmqpSource {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Delivery>>> {
        loop {
            match &mut self.state {
                State::Done => return Poll::Ready(None),
                State::Reconnecting(opening) => match opening.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok((channel, consumer))) => {
                        self.state = self.shared.consuming(channel, consumer);
                    }
                    Poll::Ready(Err(e)) => {
                        if self.shared.closing.load(Ordering::Acquire) {
                            self.state = State::Done;
                            return Poll::Ready(None);
                        }
                        // Report it, and keep trying: the caller may close.
                        self.state = State::Reconnecting(Box::pin(reopen(self.shared.clone())));
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                State::Consuming {
                    consumer,
                    channel,
                    acks,
                } => match consumer.poll_next_unpin(cx) {
                    Poll::Pending => {
                        // Nothing more to hand out: if the broker is close to
                        // the prefetch, what was acked goes now so it sends more.
                        acks.quiet();
                        let mut lost = false;
                        while self.watchdog.poll_tick(cx).is_ready() {
                            lost |= !channel.status().connected();
                        }
                        if !lost || self.shared.closing.load(Ordering::Acquire) {
                            return Poll::Pending;
                        }
                        tracing::warn!(group = %self.shared.sub.group, "amqp channel closed under a quiet consumer; resubscribing");
                        self.state = State::Reconnecting(Box::pin(reopen(self.shared.clone())));
                    }
                    Poll::Ready(Some(Ok(d))) => {
                        let acks = acks.clone();
                        if let Some(delivery) = self.accept(d, acks) {
                            return Poll::Ready(Some(Ok(delivery)));
                        }
                    }
                    Poll::Ready(other) => {
                        if self.shared.closing.load(Ordering::Acquire) {
                            self.state = State::Done;
                            return Poll::Ready(None);
                        }
                        match other {
                            Some(Err(e)) => {
                                tracing::warn!(group = %self.shared.sub.group, error = %e, "amqp consumer lost; resubscribing")
                            }
                            _ => {
                                tracing::warn!(group = %self.shared.sub.group, "amqp consumer cancelled; resubscribing")
                            }
                        }
                        self.state = State::Reconnecting(Box::pin(reopen(self.shared.clone())));
                    }
                },
            }
        }
    }

    /// The group queue's ready messages, from a passive `queue.declare` every
    /// two seconds on a channel of its own (`depth.rs`), from the first read on: the
    /// probe itself does no I/O, and without a metrics SDK nothing reads it.
    fn depth_probe(&self) -> Option<DepthProbe> {
        let depth = Arc::new(AtomicU64::new(u64::MAX));
        let (rt, shared) = (self.shared.rt.clone(), Arc::downgrade(&self.shared));
        let started = AtomicBool::new(false);
        Some(Arc::new(move || {
            if !started.swap(true, Ordering::Relaxed) {
                rt.spawn(crate::depth::refresh(shared.clone(), depth.clone()));
            }
            match depth.load(Ordering::Relaxed) {
                u64::MAX => Vec::new(),
                known => vec![Depth::group(known)],
            }
        }))
    }

    async fn close(&mut self, grace: Duration) -> Result<()> {
        let shared = self.shared.clone();
        shared.closing.store(true, Ordering::Release);
        let State::Consuming {
            channel,
            consumer,
            acks,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Ok(());
        };
        // Stop fetching; what was already pushed stays unacked until the channel closes.
        // Each broker call is bounded: close must end even if the broker is stuck.
        let _ = tokio::time::timeout(
            CLOSE_RPC_TIMEOUT,
            channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
        )
        .await;
        let deadline = polybus_core::retry::deadline_after(grace);
        let unsettled = || shared.unsettled.load(Ordering::Acquire);
        if !wait_until(&shared.settled, Some(deadline), || unsettled() == 0).await {
            tracing::info!(group = %shared.sub.group, unsettled = unsettled(), "close deadline passed; the broker redelivers the rest");
        }
        // Queued before the queue delete and the channel close, so they go first.
        acks.flush();
        if !shared.sub.durable {
            let _ = tokio::time::timeout(
                CLOSE_RPC_TIMEOUT,
                channel.queue_delete(
                    shared.sub.group.as_str().into(),
                    QueueDeleteOptions::default(),
                ),
            )
            .await;
        }
        // Closing the channel hands every unacked message back to the broker (C10).
        shared.gone.store(true, Ordering::Release);
        let _ = tokio::time::timeout(
            CLOSE_RPC_TIMEOUT,
            channel.close(200, "subscription closed".into()),
        )
        .await;
        Ok(())
    }
}

impl Drop for AmqpSource {
    fn drop(&mut self) {
        // A dropped stream is a crash (C9): close the channel so the broker
        // redelivers what it held. Without a runtime the connection's end does it.
        self.shared.gone.store(true, Ordering::Release);
        if let State::Consuming { channel, acks, .. } =
            std::mem::replace(&mut self.state, State::Done)
        {
            // Acks already made were answered `Ok`: they go before the close.
            acks.flush();
            self.shared.rt.spawn(async move {
                let _ = channel.close(200, "subscription dropped".into()).await;
            });
        }
    }
}

/// Round a delay up to a step of a ladder of ten steps a decade (at most 26%
/// longer), so a group needs few retry queues however its delays are jittered.
pub(crate) fn retry_step_ms(delay: Duration) -> u64 {
    const STEPS: [u64; 10] = [100, 125, 160, 200, 250, 315, 400, 500, 630, 800];
    let ms = (delay.as_millis() as u64).max(1);
    let mut decade: u64 = 1;
    loop {
        for step in STEPS {
            let v = step * decade / 100;
            if v >= ms {
                return v;
            }
        }
        decade *= 10;
    }
}

/// How long a delivery whose republish failed waits before it is handed back.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// Counts a settlement in progress. If it never finishes (its future dropped, or
/// a panic), the message is handed back to the broker rather than left
/// unacked on a live channel, holding a prefetch slot forever.
struct Unsettled {
    shared: Arc<Shared>,
    /// Set while the settlement is unfinished: the delivery to requeue.
    requeue: Option<(Arc<AckBatch>, u64)>,
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        if let Some((acks, tag)) = self.requeue.take() {
            acks.requeue(tag);
        }
        self.shared.settled_one();
    }
}

struct AmqpAcker {
    shared: Arc<Shared>,
    /// The coalescer of the channel this came on, and the delivery's tag there.
    acks: Arc<AckBatch>,
    tag: u64,
    message: Arc<Message>,
    topic: Topic,
    attempt: u32,
}

fn channel_gone(group: &str) -> Error {
    Error::closed(format!(
        "this delivery of group `{group}` can no longer be settled: its channel is gone, \
         and the broker redelivers the message"
    ))
}

impl AmqpAcker {
    /// Record the ack (see `acks` for when it is sent).
    fn ack(&self) -> Result<()> {
        if self.acks.ack(self.tag) {
            Ok(())
        } else {
            Err(channel_gone(&self.shared.sub.group))
        }
    }

    /// Settle with an ack at once, without a future: nothing here waits.
    fn ack_now(&self) -> Result<()> {
        let result = if self.shared.gone.load(Ordering::Acquire) {
            Err(channel_gone(&self.shared.sub.group))
        } else {
            self.ack()
        };
        self.shared.settled_one();
        result
    }

    /// Give the message back after a failed republish, so the delivery does not
    /// sit unsettled on a live channel. After a pause: a republish that keeps
    /// failing must not turn into a hot redelivery loop (C8).
    fn requeue(&self) {
        let (acks, tag) = (self.acks.clone(), self.tag);
        tokio::spawn(async move {
            tokio::time::sleep(REQUEUE_PAUSE).await;
            acks.requeue(tag);
        });
    }

    /// Republish to the group's retry queue for `delay`, as attempt `attempt`
    /// (the next one after a nack; the same one for an early scheduled message).
    async fn retry(&self, delay: Duration, attempt: u32) -> Result<()> {
        let sub = &self.shared.sub;
        let connector = &self.shared.connector;
        let step = retry_step_ms(delay);
        let result = async {
            let queue = connector.retry_queue(&sub.group, sub.durable, step).await?;
            let extra = [
                (header::ATTEMPT, attempt.to_string()),
                (header::TOPIC, self.topic.to_string()),
            ];
            connector
                .publish("", &queue, &self.message, &extra, true)
                .await
                .map_err(|f| f.into_error())
        }
        .await;
        match result {
            Ok(()) => self.ack(),
            Err(e) => {
                self.requeue();
                Err(e)
            }
        }
    }

    /// Move the delivery to the group's dead-letter store as `message`, its
    /// dead letter.
    async fn dead_letter(&self, message: &Message) -> Result<()> {
        // Straight to the store queue through the default exchange.
        let store = self.shared.sub.dead_letter_topic.as_str();
        let published = self
            .shared
            .connector
            .publish("", store, message, &[], true)
            .await;
        match published {
            Ok(()) => self.ack(),
            Err(failure) => {
                self.requeue();
                Err(failure.into_error())
            }
        }
    }

    async fn run(self: Box<Self>, settlement: Settlement) -> Result<()> {
        let mut guard = Unsettled {
            shared: self.shared.clone(),
            requeue: Some((self.acks.clone(), self.tag)),
        };
        // A dead channel's deliveries come back from the broker; republishing a
        // copy as well would deliver the message twice.
        if self.shared.gone.load(Ordering::Acquire) || !self.acks.usable() {
            guard.requeue = None;
            return Err(channel_gone(&self.shared.sub.group));
        }
        let result = match settlement {
            Settlement::Ack => self.ack(),
            Settlement::Retry { delay } => self.retry(delay, self.attempt.saturating_add(1)).await,
            Settlement::Defer { delay } => self.retry(delay, self.attempt).await,
            Settlement::DeadLetter(why) => {
                let dead = self.message.dead_lettered(
                    self.topic.as_str(),
                    self.attempt,
                    &why,
                    &self.shared.sub.group,
                );
                self.dead_letter(&dead).await
            }
            other => Err(Error::new(
                Kind::Unsupported,
                format!("settlement {other:?} is not known to the amqp backend"),
            )),
        };
        guard.requeue = None;
        result
    }
}

impl Acker for AmqpAcker {
    fn retry_policy(&self) -> &RetryPolicy {
        &self.shared.sub.retry
    }

    fn settle(self: Box<Self>, settlement: Settlement) -> SettleFuture {
        if let Settlement::Ack = settlement {
            return SettleFuture::ready(self.ack_now());
        }
        SettleFuture::boxed(async move { self.run(settlement).await })
    }

    fn settle_on_drop(self: Box<Self>, settlement: Settlement) {
        let rt = self.shared.rt.clone();
        spawn_settlement(&rt, self.run(settlement));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_steps_round_up_by_at_most_26_percent() {
        let ms = |n| retry_step_ms(Duration::from_millis(n));
        assert_eq!(ms(100), 100);
        assert_eq!(ms(101), 125);
        assert_eq!(ms(600), 630);
        assert_eq!(ms(1000), 1000);
        assert_eq!(ms(60_000), 63_000);
        for n in [10u64, 37, 999, 1234, 77_777, 3_600_000] {
            let s = ms(n);
            assert!(s >= n && (s as f64) <= n as f64 * 1.26 + 1.0, "{n} -> {s}");
        }
    }
}
