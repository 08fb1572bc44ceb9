//! The Kafka backend of polybus, on [rdkafka](https://docs.rs/rdkafka) (librdkafka).
//!
//! How the contract maps onto Kafka:
//!
//! | clause | mechanism |
//! |---|---|
//! | C1 topics | a polybus topic is the Kafka topic of the same name; a pattern becomes a regex subscription (literal patterns subscribe by name), so topics created later are picked up within a second; the reserved `polybus.` namespace is filtered on receipt |
//! | C2 groups | a named group is a Kafka consumer group; a subscription without one gets a unique private group; a durable group's committed offsets keep its place while no member runs |
//! | C3 readiness | `subscribe` returns once the group has assigned this member its partitions; a partition the group has no offset for starts at its end, committed at once, so "now" holds for the group; topics created after the subscription are read from their start |
//! | C4 publish | `acks=all`, idempotence on; each publish resolves on its own delivery report (partition and offset in the receipt); many in flight; close flushes |
//! | C5 order | the key picks the partition; a partition is read in order by one member |
//! | C6 prefetch | fetching pauses while buffered plus unsettled deliveries reach the prefetch |
//! | C7 settlement | ack marks the offset settled; nack copies the message to the group's retry topic `polybus.retry.<group>` with `polybus-attempt` + 1 and a due time, and the partition moves on (private groups retry in memory); dead letters are produced to the group's dead-letter topic |
//! | C8 poison | past `max_attempts` a message is dead-lettered; a crash counts as an attempt through the commit metadata (below) |
//! | C9 crashes | only the lowest unsettled offset of each partition is committed, so an out-of-order ack skips nothing; the commit's metadata records the head record's attempt |
//! | C10 shutdown | close stops handing out, waits for settlements up to the grace, commits what is settled and leaves the group; publisher close flushes |
//! | C11 reconnect | librdkafka reconnects and rejoins by itself; publishes wait for their delivery report up to `publish_timeout_ms` |
//! | C12 bad input | connect probes the cluster's metadata within `connect_timeout_ms`; the payload limit is checked before sending; a missing topic with `create_topics=false` is a `Refused` error |
//! | C13 metadata | see `mapping`: ordinary records with native key, headers and timestamp |
//!
//! ```no_run
//! # async fn demo() -> polybus_core::Result<()> {
//! let bus = polybus_kafka::connect("kafka://127.0.0.1:9092").await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod connection;
mod mapping;
mod options;
mod subscriber;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use polybus_core::{
    Backend, Bus, Capabilities, Capability, DeliveryStream, Error, InFlight, Message, PublishError,
    PublishFuture, Publisher, Result, Subscriber, Subscription, async_trait, prepare_publish,
};

use crate::connection::Connector;
pub use crate::options::{Compression, DEFAULT_MAX_PAYLOAD, KafkaOptions};

/// A connection to a Kafka cluster.
pub struct KafkaBus {
    connector: Arc<Connector>,
    closed: AtomicBool,
    in_flight: InFlight,
}

/// Connect to the brokers a `kafka://` URL names; see [`KafkaOptions::from_url`].
pub async fn connect(url: &str) -> Result<Bus> {
    connect_with(KafkaOptions::from_url(url)?).await
}

/// Connect with `options`. Fails within the connect time-out, with a typed
/// error, if the cluster does not answer.
pub async fn connect_with(options: KafkaOptions) -> Result<Bus> {
    Ok(Bus::new(KafkaBus::open(options).await?))
}

impl KafkaBus {
    /// Connect with `options`.
    pub async fn open(options: KafkaOptions) -> Result<Self> {
        Ok(KafkaBus {
            connector: Connector::connect(options).await?,
            closed: AtomicBool::new(false),
            in_flight: InFlight::default(),
        })
    }
}

impl fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBus")
            .field("options", &self.connector.options)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

#[async_trait]
impl Publisher for KafkaBus {
    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
        PublishFuture::boxed(async move {
            let _in_flight = self.in_flight.enter();
            if self.closed.load(Ordering::Acquire) {
                let e = Error::closed("cannot publish: the kafka bus is closed");
                return Err(PublishError::not_delivered(e, message));
            }
            let message = prepare_publish(topic, message, self.connector.options.max_payload)?;
            match self.connector.produce(topic, &message, &[]).await {
                Ok(receipt) => Ok(receipt),
                Err((e, true)) => Err(PublishError::maybe_delivered(e, message)),
                Err((e, false)) => Err(PublishError::not_delivered(e, message)),
            }
        })
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.in_flight.idle().await;
        // Retry and dead-letter copies produced by subscriptions, too.
        self.connector
            .flush(self.connector.options.publish_timeout)
            .await
    }
}

#[async_trait]
impl Subscriber for KafkaBus {
    async fn subscribe(&self, subscription: Subscription) -> Result<DeliveryStream> {
        let sub = subscription.validate_for("kafka", &self.capabilities())?;
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed("cannot subscribe: the kafka bus is closed"));
        }
        let source = subscriber::open(self.connector.clone(), sub).await?;
        Ok(DeliveryStream::new(source))
    }
}

impl Backend for KafkaBus {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
            .with(Capability::Replay)
            .with(Capability::SurvivesRestart)
            .with_max_payload(self.connector.options.max_payload)
    }
}
