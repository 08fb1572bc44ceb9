//! The constructors only backends need: deliveries, received messages, dead
//! letters and broker-named topics. Extension traits, so a service's view of
//! [`Message`], [`Topic`] and [`Delivery`] stays the user API.

use bytes::Bytes;

use crate::backend::settle::{Acker, AckerRef, DeadLetter, TaggedAcker};
use crate::delivery::Delivery;
use crate::message::Message;
use crate::topic::Topic;

/// Assembling a [`Delivery`].
pub trait DeliveryExt: Sized {
    /// A delivery of `message` from `topic`, for its `attempt`-th time (1-based;
    /// 0 is taken as 1), settled through `acker`.
    fn new(
        message: std::sync::Arc<Message>,
        topic: Topic,
        attempt: u32,
        redelivered: bool,
        acker: Box<dyn Acker>,
    ) -> Self;

    /// As [`new`](Self::new), settled as delivery `tag` of the shared `acker`:
    /// no allocation per delivery.
    fn tagged(
        message: std::sync::Arc<Message>,
        topic: Topic,
        attempt: u32,
        redelivered: bool,
        acker: std::sync::Arc<dyn TaggedAcker>,
        tag: u64,
    ) -> Self;

    /// The same delivery, settled through `wrap(acker)`: for a backend that wraps
    /// another (recording, tracing), to see each settlement on its way.
    fn wrap_acker(self, wrap: impl FnOnce(Box<dyn Acker>) -> Box<dyn Acker>) -> Self;

    /// The same delivery, with where it sits on the wire, for telemetry
    /// (feature `otel`: the `process` span's partition, offset or delivery
    /// tag). Without the feature this does nothing and costs nothing.
    fn with_wire(self, wire: Wire) -> Self;
}

/// Where a delivery sits on the wire: what a backend knows of it beyond the
/// message, for the `process` span (feature `otel`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Wire {
    /// Kafka: the record's partition.
    pub partition: Option<i32>,
    /// Kafka: the record's offset.
    pub offset: Option<i64>,
    /// RabbitMQ: the channel's delivery tag.
    pub delivery_tag: Option<u64>,
}

impl Wire {
    /// A Kafka record's place.
    pub fn record(partition: i32, offset: i64) -> Self {
        Wire {
            partition: Some(partition),
            offset: Some(offset),
            delivery_tag: None,
        }
    }

    /// An AMQP delivery's tag.
    pub fn delivery_tag(tag: u64) -> Self {
        Wire {
            delivery_tag: Some(tag),
            ..Wire::default()
        }
    }
}

impl DeliveryExt for Delivery {
    fn new(
        message: std::sync::Arc<Message>,
        topic: Topic,
        attempt: u32,
        redelivered: bool,
        acker: Box<dyn Acker>,
    ) -> Delivery {
        Delivery::assemble(message, topic, attempt, redelivered, AckerRef::Boxed(acker))
    }

    fn tagged(
        message: std::sync::Arc<Message>,
        topic: Topic,
        attempt: u32,
        redelivered: bool,
        acker: std::sync::Arc<dyn TaggedAcker>,
        tag: u64,
    ) -> Delivery {
        let acker = AckerRef::Tagged(acker, tag);
        Delivery::assemble(message, topic, attempt, redelivered, acker)
    }

    fn wrap_acker(self, wrap: impl FnOnce(Box<dyn Acker>) -> Box<dyn Acker>) -> Self {
        Delivery::wrap_acker(self, wrap)
    }

    #[inline]
    fn with_wire(self, wire: Wire) -> Self {
        Delivery::with_wire(self, wire)
    }
}

/// Messages as backends make them.
pub trait MessageExt: Sized {
    /// A message rebuilt from a broker's record. Its id is empty and its
    /// timestamp the Unix epoch until set from the record: unlike
    /// [`Message::new`], it makes no id and reads no clock.
    fn from_record(payload: impl Into<Bytes>) -> Self;

    /// The dead letter of this message (C7): a copy with why (`why`'s reason
    /// and last error), where from, after how many deliveries and from which
    /// group. A dead letter dead-lettered again keeps the topic it was first
    /// published to. Every backend calls this, so the headers are the same
    /// everywhere.
    fn dead_lettered(&self, topic: &str, attempts: u32, why: &DeadLetter, group: &str) -> Message;
}

impl MessageExt for Message {
    fn from_record(payload: impl Into<Bytes>) -> Message {
        Message::empty_record(payload.into())
    }

    fn dead_lettered(&self, topic: &str, attempts: u32, why: &DeadLetter, group: &str) -> Message {
        let why = (why.reason.as_str(), why.last_error.as_deref());
        self.dead_letter_copy(topic, attempts, why, group)
    }
}

/// Topics as brokers name them.
pub trait TopicExt: Sized {
    /// A topic named by the broker (a routing key from another client), taken
    /// as it is. Library-made names are validated with [`Topic::new`].
    fn from_broker(name: &str) -> Self;
}

impl TopicExt for Topic {
    fn from_broker(name: &str) -> Topic {
        Topic::unchecked(name)
    }
}

/// The [`Topic`] of each delivery a subscription receives, reusing the last
/// one's allocation while the name repeats (a subscription mostly sees one topic
/// at a time); for backends.
#[derive(Debug, Default)]
pub struct TopicCache(Option<Topic>);

impl TopicCache {
    /// The topic called `name`, as [`TopicExt::from_broker`] makes it.
    pub fn topic(&mut self, name: &str) -> Topic {
        match &self.0 {
            Some(last) if last.as_str() == name => last.clone(),
            _ => self.0.insert(Topic::unchecked(name)).clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_cache_reuses_the_last_topic_and_follows_a_new_name() {
        let mut cache = TopicCache::default();
        let a = cache.topic("user.created");
        let again = cache.topic("user.created");
        assert!(std::ptr::eq(a.as_str(), again.as_str()));
        let b = cache.topic("user.deleted");
        assert_eq!(b.as_str(), "user.deleted");
        assert_eq!(cache.topic("user.created"), a);
    }
}
