//! The in-memory backend of polybus: a broker simulation in process.
//!
//! It keeps the whole delivery contract, so code tested against it behaves the
//! same on RabbitMQ and Kafka: durable and private groups with competing members,
//! prefetch, delayed redelivery with attempts, a dead-letter topic per group,
//! per-key order, close semantics and a payload limit. It fails the way a broker
//! fails: an unsettled delivery comes back, an oversize payload is refused, a
//! closed subscription cannot settle.
//!
//! Delays run on tokio's clock, so under `tokio::time::pause()` a test of a
//! one-minute retry finishes at once and deterministically.
//!
//! URLs: `memory://` opens a new private broker; `memory://NAME` opens or joins
//! the broker called NAME in this process (it lives while a connection to it is
//! open); `?max_payload=BYTES` sets the payload limit (default 1 MiB, Kafka's
//! default, the strictest of the brokers).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), polybus_core::Error> {
//! use futures::StreamExt;
//! use polybus_core::{Message, Subscription};
//!
//! let bus = polybus_memory::connect("memory://")?;
//! let mut sub = bus.subscribe(Subscription::new("user.*").group("audit")).await?;
//! bus.publish("user.created", Message::new("u1")).await?;
//! let delivery = sub.next().await.expect("live")?;
//! assert_eq!(delivery.message().payload().as_ref(), b"u1");
//! delivery.ack().await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod broker;
mod group;
mod options;
mod subscriber;

use std::fmt;
use std::sync::Arc;

use polybus_core::backend::{Backend, DeliverySource, ValidSubscription};
use polybus_core::{
    Bus, Capabilities, Capability, Message, PublishFuture, Receipt, Result, async_trait,
};
use tokio::sync::Notify;

use crate::broker::Broker;
use crate::subscriber::{Member, MemorySource};

pub use options::{DEFAULT_MAX_PAYLOAD, MemoryOptions};

/// A connection to an in-memory broker.
pub struct MemoryBus {
    broker: Arc<Broker>,
    name: Option<String>,
}

impl MemoryBus {
    /// Open a broker with `options`.
    pub fn open(options: MemoryOptions) -> Self {
        let broker = match &options.name {
            Some(name) => Broker::named(name, options.max_payload),
            None => Broker::new(options.max_payload),
        };
        MemoryBus {
            broker,
            name: options.name,
        }
    }

    /// How many messages `group` holds: ready, waiting for a retry delay, and
    /// delivered but unsettled. `None` if there is no such group.
    pub fn group_depth(&self, group: &str) -> Option<GroupDepth> {
        let (ready, delayed, unsettled) = self.broker.group(group)?.depth();
        Some(GroupDepth {
            ready,
            delayed,
            unsettled,
        })
    }
}

impl MemoryBus {
    /// The names of the groups the broker holds, sorted.
    pub fn groups(&self) -> Vec<String> {
        self.broker.group_names()
    }
}

/// The contents of a group, from [`MemoryBus::group_depth`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupDepth {
    /// Waiting to be delivered.
    pub ready: usize,
    /// Waiting for their retry delay.
    pub delayed: usize,
    /// Delivered and not yet settled.
    pub unsettled: usize,
}

/// Open the broker a `memory://` URL names, as a [`Bus`].
pub fn connect(url: &str) -> Result<Bus> {
    Ok(Bus::new(MemoryBus::open(MemoryOptions::from_url(url)?)))
}

impl fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBus")
            .field("name", &self.name)
            .field("max_payload", &self.broker.max_payload)
            .finish()
    }
}

#[async_trait]
impl Backend for MemoryBus {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
            .with(Capability::VirtualTime)
            .with(Capability::MessageBalancing)
            .with_max_payload(self.broker.max_payload)
    }

    // Enqueueing is the memory broker's confirm and never waits, so the answer
    // is ready at once: no future to box.
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
        let seq = self.broker.next_seq();
        self.broker.enqueue(topic, message);
        PublishFuture::ready(Ok(Receipt::at(None, Some(seq))))
    }

    async fn subscribe(&self, sub: ValidSubscription) -> Result<Box<dyn DeliverySource>> {
        let group = self
            .broker
            .declare_group(&sub.group, sub.durable, &sub.patterns);
        // The dead-letter store: a durable group named after the dead-letter topic,
        // so dead letters are kept from now on until someone reads them.
        self.broker
            .declare_group(sub.dead_letter_topic.as_str(), true, &[]);
        let id = group.join(sub.prefetch, sub.retry.clone());
        let member = Arc::new(Member {
            broker: self.broker.clone(),
            group,
            id,
            retry: sub.retry,
            dead_letter_topic: sub.dead_letter_topic,
            settled: Notify::new(),
        });
        Ok(Box::new(MemorySource::new(member)))
    }
}
