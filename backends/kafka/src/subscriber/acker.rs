//! The settling half of a delivery.

use std::sync::Arc;
use std::time::Duration;

use polybus_core::backend::{Acker, MessageExt, SettleFuture, Settlement, spawn_settlement};
use polybus_core::{Error, Kind, Message, Result, RetryPolicy, header};

use super::partitions::Record;
use super::{Shared, millis_from_now};
use crate::mapping;

/// The settling half of one delivery.
pub(super) struct KafkaAcker {
    pub(super) shared: Arc<Shared>,
    pub(super) record: Record,
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
            Err(failure) => {
                let delay = self.shared.sub.retry.first_delay();
                self.shared
                    .hold_again(&self.record, self.record.attempt, delay);
                Err(failure.into_error())
            }
        }
    }

    /// Deliver again after `delay` as attempt `attempt`.
    async fn retry(&self, delay: Duration, attempt: u32) -> Result<()> {
        match &self.shared.retry_topic {
            // Durable groups: a copy on the retry topic, due after the delay;
            // the partition moves on (C7), and the copy survives restarts.
            Some(retry_topic) => {
                let extra = [
                    (header::ATTEMPT, attempt.to_string()),
                    (header::TOPIC, self.record.topic.as_str().to_owned()),
                    (mapping::DUE_MS, millis_from_now(delay).to_string()),
                ];
                self.move_to(retry_topic, &self.record.message, &extra)
                    .await
            }
            // Private groups end with their subscription: retry in memory.
            None => {
                if self.shared.hold_again(&self.record, attempt, delay) {
                    Ok(())
                } else {
                    Err(Shared::closed_error())
                }
            }
        }
    }

    /// Any settlement, waiting where one must: a retry or dead letter produces a
    /// copy and waits for its delivery report.
    async fn settle_later(self: Box<Self>, settlement: Settlement) -> Result<()> {
        match settlement {
            Settlement::Ack => self.finish(),
            Settlement::Retry { delay } => {
                self.retry(delay, self.record.attempt.saturating_add(1))
                    .await
            }
            // An early scheduled message waits as the same attempt.
            Settlement::Defer { delay } => self.retry(delay, self.record.attempt).await,
            Settlement::DeadLetter(why) => {
                let dead = self.record.message.dead_lettered(
                    self.record.topic.as_str(),
                    self.record.attempt,
                    &why,
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
        spawn_settlement(&rt, self.settle_later(settlement));
    }
}
