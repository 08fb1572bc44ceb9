//! [`Delivery`] and its settlement (clause C7), and the [`DeliveryStream`] a
//! subscription yields (C6, C10).

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use serde::de::DeserializeOwned;

use crate::bus::BackendFuture;
use crate::error::Result;
use crate::message::{Codec, Message};
use crate::retry::RetryPolicy;
use crate::topic::Topic;

/// How a delivery is settled. Backends receive this from [`Delivery`]; the decision
/// between redelivery and dead-lettering after a `nack` is made once, here in the
/// core, from the subscription's [`RetryPolicy`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settlement {
    /// Done: never delivered to this group again.
    Ack,
    /// Deliver again, with `attempt + 1`, after `delay`.
    Retry {
        /// How long the broker holds the message back first.
        delay: Duration,
    },
    /// Move to the group's dead-letter topic.
    DeadLetter {
        /// Why; carried in the `polybus-dead-letter-reason` header.
        reason: String,
    },
}

/// What [`Acker::settle`] returns.
pub type SettleFuture = BackendFuture<'static, Result<()>>;

/// The backend's half of a delivery: it carries out the settlement.
pub trait Acker: Send + Sync + 'static {
    /// The retry policy of the subscription the delivery came from.
    fn retry_policy(&self) -> &RetryPolicy;

    /// Settle, and report whether the broker took the settlement. A delivery whose
    /// channel or subscription is gone returns a [`Closed`](crate::Kind::Closed) error;
    /// the broker redelivers it. A backend that settles without waiting answers
    /// with [`SettleFuture::ready`]; the settlement may then be done before the
    /// future is polled.
    fn settle(self: Box<Self>, settlement: Settlement) -> SettleFuture;

    /// Settle from `Drop`: must not block. Backends that need I/O spawn it.
    fn settle_on_drop(self: Box<Self>, settlement: Settlement);
}

/// One message handed to a subscriber, to be settled exactly once.
///
/// Settling consumes the delivery, so it cannot be settled twice. Dropping it
/// unsettled counts as [`nack`](Delivery::nack).
pub struct Delivery {
    message: Arc<Message>,
    topic: Topic,
    attempt: u32,
    redelivered: bool,
    acker: Option<Box<dyn Acker>>,
}

impl Delivery {
    /// Assemble a delivery; for backends.
    pub fn new(
        message: Arc<Message>,
        topic: Topic,
        attempt: u32,
        redelivered: bool,
        acker: Box<dyn Acker>,
    ) -> Self {
        Delivery {
            message,
            topic,
            attempt: attempt.max(1),
            redelivered,
            acker: Some(acker),
        }
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The topic it was published to.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// Which delivery of this message to this group this is, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether the message was delivered to this group before.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// Decode the payload with `codec`.
    pub fn decode<C: Codec, T: DeserializeOwned>(&self) -> Result<T> {
        self.message.decode::<C, T>()
    }

    /// Decode the payload as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        self.message.json_payload()
    }

    /// Done with it: it is never delivered to this group again.
    pub async fn ack(mut self) -> Result<()> {
        self.take_acker().settle(Settlement::Ack).await
    }

    /// Failed: deliver it again after the retry policy's delay, or dead-letter it if
    /// this was its last attempt (C8).
    pub async fn nack(mut self) -> Result<()> {
        let acker = self.take_acker();
        let settlement = nack_settlement(acker.retry_policy(), self.attempt);
        acker.settle(settlement).await
    }

    /// As [`nack`](Self::nack), and if this was the last attempt, the dead letter's
    /// reason says why the last attempt failed.
    pub async fn nack_because(mut self, reason: impl std::fmt::Display) -> Result<()> {
        let acker = self.take_acker();
        let settlement = match nack_settlement(acker.retry_policy(), self.attempt) {
            Settlement::DeadLetter { reason: gave_up } => Settlement::DeadLetter {
                reason: format!("{gave_up}: {reason}"),
            },
            retry => retry,
        };
        acker.settle(settlement).await
    }

    /// Hopeless: move it to the group's dead-letter topic with `reason`.
    pub async fn dead_letter(mut self, reason: impl Into<String>) -> Result<()> {
        self.take_acker()
            .settle(Settlement::DeadLetter {
                reason: reason.into(),
            })
            .await
    }

    /// A shared handle to the message, to keep it after the delivery is settled;
    /// it does not copy the message.
    pub fn message_arc(&self) -> Arc<Message> {
        self.message.clone()
    }

    fn take_acker(&mut self) -> Box<dyn Acker> {
        self.acker
            .take()
            .expect("settlement consumes the delivery, so the acker is always present")
    }
}

/// What a `nack` of the `attempt`-th delivery amounts to under `policy`.
pub fn nack_settlement(policy: &RetryPolicy, attempt: u32) -> Settlement {
    if policy.is_exhausted(attempt) {
        Settlement::DeadLetter {
            reason: format!("gave up after {attempt} attempts"),
        }
    } else {
        Settlement::Retry {
            delay: policy.delay_after(attempt),
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(acker) = self.acker.take() {
            tracing::debug!(
                message_id = self.message.id(),
                topic = %self.topic,
                attempt = self.attempt,
                "delivery dropped unsettled; nacking it"
            );
            let settlement = nack_settlement(acker.retry_policy(), self.attempt);
            acker.settle_on_drop(settlement);
        }
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("topic", &self.topic)
            .field("attempt", &self.attempt)
            .field("redelivered", &self.redelivered)
            .field("message", &self.message)
            .finish()
    }
}

/// The backend's half of a [`DeliveryStream`].
#[async_trait]
pub trait DeliverySource: Send + 'static {
    /// The next delivery, as [`Stream::poll_next`]. Never yields more than the
    /// prefetch unsettled deliveries at once (C6).
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Delivery>>>;

    /// Stop fetching, wait up to `grace` for unsettled deliveries to be settled,
    /// then give the rest back to the broker for redelivery (C10).
    async fn close(&mut self, grace: Duration) -> Result<()>;
}

/// The deliveries of one subscription, as a [`Stream`].
///
/// Dropping it without [`close`](DeliveryStream::close) is what a crash looks like:
/// every unsettled delivery is redelivered (C9).
pub struct DeliveryStream {
    source: Box<dyn DeliverySource>,
    /// An error met while a batch was being filled, reported by the next call.
    deferred: Option<crate::Error>,
}

impl DeliveryStream {
    /// Wrap a backend's source.
    pub fn new(source: impl DeliverySource) -> Self {
        DeliveryStream {
            source: Box::new(source),
            deferred: None,
        }
    }

    /// Up to `max` deliveries, gathered for at most `timeout`: returns as soon as
    /// `max` have come, or when the time is up with what has come (possibly none).
    /// The prefetch still bounds what is unsettled, so a batch larger than the
    /// prefetch fills only as earlier deliveries are settled. An error met after
    /// some deliveries were gathered is returned by the next call; a stream that
    /// has ended is a [`Closed`](crate::Kind::Closed) error once nothing is left.
    pub async fn next_batch(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        use futures::StreamExt;

        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let mut batch = Vec::with_capacity(max.min(1024));
        let deadline = crate::retry::deadline_after(timeout);
        while batch.len() < max {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Err(_) => break,
                Ok(Some(Ok(d))) => batch.push(d),
                Ok(Some(Err(e))) if batch.is_empty() => return Err(e),
                Ok(Some(Err(e))) => {
                    self.deferred = Some(e);
                    break;
                }
                Ok(None) if batch.is_empty() => {
                    return Err(crate::Error::closed("the subscription has ended"));
                }
                Ok(None) => break,
            }
        }
        Ok(batch)
    }

    /// Stop fetching, let in-flight deliveries be settled for up to `grace`, then
    /// leave the rest to be redelivered.
    pub async fn close(mut self, grace: Duration) -> Result<()> {
        self.source.close(grace).await
    }
}

impl Stream for DeliveryStream {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().source.poll_next(cx)
    }
}

impl fmt::Debug for DeliveryStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliveryStream").finish_non_exhaustive()
    }
}
