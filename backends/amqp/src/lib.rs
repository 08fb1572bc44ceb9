//! The RabbitMQ backend of polybus, on [lapin](https://docs.rs/lapin).
//!
//! How the contract maps onto AMQP 0-9-1:
//!
//! | clause | mechanism |
//! |---|---|
//! | C1 topics | one durable topic exchange per bus (`polybus` by default); patterns are binding keys, which match exactly as C1 says |
//! | C2 groups | a named group is a durable quorum queue bound with its patterns; members are consumers of it; a private subscription gets its own classic queue, deleted on close and expiring a minute after a crash |
//! | C3 readiness | `subscribe` returns after `queue.declare`, `queue.bind` and `basic.consume` are answered |
//! | C4 publish | publisher confirms on a dedicated channel, persistent messages (delivery mode 2); many publishes in flight, each resolved by its own confirm |
//! | C5 order | one queue per group, FIFO |
//! | C6 prefetch | `basic.qos(prefetch)` per consumer |
//! | C7 settlement | ack, coalesced: a run of contiguous acks is one `basic.ack` with `multiple` (see [`AmqpOptions::ack_batch`] for the bound and what `Ok` means); nack republishes to a per-delay retry queue whose TTL dead-letters back into the group's queue (the wait is on the broker); dead letters are republished to the group's dead-letter queue with reason headers |
//! | C8 poison | `polybus-attempt` header plus the quorum queue's `x-delivery-count`; past `max_attempts` the message is dead-lettered on receipt |
//! | C9 crashes | unacked messages of a closed channel or connection go back to the queue |
//! | C10 shutdown | `basic.cancel`, wait for settlements up to the grace, close the channel (the broker requeues the rest); publisher close waits for in-flight confirms |
//! | C11 reconnect | one connection per bus, reopened with backoff across the configured brokers; subscriptions redeclare and resume |
//! | C12 bad input | typed errors for refused connections, bad credentials (`ACCESS_REFUSED`), unknown vhosts (`NOT_ALLOWED`), time-outs; payload limit checked before sending; credentials masked everywhere |
//! | C13 metadata | see `mapping`: id, key, headers, content type and millisecond timestamp round-trip |
//! | C14 scheduled | published at once with `polybus-deliver-at`; a group that receives it early republishes it to its retry queue for the rest of the wait, as the same attempt (durable, so it survives a broker restart). The retry queues come in steps, so it arrives up to 26% of the remaining wait late (about 110 ms on 1.5 s here) |
//!
//! ```no_run
//! # async fn demo() -> polybus_core::Result<()> {
//! let bus = polybus_amqp::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod acks;
mod connection;
mod depth;
mod in_order;
mod mapping;
mod options;
mod subscriber;

use std::fmt;
use std::sync::Arc;

use polybus_core::backend::url::BrokerUrl;
use polybus_core::backend::{Backend, DeliverySource, Endpoint, ValidSubscription};
use polybus_core::{
    Bus, Capabilities, Capability, Message, PublishError, PublishFuture, Receipt, Result,
    async_trait,
};

use crate::connection::Connector;
pub use crate::options::{
    AmqpOptions, DEFAULT_ACK_BATCH, DEFAULT_ACK_FLUSH, DEFAULT_MAX_PAYLOAD,
    DEFAULT_PUBLISH_CHANNELS,
};
use crate::subscriber::{AmqpSource, Shared};

/// A connection to RabbitMQ.
pub struct AmqpBus {
    connector: Arc<Connector>,
}

/// Connect to the broker(s) an `amqp://` or `amqps://` URL names; see
/// [`AmqpOptions::from_url`] for the parameters.
pub async fn connect(url: &str) -> Result<Bus> {
    connect_with(AmqpOptions::from_url(url)?).await
}

/// Connect with `options`. Fails fast, with a typed error, if no broker answers.
pub async fn connect_with(options: AmqpOptions) -> Result<Bus> {
    Ok(Bus::new(AmqpBus::open(options).await?))
}

impl AmqpBus {
    /// Connect with `options`.
    pub async fn open(options: AmqpOptions) -> Result<Self> {
        Ok(AmqpBus {
            connector: Connector::connect(options).await?,
        })
    }
}

impl fmt::Debug for AmqpBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpBus")
            .field("options", &self.connector.options)
            .finish()
    }
}

/// The broker as telemetry names it: the first broker of the URL (the one a
/// connection tries first) and the exchange every topic goes through.
pub(crate) fn endpoint(options: &AmqpOptions) -> Endpoint {
    let endpoint = Endpoint::new("rabbitmq").with_exchange(options.exchange.clone());
    let first = options.uris.first().and_then(|uri| {
        let url = BrokerUrl::parse(uri, "amqp", &["amqp", "amqps"]).ok()?;
        let tls = uri.starts_with("amqps:");
        let (host, port) = url.hosts.into_iter().next()?;
        Some((host, port.unwrap_or(if tls { 5671 } else { 5672 })))
    });
    match first {
        Some((host, port)) => endpoint.with_server(host, port),
        None => endpoint,
    }
}

#[async_trait]
impl Backend for AmqpBus {
    fn name(&self) -> &'static str {
        "amqp"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
            .with(Capability::SurvivesRestart)
            .with(Capability::MessageBalancing)
            .with_max_payload(self.connector.options.max_payload)
    }

    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
        PublishFuture::boxed(async move {
            let exchange = &self.connector.options.exchange;
            match self
                .connector
                .publish(exchange, topic, &message, &[], false)
                .await
            {
                Ok(()) => Ok(Receipt::default()),
                Err(failure) => Err(failure.hand_back(message)),
            }
        })
    }

    async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Vec<Result<Receipt, PublishError>> {
        let exchange = &self.connector.options.exchange;
        let batch: Vec<&Message> = messages.iter().collect();
        let outcomes = self.connector.publish_many(exchange, topic, &batch).await;
        drop(batch);
        messages
            .into_iter()
            .zip(outcomes)
            .map(|(message, outcome)| match outcome {
                Ok(()) => Ok(Receipt::default()),
                Err(failure) => Err(failure.hand_back(message)),
            })
            .collect()
    }

    fn endpoint(&self) -> Endpoint {
        endpoint(&self.connector.options)
    }

    /// The ready messages of the group's queue (a passive `queue.declare`).
    async fn backlog(&self, group: &str, _topic: &str) -> Result<u64> {
        depth::backlog(&self.connector, group).await
    }

    async fn subscribe(&self, sub: ValidSubscription) -> Result<Box<dyn DeliverySource>> {
        let shared = Shared::new(self.connector.clone(), sub);
        let (channel, consumer) = subscriber::open(&shared).await?;
        Ok(Box::new(AmqpSource::new(shared, channel, consumer)))
    }
}
