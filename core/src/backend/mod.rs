//! Writing a backend: the service-provider interface.
//!
//! Everything here is for backend authors; a service never needs it. A backend
//! implements one trait, [`Backend`], plus a [`DeliverySource`] per subscription
//! and an [`Acker`] per delivery, and wraps itself in a [`Bus`](crate::Bus) with
//! [`Bus::new`](crate::Bus::new). The core does the rest.
//!
//! # What the core already does
//!
//! [`Bus`](crate::Bus) runs the contract's checks once, before the backend is
//! called, so no backend can skip them and every capability added there
//! (tracing, metrics, bounds) reaches every backend:
//!
//! | what | clause | where |
//! |---|---|---|
//! | topic valid and outside the `polybus.` namespace | C1 | [`checks`] |
//! | id, content type and header names within [`MAX_SHORT_STRING`]; payload within the declared [`max_payload`](crate::Capabilities::max_payload) | C12 | [`checks`] |
//! | `polybus-` headers set by callers dropped | C13 | [`checks`] |
//! | subscription checked and resolved ([`ValidSubscription`]): patterns, group, prefetch, dead-letter topic, private group name, start the backend can honour | C1, C2, C3, C6, C12 | [`valid`] |
//! | a closed bus refuses work; `close` waits for publishes in flight, then calls [`Backend::close`] | C10 | [`gate`] |
//! | `nack` after the last attempt becomes a dead letter, with its reason | C7, C8 | [`settle`] |
//! | a dropped delivery is nacked | C7 | [`Delivery`](crate::Delivery) |
//! | broker URLs parsed and percent-decoded; secrets redacted in every message | C12 | [`url`] |
//! | OpenTelemetry spans, trace context in headers, metrics (feature `otel`) | | `telemetry` |
//!
//! # What a backend does
//!
//! 1. [`Backend::publish`]: send a message that passed the checks, and resolve
//!    only once the broker has taken responsibility (C4). On failure, hand the
//!    message back with [`Failure::hand_back`], saying whether it may have been
//!    delivered.
//! 2. [`Backend::subscribe`]: declare what the [`ValidSubscription`] needs and
//!    return only when the subscription is live (C3), as a [`DeliverySource`]
//!    that never holds more than `prefetch` unsettled deliveries (C6).
//! 3. An [`Acker`] per delivery, carrying out each [`Settlement`] (C7). A
//!    message received past its attempts ([`is_exhausted_on_receipt`]) is
//!    dead-lettered on receipt with [`exhausted_dead_letter`] (C8).
//! 4. Names: everything the library reserves is in [`crate::names`]; a backend
//!    keeps only its wire-specific names.
//! 5. URLs: parse with [`url::BrokerUrl`], and show any URL, option or client
//!    message through [`url::redact`] / [`url::scrub`], so no secret is echoed.
//! 6. Telemetry, optional: [`Backend::endpoint`] names the system and server,
//!    [`DeliveryExt::with_wire`] a delivery's partition, offset or tag,
//!    [`DeliverySource::depth_probe`] what waits for the group, and
//!    [`record_reconnect`] counts reconnections. Each costs nothing without
//!    the core's `otel` feature; the spans themselves are the core's.
//!
//! # Proving it
//!
//! Run the conformance suite ([`crate::testkit`], feature `testkit`) against
//! the backend: a `Target` that connects, and one line,
//! `polybus_core::conformance_suite!(mybackend, MyTarget)`, make one test per
//! case. A case that needs a [`Capability`](crate::Capability) the backend does
//! not claim is reported skipped, by name.
//!
//! ```
//! use polybus_core::backend::{Backend, DeliverySource, ValidSubscription};
//! use polybus_core::{Capabilities, Message, PublishFuture, Receipt, Result, async_trait};
//!
//! /// A backend that takes every message and delivers none (a sink).
//! #[derive(Debug)]
//! struct Sink;
//!
//! #[async_trait]
//! impl Backend for Sink {
//!     fn name(&self) -> &'static str {
//!         "sink"
//!     }
//!
//!     fn capabilities(&self) -> Capabilities {
//!         Capabilities::new().with_max_payload(1024)
//!     }
//!
//!     fn publish<'a>(&'a self, _topic: &'a str, _message: Message) -> PublishFuture<'a> {
//!         PublishFuture::ready(Ok(Receipt::default()))
//!     }
//!
//!     async fn subscribe(&self, _sub: ValidSubscription) -> Result<Box<dyn DeliverySource>> {
//!         Err(polybus_core::Error::new(polybus_core::Kind::Unsupported, "a sink delivers nothing"))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let bus = polybus_core::Bus::new(Sink);
//! // The core's checks ran before the sink saw anything:
//! let e = bus.publish("user.created", Message::new(vec![0; 2048])).await.unwrap_err();
//! assert!(e.error().is_payload_too_large());
//! let e = bus.publish("polybus.x", Message::new("x")).await.unwrap_err();
//! assert!(e.error().is_invalid_input());
//! assert!(bus.publish("user.created", Message::new("x")).await.is_ok());
//! # }
//! ```

use std::fmt;

use async_trait::async_trait;

use crate::capabilities::Capabilities;
use crate::error::{PublishError, Result};
use crate::message::Message;
use crate::publisher::{PublishFuture, Receipt};

pub mod checks;
pub mod future;
pub mod gate;
pub mod parts;
pub mod settle;
pub mod source;
pub mod url;
pub mod valid;

pub use checks::{Failure, MAX_SHORT_STRING};
pub use future::BackendFuture;
pub use gate::wait_until;
pub use parts::{DeliveryExt, MessageExt, TopicCache, TopicExt, Wire};
pub use settle::{
    Acker, DeadLetter, SettleFuture, Settlement, TaggedAcker, exhausted_dead_letter,
    is_exhausted_on_receipt, spawn_settlement,
};
pub use source::{DeliverySource, Depth, DepthProbe};
pub use valid::ValidSubscription;

/// Lock `mutex`, recovering it if a thread panicked while holding it: the one
/// policy for every backend's state. A panic mid-update is a bug already
/// reported by that thread; refusing every later operation of the bus would turn
/// it into an outage, and each backend's state stays valid between statements.
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A broker behind a [`Bus`](crate::Bus). Object-safe.
///
/// [`Bus`](crate::Bus) calls it only with checked values, never after `close`,
/// and counts every publish until it resolves; see the [module docs](self).
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// A short lowercase name for messages: `memory`, `amqp`, `kafka`.
    fn name(&self) -> &'static str;

    /// What this backend offers beyond the contract, and its payload limit.
    /// Read once, when the [`Bus`](crate::Bus) is made.
    fn capabilities(&self) -> Capabilities;

    /// Send `message`, which passed the checks, to `topic`. Resolve to `Ok` only
    /// once the broker has taken responsibility for it (C4). The work may start
    /// before the future is first polled; see [`BackendFuture`].
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a>;

    /// Send several checked messages, pipelined, with exactly one result each,
    /// in order ([`Bus`](crate::Bus) panics, naming the backend, on fewer).
    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Vec<Result<Receipt, PublishError>> {
        futures::future::join_all(messages.into_iter().map(|m| self.publish(topic, m))).await
    }

    /// Open a live subscription (C3).
    async fn subscribe(&self, subscription: ValidSubscription) -> Result<Box<dyn DeliverySource>>;

    /// How many messages wait for durable group `group`, which reads `topic`:
    /// stored and not yet handed to a member (held by a member, unsettled, they
    /// are not counted). Asked of the broker, not remembered: the count behind
    /// [`DeadLetters::count`](crate::DeadLetters::count). A group or topic the
    /// broker does not know has none waiting. The default says the backend
    /// cannot count.
    async fn backlog(&self, group: &str, topic: &str) -> Result<u64> {
        let _ = (group, topic);
        Err(crate::Error::new(
            crate::Kind::Unsupported,
            format!("the {} backend cannot count a group's backlog", self.name()),
        ))
    }

    /// Flush: called once every publish admitted before `close` has resolved.
    async fn close(&self) -> Result<()> {
        Ok(())
    }

    /// Where the broker is, for telemetry (feature `otel`). Read once, when
    /// the [`Bus`](crate::Bus) is made. The default names the system after
    /// [`name`](Self::name) and no server.
    fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.name())
    }
}

/// Count a reconnection to the broker at `endpoint`: the `polybus.reconnects`
/// counter (feature `otel`). Without the feature it does nothing.
#[cfg_attr(not(feature = "otel"), allow(unused_variables))]
pub fn record_reconnect(endpoint: &Endpoint) {
    #[cfg(feature = "otel")]
    crate::telemetry::record_reconnect(endpoint);
}

/// Where a backend's broker is, as telemetry names it: OpenTelemetry's
/// `messaging.system`, `server.address` and `server.port`, and the exchange a
/// topic is routed through, if any (RabbitMQ: the destination of a topic is
/// then `{exchange}:{topic}`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Endpoint {
    /// `messaging.system`: `rabbitmq`, `kafka`, … as the conventions list them.
    pub system: &'static str,
    /// `server.address`: the broker's host, as the URL named it.
    pub address: Option<String>,
    /// `server.port`.
    pub port: Option<u16>,
    /// The exchange every topic is published through, if the broker has one.
    pub exchange: Option<String>,
}

impl Endpoint {
    /// A broker of `system`, with no server known.
    pub fn new(system: &'static str) -> Self {
        Endpoint {
            system,
            address: None,
            port: None,
            exchange: None,
        }
    }

    /// The broker's host and port.
    pub fn with_server(mut self, address: impl Into<String>, port: u16) -> Self {
        self.address = Some(address.into());
        self.port = Some(port);
        self
    }

    /// The exchange every topic is published through.
    pub fn with_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = Some(exchange.into());
        self
    }
}

// A boxed backend is a backend, so a backend that wraps another (a recorder,
// tracing) can wrap whichever one a URL names.
#[async_trait]
impl<B: Backend + ?Sized> Backend for Box<B> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }

    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
        (**self).publish(topic, message)
    }

    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Vec<Result<Receipt, PublishError>> {
        (**self).publish_batch(topic, messages).await
    }

    async fn subscribe(&self, subscription: ValidSubscription) -> Result<Box<dyn DeliverySource>> {
        (**self).subscribe(subscription).await
    }

    async fn close(&self) -> Result<()> {
        (**self).close().await
    }

    async fn backlog(&self, group: &str, topic: &str) -> Result<u64> {
        (**self).backlog(group, topic).await
    }

    fn endpoint(&self) -> Endpoint {
        (**self).endpoint()
    }
}

// Object safety, checked at compile time.
const _: fn(&dyn Backend) = |_| {};
