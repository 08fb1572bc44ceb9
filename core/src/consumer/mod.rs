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

mod handler;
mod run;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub use handler::{Decoded, FromDelivery, HandlerError, Json, Meta};

use crate::{Bus, DeliveryStream, Error, Kind, Result, RetryPolicy, Subscription};
use run::Run;

/// What a run did, counted by outcome. Compare it in a test with a literal
/// that ends in `..Stats::default()`, so new counters added later do not break
/// the test:
///
/// ```
/// use polybus_core::consumer::Stats;
/// let expected = Stats { acked: 2, dead_lettered: 1, ..Stats::default() };
/// assert_eq!(expected.nacked, 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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

    /// The subscription's retry policy: replaces the one set with
    /// [`Subscription::retry`] (the last call wins). After the last attempt a
    /// failing message is dead-lettered with the reason
    /// `gave up after N attempts: <the handler's last error>`.
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
    ///
    /// The subscription is opened when the returned future is first polled, and
    /// a new group starts at "now" (C3): a message published after
    /// `tokio::spawn(consumer.run(handler))` but before the task first runs is not
    /// this group's. Use [`start`](Self::start), which returns once the
    /// subscription is live, when something is published right after.
    pub async fn run<T, H, Fut>(self, handler: H) -> Result<Stats>
    where
        T: FromDelivery,
        H: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let (opened, stream) = self.open().await?;
        let (progress, _) = watch::channel(Stats::default());
        Ok(opened.drive(stream, handler, progress).await)
    }

    /// Open the subscription, then run `handler` in a task of its own; returns
    /// once the subscription is live, so whatever is published afterwards is
    /// handled (C3). The [`Running`] handle reads live stats, waits for them,
    /// and stops the consumer gracefully.
    ///
    /// ```
    /// # async fn demo(bus: polybus_core::Bus) -> polybus_core::Result<()> {
    /// use polybus_core::consumer::Consumer;
    /// use polybus_core::{Message, Subscription};
    ///
    /// let mut running = Consumer::new(bus.clone(), Subscription::new("order.*").group("billing"))
    ///     .start(|order: Message| async move { Ok(()) })
    ///     .await?;
    /// bus.publish("order.placed", Message::new("o1")).await?; // handled: the group is live
    /// running.wait_for(|s| s.acked == 1).await;
    /// let stats = running.stop().await?;
    /// assert_eq!(stats.acked, 1);
    /// # Ok(()) }
    /// ```
    pub async fn start<T, H, Fut>(self, handler: H) -> Result<Running>
    where
        T: FromDelivery,
        H: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let (mut opened, stream) = self.open().await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = std::mem::replace(&mut opened.shutdown, Box::pin(std::future::pending()));
        opened.shutdown = Box::pin(async move {
            // Either the caller's signal or `Running::stop`; a dropped handle
            // (`stop` never sent) leaves the caller's signal in charge.
            let stopped = async move {
                if stopped.await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = shutdown => {}
                () = stopped => {}
            }
        });
        let (progress, stats) = watch::channel(Stats::default());
        let task = tokio::spawn(opened.drive(stream, handler, progress));
        Ok(Running {
            stop: Some(stop),
            stats,
            task,
        })
    }

    /// [`start`](Self::start) with shared state: each call gets `state` (cloned;
    /// make it an `Arc` or a handle that is cheap to clone) and the extracted
    /// argument, so the handler needs no clone of its own.
    ///
    /// ```
    /// # async fn demo(bus: polybus_core::Bus) -> polybus_core::Result<()> {
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use polybus_core::consumer::Consumer;
    /// use polybus_core::{Message, Subscription};
    ///
    /// let billed = Arc::new(AtomicU64::new(0));
    /// let running = Consumer::new(bus, Subscription::new("order.placed").group("billing"))
    ///     .start_with(billed.clone(), |billed: Arc<AtomicU64>, _order: Message| async move {
    ///         billed.fetch_add(1, Ordering::Relaxed);
    ///         Ok(())
    ///     })
    ///     .await?;
    /// # running.stop().await?;
    /// # Ok(()) }
    /// ```
    pub async fn start_with<S, T, H, Fut>(self, state: S, handler: H) -> Result<Running>
    where
        S: Clone + Send + Sync + 'static,
        T: FromDelivery,
        H: Fn(S, T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        self.start(move |arg: T| handler(state.clone(), arg)).await
    }

    /// [`run`](Self::run) with shared state; see [`start_with`](Self::start_with).
    pub async fn run_with<S, T, H, Fut>(self, state: S, handler: H) -> Result<Stats>
    where
        S: Clone + Send + Sync + 'static,
        T: FromDelivery,
        H: Fn(S, T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        self.run(move |arg: T| handler(state.clone(), arg)).await
    }

    /// Subscribe with the prefetch the concurrency needs.
    async fn open(self) -> Result<(Opened, DeliveryStream)> {
        let prefetch = self
            .subscription
            .prefetch_limit()
            .max(self.concurrency as u32);
        let stream = self
            .bus
            .subscribe(self.subscription.prefetch(prefetch))
            .await?;
        let opened = Opened {
            concurrency: self.concurrency,
            handler_timeout: self.handler_timeout,
            grace: self.grace,
            shutdown: self.shutdown,
            lanes: self.lanes,
        };
        Ok((opened, stream))
    }
}

/// A consumer whose subscription is open: what its loop needs.
struct Opened {
    concurrency: usize,
    handler_timeout: Option<Duration>,
    grace: Duration,
    shutdown: Shutdown,
    lanes: bool,
}

impl Opened {
    /// Handle deliveries until shutdown or the end of the subscription.
    async fn drive<T, H, Fut>(
        mut self,
        mut stream: DeliveryStream,
        handler: H,
        progress: watch::Sender<Stats>,
    ) -> Stats
    where
        T: FromDelivery,
        H: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let mut run = Run::new(handler, self.handler_timeout, self.lanes, progress);
        loop {
            tokio::select! {
                biased;
                () = &mut self.shutdown => break,
                Some(done) = run.tasks.join_next(), if !run.tasks.is_empty() => run.finished(done),
                next = stream.next(), if run.tasks.len() < self.concurrency => match next {
                    Some(Ok(delivery)) => run.admit(delivery),
                    // Broker backends report a lost connection here and resume.
                    Some(Err(e)) => tracing::warn!(error = %e, "subscription error"),
                    None => break,
                },
            }
        }
        run.shut_down(stream, self.grace).await
    }
}

/// A consumer started with [`Consumer::start`]: live, running in a task.
///
/// Dropping it leaves the consumer running until its
/// [`shutdown_on`](Consumer::shutdown_on) signal or the end of its subscription.
#[derive(Debug)]
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    stats: watch::Receiver<Stats>,
    task: JoinHandle<Stats>,
}

impl Running {
    /// What the consumer has done so far.
    pub fn stats(&self) -> Stats {
        *self.stats.borrow()
    }

    /// Wait until the stats satisfy `done` (for example
    /// `|s| s.acked + s.dead_lettered >= 3`), and return them; or, if the
    /// consumer ends first, its final stats.
    pub async fn wait_for(&mut self, mut done: impl FnMut(&Stats) -> bool) -> Stats {
        if let Ok(stats) = self.stats.wait_for(|s| done(s)).await {
            return *stats;
        }
        // The consumer ended: its last stats.
        self.stats()
    }

    /// Shut down gracefully, as [`shutdown_on`](Consumer::shutdown_on) does:
    /// stop fetching, let running handlers finish within the grace, leave the
    /// rest for redelivery; then the final stats.
    pub async fn stop(mut self) -> Result<Stats> {
        if let Some(stop) = self.stop.take() {
            // Already ended if the receiver is gone: nothing to stop.
            let _ = stop.send(());
        }
        self.join().await
    }

    /// Wait until the consumer ends (its shutdown signal, or the end of its
    /// subscription), and return its final stats.
    pub async fn join(self) -> Result<Stats> {
        self.task.await.map_err(|e| {
            Error::new(
                Kind::Other,
                format!("the consumer's task ended abnormally: {e}"),
            )
        })
    }
}
