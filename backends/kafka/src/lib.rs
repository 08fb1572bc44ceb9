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
//! | C6 prefetch | the stream hands out no more than the prefetch unsettled; records read ahead of it (at most 10,000 or 16 MiB, then fetching pauses) are the member's own partitions', nobody else's to take |
//! | C7 settlement | ack marks the offset settled; nack copies the message to the group's retry topic `polybus.retry.<group>` with `polybus-attempt` + 1 and a due time, and the partition moves on (private groups retry in memory); dead letters are produced to the group's dead-letter topic |
//! | C8 poison | past `max_attempts` a message is dead-lettered; a crash counts as an attempt through the commit metadata (below) |
//! | C9 crashes | only the lowest unsettled offset of each partition is committed, so an out-of-order ack skips nothing; the commit's metadata records the head record's attempt |
//! | C10 shutdown | close stops handing out, waits for settlements up to the grace, commits what is settled and leaves the group; publisher close flushes |
//! | C11 reconnect | librdkafka reconnects (back-off capped at 1 s) and rejoins by itself; publishes wait for their delivery report up to `publish_timeout_ms` |
//! | C12 bad input | connect probes the cluster's metadata within `connect_timeout_ms`; the payload limit is checked before sending; a missing topic with `create_topics=false` is a `Refused` error |
//! | C13 metadata | see `mapping`: ordinary records with native key, headers and timestamp |
//! | C14 scheduled | produced at once with `polybus-deliver-at`; a group that reads it early copies it to its retry topic due at that time, as the same attempt, and moves on (private groups hold it in memory); within a few ms of the time here |
//!
//! # Consumer groups
//!
//! A member joins with librdkafka's eager rebalance protocol (range, then
//! roundrobin): every join or leave revokes every member's partitions, each
//! member commits what it has settled in its revocation, and the group is
//! assigned anew. The cooperative-sticky protocol was tried and left: it
//! balances partition counts across all of a group's topics together, and gave
//! one member every partition of the group's topic and another only the retry
//! topic. `subscribe` returns once this member is assigned; past
//! `subscribe_timeout_ms` it fails with a `Timeout` that says what the member
//! waits for (librdkafka's join state, from its statistics) and what the group
//! coordinator reports of the group (DescribeGroups), when it answers.
//!
//! How long a join takes is the broker's: Apache Kafka finishes a rebalance
//! once every member has rejoined (and holds the first join to an empty group
//! for `group.initial.rebalance.delay.ms`, 3 s by default), tansu 0.6 pauses
//! every member but the leader for 3 s, librdkafka's mock cluster waits the
//! session time-out less a second.
//! polybus's periodic commits run on a thread of their own, one at a time, and
//! a failed one is sent again, so a slow broker never stands between an ack and
//! the fetching it allows.
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

use polybus_core::backend::{Backend, DeliverySource, Endpoint, ValidSubscription};
use polybus_core::{Bus, Capabilities, Capability, Message, PublishFuture, Result, async_trait};

use crate::connection::Connector;
pub use crate::options::{Compression, DEFAULT_MAX_PAYLOAD, KafkaOptions, SaslMechanism};

/// A connection to a Kafka cluster.
pub struct KafkaBus {
    connector: Arc<Connector>,
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
        })
    }
}

impl fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBus")
            .field("options", &self.connector.options)
            .finish()
    }
}

#[async_trait]
impl Backend for KafkaBus {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
            .with(Capability::Replay)
            .with(Capability::SurvivesRestart)
            .with_max_payload(self.connector.options.max_payload)
    }

    fn publish<'a>(&'a self, topic: &'a str, message: Message) -> PublishFuture<'a> {
        PublishFuture::boxed(async move {
            match self.connector.produce(topic, &message, &[]).await {
                Ok(receipt) => Ok(receipt),
                Err(failure) => Err(failure.hand_back(message)),
            }
        })
    }

    fn endpoint(&self) -> Endpoint {
        // The first bootstrap broker: the one the client asks first.
        let first = self
            .connector
            .options
            .brokers
            .split(',')
            .next()
            .and_then(|b| {
                let (host, port) = b.trim().rsplit_once(':')?;
                Some((host.to_owned(), port.parse().ok()?))
            });
        match first {
            Some((host, port)) => Endpoint::new("kafka").with_server(host, port),
            None => Endpoint::new("kafka"),
        }
    }

    /// Each partition's high watermark less the group's committed offset.
    async fn backlog(&self, group: &str, topic: &str) -> Result<u64> {
        subscriber::backlog(&self.connector, group, topic).await
    }

    async fn subscribe(&self, sub: ValidSubscription) -> Result<Box<dyn DeliverySource>> {
        Ok(Box::new(
            subscriber::open(self.connector.clone(), sub).await?,
        ))
    }

    async fn close(&self) -> Result<()> {
        // Every publish has resolved; retry and dead-letter copies produced by
        // subscriptions may still be queued.
        self.connector
            .flush(self.connector.options.publish_timeout)
            .await
    }
}
