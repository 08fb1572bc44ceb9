//! [`Consumer`]: the handler runtime. It runs an async handler for each delivery
//! of a subscription, several at once, and settles each by its outcome.
//!
//! | outcome | settlement |
//! |---|---|
//! | `Ok(())` | ack |
//! | `Err(HandlerError::retry(..))`, or an error converted by `?` | nack: redelivered after the retry policy's delay, dead-lettered after the last attempt |
//! | a polybus error converted by `?` that cannot succeed on retry (invalid input, payload too large, decode, encode) | dead letter, with the error as reason |
//! | `Err(HandlerError::permanent(..))` | dead letter, with the error as reason |
//! | the payload does not decode into the handler's type | dead letter, with the decode error as reason |
//! | the handler panics | nack (the runtime keeps running) |
//! | the handler exceeds its time-out | nack |
//!
//! ```
//! # async fn demo(bus: polybus_core::Bus) -> polybus_core::Result<()> {
//! use std::time::Duration;
//! use polybus_core::consumer::{Consumer, HandlerError, Json};
//! use polybus_core::{RetryPolicy, Subscription};
//!
//! #[derive(serde::Deserialize)]
//! struct User { id: String }
//!
//! let stats = Consumer::new(bus.clone(), Subscription::new("user.*").group("billing"))
//!     .retry(RetryPolicy::exponential(Duration::from_millis(100)).max_attempts(5))
//!     .concurrency(16)
//!     .handler_timeout(Duration::from_secs(10))
//!     .shutdown_on(async { /* e.g. polybus_core::consumer::ctrl_c() */ })
//!     .run(|Json(user): Json<User>| async move {
//!         if user.id.is_empty() {
//!             return Err(HandlerError::permanent("a user without an id"));
//!         }
//!         Ok(())
//!     })
//!     .await?;
//! println!("{stats:?}");
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;

use crate::{Bus, Codec, Delivery, Kind, Message, Result, RetryPolicy, Subscription};

/// What a handler receives, made from a delivery. A failure to make it (an
/// undecodable payload) dead-letters the delivery with the error as reason.
pub trait FromDelivery: Sized + Send + 'static {
    /// Build the handler's argument.
    fn from_delivery(delivery: &Delivery) -> Result<Self>;
}

/// A payload decoded as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned + Send + 'static> FromDelivery for Json<T> {
    fn from_delivery(delivery: &Delivery) -> Result<Self> {
        delivery.json().map(Json)
    }
}

/// A payload decoded with any [`Codec`].
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded<C, T>(pub T, std::marker::PhantomData<C>);

impl<C: Codec + Send + 'static, T: DeserializeOwned + Send + 'static> FromDelivery
    for Decoded<C, T>
{
    fn from_delivery(delivery: &Delivery) -> Result<Self> {
        delivery
            .decode::<C, T>()
            .map(|v| Decoded(v, std::marker::PhantomData))
    }
}

/// The whole message, undecoded.
impl FromDelivery for Message {
    fn from_delivery(delivery: &Delivery) -> Result<Self> {
        Ok(delivery.message().clone())
    }
}

/// Why a handler failed, and so how its delivery is settled.
pub struct HandlerError {
    permanent: bool,
    reason: String,
}

impl HandlerError {
    /// Worth another try: nack, redelivered after the retry policy's delay.
    pub fn retry(reason: impl fmt::Display) -> Self {
        HandlerError {
            permanent: false,
            reason: reason.to_string(),
        }
    }

    /// Hopeless: dead-letter with `reason`.
    pub fn permanent(reason: impl fmt::Display) -> Self {
        HandlerError {
            permanent: true,
            reason: reason.to_string(),
        }
    }

    /// Whether the delivery is dead-lettered rather than retried.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }
}

/// `?` on an error means "try again" ([`HandlerError::retry`]), with one
/// exception: polybus's own errors ([`Error`](crate::Error),
/// [`PublishError`](crate::PublishError)) that can never succeed on a retry of
/// the same message become [`HandlerError::permanent`], so the message is
/// dead-lettered at once instead of burning its attempts: invalid input, an
/// oversize payload, a payload that does not decode or encode. Every other
/// polybus error (a lost connection, a time-out, a refusal, a closed bus, an open
/// circuit) and every foreign error retries, since the handler cannot know it
/// will fail again.
impl<E: std::error::Error + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        if never_succeeds_on_retry(&e) {
            HandlerError::permanent(e)
        } else {
            HandlerError::retry(e)
        }
    }
}

fn never_succeeds_on_retry(e: &(dyn std::error::Error + 'static)) -> bool {
    let kind = if let Some(e) = e.downcast_ref::<crate::Error>() {
        e.kind()
    } else if let Some(e) = e.downcast_ref::<crate::PublishError>() {
        e.kind()
    } else {
        return false;
    };
    matches!(
        kind,
        Kind::InvalidInput | Kind::PayloadTooLarge | Kind::Decode | Kind::Encode
    )
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("permanent", &self.permanent)
            .field("reason", &self.reason)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// What a run did, counted by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Handled and acked.
    pub acked: u64,
    /// Failed (error, time-out or panic) and nacked for a retry or its last-attempt dead letter.
    pub nacked: u64,
    /// Dead-lettered: a permanent error or an undecodable payload.
    pub dead_lettered: u64,
    /// Of the nacked, how many panicked.
    pub panicked: u64,
    /// Settlements the broker refused (the broker redelivers those).
    pub settle_failed: u64,
}

enum Outcome {
    Panicked,
    Acked,
    Nacked,
    DeadLettered,
    SettleFailed,
}

type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The handler runtime; see the [module docs](self).
pub struct Consumer {
    bus: Bus,
    subscription: Subscription,
    concurrency: usize,
    handler_timeout: Option<Duration>,
    grace: Duration,
    shutdown: Shutdown,
    lanes: bool,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("subscription", &self.subscription)
            .field("concurrency", &self.concurrency)
            .field("handler_timeout", &self.handler_timeout)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

/// Resolves on Ctrl-C (SIGINT), for [`Consumer::shutdown_on`] in binaries.
pub async fn ctrl_c() {
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::warn!(error = %e, "cannot listen for ctrl-c; running until stopped otherwise");
        std::future::pending::<()>().await;
    }
}

impl Consumer {
    /// A runtime for `subscription` on `bus`: one handler at a time, no handler
    /// time-out, 30 s of grace at shutdown, running until the subscription ends.
    pub fn new(bus: Bus, subscription: Subscription) -> Self {
        Consumer {
            bus,
            subscription,
            concurrency: 1,
            handler_timeout: None,
            grace: crate::subscription::DEFAULT_CLOSE_GRACE,
            shutdown: Box::pin(std::future::pending()),
            lanes: false,
        }
    }

    /// Per-key lanes: deliveries with the same key are handled one at a time, in
    /// the order they arrive, while other keys run concurrently. Deliveries
    /// without a key run freely. A lane's waiting deliveries count against the
    /// prefetch, so give the subscription a prefetch well above the concurrency,
    /// or one busy key can keep the others from being fetched.
    pub fn lanes_by_key(mut self, on: bool) -> Self {
        self.lanes = on;
        self
    }

    /// The subscription's retry policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.subscription = self.subscription.retry(policy);
        self
    }

    /// Run up to `n` handlers at once (at least 1). The subscription's prefetch is
    /// raised to `n` if lower, so the limit can be reached.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Count a handler that runs longer than `limit` as a retryable failure.
    pub fn handler_timeout(mut self, limit: Duration) -> Self {
        self.handler_timeout = Some(limit);
        self
    }

    /// At shutdown, how long in-flight handlers may take to finish.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Shut down gracefully when `signal` resolves: stop fetching, let in-flight
    /// handlers finish and settle within the grace, then close. Whatever is still
    /// unsettled is redelivered later (C10).
    pub fn shutdown_on(mut self, signal: impl Future<Output = ()> + Send + 'static) -> Self {
        self.shutdown = Box::pin(signal);
        self
    }

    /// Run `handler` for every delivery until shutdown or the end of the
    /// subscription. Fails only if the subscription cannot be opened.
    pub async fn run<T, H, Fut>(self, handler: H) -> Result<Stats>
    where
        T: FromDelivery,
        H: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let Consumer {
            bus,
            subscription,
            concurrency,
            handler_timeout,
            grace,
            mut shutdown,
            lanes,
        } = self;
        let prefetch = subscription.prefetch_limit().max(concurrency as u32);
        let mut stream = bus.subscribe(subscription.prefetch(prefetch)).await?;
        let mut run = Run {
            handler: Arc::new(handler),
            handler_timeout,
            lanes,
            tasks: JoinSet::new(),
            waiting: HashMap::new(),
            stats: Stats::default(),
        };
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(done) = run.tasks.join_next(), if !run.tasks.is_empty() => run.finished(done),
                next = stream.next(), if run.tasks.len() < concurrency => match next {
                    Some(Ok(delivery)) => run.admit(delivery),
                    // Broker backends report a lost connection here and resume.
                    Some(Err(e)) => tracing::warn!(error = %e, "subscription error"),
                    None => break,
                },
            }
        }
        Ok(run.shut_down(stream, grace).await)
    }
}

/// One run of a [`Consumer`]: its handlers in flight and its lanes.
struct Run<H> {
    handler: Arc<H>,
    handler_timeout: Option<Duration>,
    lanes: bool,
    tasks: JoinSet<(Outcome, Option<String>)>,
    /// Per-key lanes: a key is here while one of its deliveries runs; its later
    /// deliveries wait here, in order.
    waiting: HashMap<String, VecDeque<Delivery>>,
    stats: Stats,
}

impl<H> Run<H> {
    /// Start a delivery's handler now, or queue it behind its key's lane.
    fn admit<T, Fut>(&mut self, delivery: Delivery)
    where
        T: FromDelivery,
        H: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let key = delivery.message().key().filter(|_| self.lanes);
        match key {
            Some(key) if self.waiting.contains_key(key) => {
                let key = key.to_owned();
                self.waiting
                    .get_mut(&key)
                    .expect("checked")
                    .push_back(delivery);
            }
            Some(key) => {
                self.waiting.insert(key.to_owned(), VecDeque::new());
                self.spawn(delivery);
            }
            None => self.spawn(delivery),
        }
    }

    fn spawn<T, Fut>(&mut self, delivery: Delivery)
    where
        T: FromDelivery,
        H: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let lane = if self.lanes {
            delivery.message().key().map(str::to_owned)
        } else {
            None
        };
        let fut = handle(delivery, self.handler.clone(), self.handler_timeout);
        self.tasks.spawn(async move {
            // A panic unwinds through `handle`, dropping (so nacking) the
            // delivery; catching it here keeps the lane's key.
            let outcome = std::panic::AssertUnwindSafe(fut)
                .catch_unwind()
                .await
                .unwrap_or(Outcome::Panicked);
            (outcome, lane)
        });
    }

    /// Count a finished handler, and start the next delivery of its lane.
    fn finished<T, Fut>(&mut self, done: Done)
    where
        T: FromDelivery,
        H: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        if let Some(lane) = count(&mut self.stats, done) {
            match self.waiting.get_mut(&lane).and_then(VecDeque::pop_front) {
                Some(next) => self.spawn(next),
                None => {
                    self.waiting.remove(&lane);
                }
            }
        }
    }

    /// Stop fetching and let the running handlers finish within the grace.
    /// Deliveries waiting in a lane are not started any more.
    async fn shut_down(mut self, stream: crate::DeliveryStream, grace: Duration) -> Stats {
        let deadline = crate::retry::deadline_after(grace);
        let drain = async {
            while let Some(done) = self.tasks.join_next().await {
                count(&mut self.stats, done);
            }
        };
        let finished = tokio::time::timeout_at(deadline, drain).await.is_ok();
        // Close before letting go of anything: the broker takes back whatever is
        // unsettled (lane deliveries that never ran, handlers still running) in
        // order and at once, instead of each being nacked into a retry delay.
        if let Err(e) = stream.close(Duration::ZERO).await {
            tracing::warn!(error = %e, "closing the subscription failed; the broker redelivers what it holds");
        }
        drop(self.waiting);
        if !finished {
            tracing::info!(
                in_flight = self.tasks.len(),
                "shutdown grace passed; abandoning handlers"
            );
            // Not joined: a handler stuck in blocking code must not hold up shutdown.
            self.tasks.abort_all();
            self.tasks.detach_all();
        }
        self.stats
    }
}

/// What a handler task ends with.
type Done = std::result::Result<(Outcome, Option<String>), tokio::task::JoinError>;

/// Count a finished handler; returns its lane, if it had one, to start the next.
fn count(stats: &mut Stats, done: Done) -> Option<String> {
    let (outcome, lane) = match done {
        Ok(done) => done,
        // Aborted at shutdown: the delivery is left for redelivery.
        Err(_) => return None,
    };
    match outcome {
        Outcome::Panicked => {
            tracing::warn!("a handler panicked; its delivery is retried");
            stats.nacked += 1;
            stats.panicked += 1;
        }
        Outcome::Acked => stats.acked += 1,
        Outcome::Nacked => stats.nacked += 1,
        Outcome::DeadLettered => stats.dead_lettered += 1,
        Outcome::SettleFailed => stats.settle_failed += 1,
    }
    lane
}

async fn handle<T, H, Fut>(delivery: Delivery, handler: Arc<H>, limit: Option<Duration>) -> Outcome
where
    T: FromDelivery,
    H: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
{
    let settle = |r: Result<()>, outcome| match r {
        Ok(()) => outcome,
        Err(e) => {
            tracing::warn!(error = %e, "settlement failed; the broker redelivers the message");
            Outcome::SettleFailed
        }
    };
    let arg = match T::from_delivery(&delivery) {
        Ok(arg) => arg,
        Err(e) => {
            let r = delivery.dead_letter(e.to_string()).await;
            return settle(r, Outcome::DeadLettered);
        }
    };
    let result = match limit {
        None => handler(arg).await,
        Some(limit) => match tokio::time::timeout(limit, handler(arg)).await {
            Ok(r) => r,
            Err(_) => Err(HandlerError::retry(format!(
                "the handler took longer than {limit:?}"
            ))),
        },
    };
    match result {
        Ok(()) => settle(delivery.ack().await, Outcome::Acked),
        Err(e) if e.is_permanent() => {
            settle(delivery.dead_letter(e.reason).await, Outcome::DeadLettered)
        }
        Err(e) => {
            tracing::debug!(error = %e, attempt = delivery.attempt(), "handler failed; nacking");
            settle(delivery.nack_because(&e).await, Outcome::Nacked)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Error, PublishError};

    fn question_mark(e: impl std::error::Error + 'static) -> HandlerError {
        let r: std::result::Result<(), _> = Err(e);
        let converted = || -> std::result::Result<(), HandlerError> { Ok(r?) };
        converted().unwrap_err()
    }

    #[test]
    fn question_mark_keeps_what_polybus_errors_say_about_retrying() {
        assert!(question_mark(Error::invalid_input("bad topic")).is_permanent());
        assert!(question_mark(Error::new(Kind::Decode, "not json")).is_permanent());
        let too_big = Error::new(Kind::PayloadTooLarge, "too big");
        assert!(
            question_mark(PublishError::not_delivered(too_big, Message::new("x"))).is_permanent()
        );
        assert!(!question_mark(Error::new(Kind::Connection, "lost")).is_permanent());
        assert!(!question_mark(Error::closed("shutting down")).is_permanent());
        let lost = Error::new(Kind::Timeout, "no confirm");
        assert!(
            !question_mark(PublishError::maybe_delivered(lost, Message::new("x"))).is_permanent()
        );
    }

    #[test]
    fn question_mark_retries_foreign_errors() {
        let io = std::io::Error::other("downstream is down");
        let e = question_mark(io);
        assert!(!e.is_permanent());
        assert_eq!(e.to_string(), "downstream is down");
    }
}
