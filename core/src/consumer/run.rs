//! One run of a [`Consumer`](super::Consumer): handlers in flight, per-key
//! lanes, outcomes and settlement.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::task::JoinSet;

use super::Stats;
use super::handler::{FromDelivery, HandlerError};
use crate::{Delivery, Result};

pub(super) enum Outcome {
    Panicked,
    Acked,
    Nacked,
    DeadLettered,
    SettleFailed,
}

/// One run of a [`Consumer`]: its handlers in flight and its lanes.
pub(super) struct Run<H> {
    handler: Arc<H>,
    handler_timeout: Option<Duration>,
    lanes: bool,
    pub(super) tasks: JoinSet<(Outcome, Option<String>)>,
    /// Per-key lanes: a key is here while one of its deliveries runs; its later
    /// deliveries wait here, in order.
    waiting: HashMap<String, VecDeque<Delivery>>,
    stats: Stats,
    /// Where live stats go, for [`Running`](super::Running).
    progress: tokio::sync::watch::Sender<Stats>,
}

impl<H> Run<H> {
    pub(super) fn new(
        handler: H,
        handler_timeout: Option<Duration>,
        lanes: bool,
        progress: tokio::sync::watch::Sender<Stats>,
    ) -> Self {
        Run {
            handler: Arc::new(handler),
            handler_timeout,
            lanes,
            tasks: JoinSet::new(),
            waiting: HashMap::new(),
            stats: Stats::default(),
            progress,
        }
    }

    /// Count a finished handler and publish the new stats.
    fn tally(&mut self, done: Done) -> Option<String> {
        let lane = count(&mut self.stats, done);
        self.progress.send_replace(self.stats);
        lane
    }

    /// Start a delivery's handler now, or queue it behind its key's lane.
    pub(super) fn admit<T, Fut>(&mut self, delivery: Delivery)
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
        // The handler runs inside the delivery's `process` span, so its own
        // spans (and a publish it makes) belong to the message's trace.
        #[cfg(feature = "otel")]
        let cx = delivery.otel_context();
        let fut = handle(delivery, self.handler.clone(), self.handler_timeout);
        #[cfg(feature = "otel")]
        let fut = opentelemetry::context::FutureExt::with_context(fut, cx);
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
    pub(super) fn finished<T, Fut>(&mut self, done: Done)
    where
        T: FromDelivery,
        H: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        if let Some(lane) = self.tally(done) {
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
    pub(super) async fn shut_down(
        mut self,
        stream: crate::DeliveryStream,
        grace: Duration,
    ) -> Stats {
        let deadline = crate::retry::deadline_after(grace);
        let drain = async {
            while let Some(done) = self.tasks.join_next().await {
                self.tally(done);
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
pub(super) type Done = std::result::Result<(Outcome, Option<String>), tokio::task::JoinError>;

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
        Err(e) if e.is_permanent() => settle(
            delivery.dead_letter(e.into_reason()).await,
            Outcome::DeadLettered,
        ),
        Err(e) => {
            tracing::debug!(error = %e, attempt = delivery.attempt(), "handler failed; nacking");
            settle(delivery.nack_because(&e).await, Outcome::Nacked)
        }
    }
}
