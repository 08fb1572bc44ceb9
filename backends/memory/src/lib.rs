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
//! one-minute retry finishes at once and deterministically. A scheduled
//! message (C14) waits among its group's retries too, but its time is a
//! wall-clock time (it travels between processes on the brokers), so paused
//! time does not bring it sooner.
//!
//! URLs: `memory://` opens a new private broker; `memory://NAME` opens or joins
//! the broker called NAME in this process (it lives while a connection to it is
//! open). The query sets the payload limit (`max_payload`, default 1 MiB, Kafka's
//! default, the strictest of the brokers) and the groups' bound; the table is on
//! [`MemoryOptions`].
//!
//! # Bounded groups
//!
//! A real broker pushes back on a producer that outruns its consumers; this one
//! does too ([`Capability::BoundedGroups`]). Each group holds at most
//! `max_depth` ready messages (10,000 by default, or as its subscription's
//! [`Subscription::max_depth`](polybus_core::Subscription::max_depth) says).
//! As with RabbitMQ's `x-max-length`, delivered but unsettled messages and
//! retries waiting for their delay are not counted, and messages the broker
//! already holds (retries, deliveries handed back by a member that left, dead
//! letters) are never refused. A publish to a full group:
//!
//! - [`Overflow::Block`] (the default) waits,
//!   as RabbitMQ's flow control holds a fast publisher back, until consumers
//!   have drained the group by a quarter of its bound (so waiting publishers
//!   resume in a batch, not one per consumed message), up to the publish
//!   timeout (30 s by default); past it the publish fails with a
//!   [`Timeout`](polybus_core::Kind::Timeout) error that hands the message back.
//! - [`Overflow::RejectPublish`] fails
//!   at once with a [`Refused`](polybus_core::Kind::Refused) error that hands the
//!   message back, as RabbitMQ nacks a publish to a queue declared with
//!   `x-overflow: reject-publish`.
//!
//! A message for several groups goes to all or none: if one is full, none gets
//! it (RabbitMQ would enqueue it to the others and still nack it). A group's
//! bound is fixed when it is declared; a subscription asking for another one is
//! refused, as RabbitMQ refuses a queue redeclared with other arguments.
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
mod queue;
mod subscriber;

use std::fmt;
use std::sync::Arc;

use polybus_core::backend::{Backend, DeliverySource, Endpoint, ValidSubscription};
use polybus_core::{
    Bus, Capabilities, Capability, Error, Kind, Message, Overflow, PublishError, PublishFuture,
    Receipt, Result, async_trait,
};
use tokio::sync::Notify;

use crate::broker::{Broker, Declare, Full};
use crate::group::Bound;
use crate::subscriber::{Member, MemorySource};

pub use options::{DEFAULT_MAX_DEPTH, DEFAULT_MAX_PAYLOAD, DEFAULT_PUBLISH_TIMEOUT, MemoryOptions};

/// A connection to an in-memory broker.
pub struct MemoryBus {
    broker: Arc<Broker>,
    name: Option<String>,
}

impl MemoryBus {
    /// Open a broker with `options`.
    pub fn open(options: MemoryOptions) -> Self {
        let broker = match &options.name {
            Some(name) => Broker::named(name, &options),
            None => Broker::new(&options),
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
            .field("default_bound", &self.broker.default_bound)
            .finish()
    }
}

impl MemoryBus {
    fn receipt(&self) -> Receipt {
        Receipt::at(None, Some(self.broker.next_seq()))
    }

    /// Wait for room in the full group, up to the publish timeout (flow control).
    async fn publish_when_room(
        &self,
        topic: &str,
        mut full: Full,
    ) -> Result<Receipt, PublishError> {
        let deadline = polybus_core::retry::deadline_after(self.broker.publish_timeout);
        loop {
            // Enabled before the check, so a drain in between is not missed.
            let group = full.group.clone();
            let room = group.room();
            tokio::pin!(room);
            room.as_mut().enable();
            if full.group.is_full()
                && tokio::time::timeout_at(deadline, room).await.is_err()
                && full.group.is_full()
            {
                let error = Error::new(
                    Kind::Timeout,
                    format!(
                        "group `{}` stayed full (max_depth {}) for the publish timeout of {:?}; \
                         the message was not published (consumers are slower than \
                         publishers: raise the bound with `max_depth`, or the timeout \
                         with `publish_timeout_ms`)",
                        full.group.name(),
                        full.bound().max,
                        self.broker.publish_timeout,
                    ),
                );
                return Err(PublishError::not_delivered(error, full.message));
            }
            match self.broker.enqueue(topic, full.message) {
                Ok(()) => return Ok(self.receipt()),
                Err(f) => full = f,
            }
            if full.bound().overflow == Overflow::RejectPublish {
                return Err(refused(full));
            }
        }
    }
}

/// A publish refused by a full reject-publish group, the message handed back.
fn refused(full: Full) -> PublishError {
    let error = Error::new(
        Kind::Refused,
        format!(
            "group `{}` is full (max_depth {}, overflow reject-publish); the message was not \
             published",
            full.group.name(),
            full.bound().max,
        ),
    );
    PublishError::not_delivered(error, full.message)
}

#[async_trait]
impl Backend for MemoryBus {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn endpoint(&self) -> Endpoint {
        // Not a system the conventions list: named after the library, as they
        // ask for systems they do not know.
        Endpoint::new("polybus_memory")
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
            .with(Capability::VirtualTime)
            .with(Capability::MessageBalancing)
            .with(Capability::BoundedGroups)
            .with_max_payload(self.broker.max_payload)
    }

    // Enqueueing is the memory broker's confirm, so unless a group is full the
    // answer is ready at once: no future to box.
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
        match self.broker.enqueue(topic, message) {
            Ok(()) => PublishFuture::ready(Ok(self.receipt())),
            Err(full) if full.bound().overflow == Overflow::RejectPublish => {
                PublishFuture::ready(Err(refused(full)))
            }
            Err(full) => PublishFuture::boxed(self.publish_when_room(topic, full)),
        }
    }

    /// The group's ready messages and those waiting for a retry delay.
    async fn backlog(&self, group: &str, _topic: &str) -> Result<u64> {
        Ok(self.broker.group(group).map_or(0, |g| {
            let (ready, delayed, _) = g.depth();
            (ready + delayed) as u64
        }))
    }

    async fn subscribe(&self, sub: ValidSubscription) -> Result<Box<dyn DeliverySource>> {
        let bound = match sub.max_depth {
            Some(max) => Declare::Bounded(Bound {
                max,
                overflow: sub.overflow,
            }),
            None => Declare::Default,
        };
        let group = self
            .broker
            .declare_group(&sub.group, sub.durable, &sub.patterns, bound)?;
        // The dead-letter store: a durable group named after the dead-letter topic,
        // so dead letters are kept from now on until someone reads them.
        self.broker.declare_group(
            sub.dead_letter_topic.as_str(),
            true,
            &[],
            Declare::Unbounded,
        )?;
        let slot = group.join(sub.prefetch, sub.retry.clone());
        let member = Arc::new(Member {
            broker: self.broker.clone(),
            group,
            slot,
            retry: sub.retry,
            dead_letter_topic: sub.dead_letter_topic,
            settled: Notify::new(),
        });
        Ok(Box::new(MemorySource::new(member)))
    }
}
