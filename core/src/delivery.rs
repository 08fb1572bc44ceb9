//! [`Delivery`] and its settlement (clause C7).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;

#[cfg(not(feature = "otel"))]
use crate::backend::settle::SettleFuture;
use crate::backend::settle::{Acker, AckerRef, DeadLetter, Settlement, nack_settlement};
use crate::error::Result;
use crate::message::{Codec, Message};
use crate::topic::Topic;

/// One message handed to a subscriber, to be settled exactly once.
///
/// Settling consumes the delivery, so it cannot be settled twice. Dropping it
/// unsettled counts as [`nack`](Delivery::nack).
pub struct Delivery {
    message: Arc<Message>,
    topic: Topic,
    attempt: u32,
    redelivered: bool,
    acker: Option<AckerRef>,
    #[cfg(feature = "otel")]
    wire: crate::backend::Wire,
    /// The `process` span, from hand-out to settlement.
    #[cfg(feature = "otel")]
    process: Option<Box<crate::telemetry::Process>>,
}

impl Delivery {
    /// See [`DeliveryExt::new`](crate::backend::DeliveryExt::new).
    pub(crate) fn assemble(
        message: Arc<Message>,
        topic: Topic,
        attempt: u32,
        redelivered: bool,
        acker: AckerRef,
    ) -> Self {
        Delivery {
            message,
            topic,
            attempt: attempt.max(1),
            redelivered,
            acker: Some(acker),
            #[cfg(feature = "otel")]
            wire: crate::backend::Wire::default(),
            #[cfg(feature = "otel")]
            process: None,
        }
    }

    /// See [`DeliveryExt::with_wire`](crate::backend::DeliveryExt::with_wire).
    #[cfg_attr(not(feature = "otel"), allow(unused_variables, unused_mut))]
    pub(crate) fn with_wire(mut self, wire: crate::backend::Wire) -> Self {
        #[cfg(feature = "otel")]
        {
            self.wire = wire;
        }
        self
    }

    /// Start the `process`: the delivery is being handed out.
    #[cfg(feature = "otel")]
    pub(crate) fn start_process(
        &mut self,
        telemetry: &mut crate::telemetry::StreamTelemetry,
        batched: bool,
    ) {
        if self.process.is_none() {
            let process = telemetry.process(
                &self.message,
                self.topic.as_str(),
                self.attempt,
                &self.wire,
                batched,
            );
            self.process = Some(Box::new(process));
        }
    }

    /// The OpenTelemetry context of this delivery's `process` span (feature
    /// `otel`): the parent for spans of the work it causes. The handler runtime
    /// runs each handler inside it already. Without a `process` span (a
    /// delivery not handed out by a stream), the current context.
    #[cfg(feature = "otel")]
    pub fn otel_context(&self) -> opentelemetry::Context {
        match &self.process {
            Some(p) => p.context(),
            None => opentelemetry::Context::current(),
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
        let acker = self.take_acker();
        self.settle(acker, Settlement::Ack).await
    }

    /// Failed: deliver it again after the retry policy's delay, or dead-letter it if
    /// this was its last attempt (C8).
    pub async fn nack(mut self) -> Result<()> {
        let acker = self.take_acker();
        let settlement = nack_settlement(acker.retry_policy(), self.attempt);
        self.settle(acker, settlement).await
    }

    /// As [`nack`](Self::nack), and if this was the last attempt, the dead letter
    /// says why the last attempt failed: its reason reads
    /// `gave up after N attempts: <reason>`, and the header
    /// [`LAST_ERROR`](crate::header::LAST_ERROR) holds `<reason>` alone.
    pub async fn nack_because(mut self, reason: impl std::fmt::Display) -> Result<()> {
        let acker = self.take_acker();
        let settlement = match nack_settlement(acker.retry_policy(), self.attempt) {
            Settlement::DeadLetter(gave_up) => {
                let last_error = reason.to_string();
                Settlement::DeadLetter(DeadLetter {
                    reason: format!("{}: {last_error}", gave_up.reason),
                    last_error: Some(last_error),
                })
            }
            retry => retry,
        };
        self.settle(acker, settlement).await
    }

    /// Hopeless: move it to the group's dead-letter topic with `reason`.
    pub async fn dead_letter(mut self, reason: impl Into<String>) -> Result<()> {
        let acker = self.take_acker();
        let settlement = Settlement::DeadLetter(DeadLetter::because(reason));
        self.settle(acker, settlement).await
    }

    /// Carry out `settlement` through `acker`.
    #[cfg(not(feature = "otel"))]
    #[allow(clippy::unused_self)]
    fn settle(&mut self, acker: AckerRef, settlement: Settlement) -> SettleFuture {
        acker.settle(settlement)
    }

    /// Carry out `settlement` through `acker`, within its span if the delivery
    /// has a `process` span.
    #[cfg(feature = "otel")]
    fn settle(
        &mut self,
        acker: AckerRef,
        settlement: Settlement,
    ) -> impl Future<Output = Result<()>> + use<> {
        let span = self.process.take().map(|p| p.start_settle(&settlement));
        let settled = acker.settle(settlement);
        async move {
            let outcome = settled.await;
            if let Some(span) = span {
                span.finish(Some(&outcome));
            }
            outcome
        }
    }

    /// Send an early scheduled delivery back to wait `delay` more (C14), in
    /// the background, before anyone sees it.
    pub(crate) fn defer(mut self, delay: Duration) {
        #[cfg(feature = "otel")]
        drop(self.process.take());
        if let Some(acker) = self.acker.take() {
            acker.settle_on_drop(Settlement::Defer { delay });
        }
    }

    /// Let go of the delivery without settling it, as a consumer that died
    /// would: the broker gives it back when the subscription closes or is
    /// dropped (C9, C10), and nothing is republished. For the dead-letter
    /// operations, which must not turn a look at a dead letter into a retry.
    pub(crate) fn abandon(mut self) {
        #[cfg(feature = "otel")]
        drop(self.process.take());
        drop(self.acker.take());
    }

    /// A shared handle to the message, to keep it after the delivery is settled;
    /// it does not copy the message.
    pub fn message_arc(&self) -> Arc<Message> {
        self.message.clone()
    }

    /// See [`DeliveryExt::wrap_acker`](crate::backend::DeliveryExt::wrap_acker).
    pub(crate) fn wrap_acker(
        mut self,
        wrap: impl FnOnce(Box<dyn Acker>) -> Box<dyn Acker>,
    ) -> Self {
        let acker = self.take_acker().into_boxed();
        self.acker = Some(AckerRef::Boxed(wrap(acker)));
        self
    }

    fn take_acker(&mut self) -> AckerRef {
        self.acker
            .take()
            .expect("settlement consumes the delivery, so the acker is always present")
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
            #[cfg(feature = "otel")]
            if let Some(process) = self.process.take() {
                // Settled in the background: the outcome is not known here.
                process.start_settle(&settlement).finish(None);
            }
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
