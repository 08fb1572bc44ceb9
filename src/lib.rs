//! # polybus
//!
//! One asynchronous publish/subscribe API over RabbitMQ, Kafka and an in-memory
//! broker, with one written delivery contract that every backend keeps and one
//! conformance suite that proves it.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), polybus::Error> {
//! use futures::StreamExt;
//! use polybus::{Message, Subscription};
//!
//! let bus = polybus::connect("memory://").await?;
//! let mut sub = bus.subscribe(Subscription::new("user.*").group("billing").prefetch(32)).await?;
//! bus.publish("user.created", Message::new("u1").with_key("u1")).await?;
//!
//! let delivery = sub.next().await.expect("subscription is live")?;
//! assert_eq!(delivery.message().key(), Some("u1"));
//! delivery.ack().await?;
//! # Ok(()) }
//! ```
//!
//! ## Features
//!
//! | feature | default | backend | URL |
//! |---|---|---|---|
//! | `memory` | yes | in-process broker simulation (crate `polybus-memory`, re-exported as `polybus::memory`) | `memory://[NAME][?max_payload=BYTES]` |
//! | `amqp` | no | RabbitMQ through lapin (crate `polybus-amqp`, as `polybus::amqp`) | `amqp[s]://user:pass@host:5672[,host2:5672]/vhost` |
//! | `kafka` | no | Kafka through rdkafka, bundled librdkafka (crate `polybus-kafka`, as `polybus::kafka`) | `kafka://host:9092[,host2:9092][?partitions=3&compression=lz4&…]` |
//! | `msgpack` | no | the MessagePack codec (`polybus::MsgPack`) | |
//! | `testing` | no | `polybus::testing`: a recording test bus for services' tests (needs `memory`) | |
//! | `otel` | no | OpenTelemetry spans, W3C trace context in message headers, and metrics ([`telemetry`]); the OpenTelemetry API only, no SDK | |
//! | `otel-testkit` | no | the conformance suite's telemetry cases, recorded with the OpenTelemetry SDK's in-memory exporters (tests only) | |
//! | `full` | no | every backend (memory, amqp, kafka), msgpack and testing | |
//!
//! No broker client is compiled by default.
//!
//! ## The delivery contract
//!
//! Every backend keeps clauses C1–C13 (topics and patterns, groups, readiness,
//! publish confirms, per-key order, prefetch, settlement, poison messages,
//! crashes, shutdown, reconnect, bad input, metadata); see the README. The suite
//! that proves them is `polybus_core::testkit` (feature `testkit` of
//! `polybus-core`), and a backend of your own implements
//! [`polybus_core::backend::Backend`], whose module docs are the guide.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub use polybus_core::{
    Bus, Capabilities, Capability, Codec, DeadLetterRecord, DeadLetterReport, DeadLetters,
    Delivery, DeliveryStream, Error, Headers, Json, JsonCodec, Kind, Message, Overflow, Pattern,
    PublishError, PublishFuture, Publisher, Receipt, Result, RetryPolicy, StartFrom, Subscriber,
    Subscription, Topic, header,
};
pub use polybus_core::{consumer, dead_letters, middleware, names, rpc};

use polybus_core::backend::url::redact;

#[cfg(feature = "msgpack")]
pub use polybus_core::MsgPack;

#[cfg(feature = "otel")]
pub use polybus_core::telemetry;

#[cfg(feature = "memory")]
pub use polybus_memory as memory;

#[cfg(feature = "testing")]
pub mod testing;

#[cfg(feature = "amqp")]
pub use polybus_amqp as amqp;

#[cfg(feature = "kafka")]
pub use polybus_kafka as kafka;

/// Connect to the broker `url` names; the scheme picks the backend.
///
/// | scheme | needs feature |
/// |---|---|
/// | `memory://` | `memory` |
/// | `amqp://`, `amqps://` | `amqp` |
/// | `kafka://` | `kafka` |
///
/// An unknown scheme is an [`InvalidInput`](Kind::InvalidInput) error; a known
/// one whose feature is off is [`Unsupported`](Kind::Unsupported) and says which
/// feature to enable. Every backend reads its URL with
/// [`polybus_core::backend::url`]: user names, passwords, paths and query values
/// are percent-decoded, several brokers are a comma list (`h1:5672,h2:5672`), and
/// no error or `Debug` output shows a password or a secret setting's value.
pub async fn connect(url: &str) -> Result<Bus> {
    let Some((scheme, _)) = url.split_once("://") else {
        return Err(Error::invalid_input(format!(
            "invalid url `{}`: expected scheme://…, such as memory:// or amqp://host",
            redact(url)
        )));
    };
    match scheme {
        #[cfg(feature = "memory")]
        "memory" => polybus_memory::connect(url),
        #[cfg(not(feature = "memory"))]
        "memory" => Err(needs_feature(scheme, "memory")),
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => polybus_amqp::connect(url).await,
        #[cfg(not(feature = "amqp"))]
        "amqp" | "amqps" => Err(needs_feature(scheme, "amqp")),
        #[cfg(feature = "kafka")]
        "kafka" => polybus_kafka::connect(url).await,
        #[cfg(not(feature = "kafka"))]
        "kafka" => Err(needs_feature(scheme, "kafka")),
        // A "scheme" that is not one (`user:pw@host://…`) is not shown.
        other
            if other
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
        {
            Err(Error::invalid_input(format!(
                "unknown scheme `{other}` in url `{}`: known schemes are memory, amqp, amqps and kafka",
                redact(url)
            )))
        }
        _ => Err(Error::invalid_input(format!(
            "invalid url `{}`: expected scheme://…, such as memory:// or amqp://host",
            redact(url)
        ))),
    }
}

#[cfg(not(all(feature = "memory", feature = "amqp", feature = "kafka")))]
fn needs_feature(scheme: &str, feature: &str) -> Error {
    Error::new(
        Kind::Unsupported,
        format!("scheme {scheme} needs the `{feature}` feature of polybus"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn schemes_map_to_features() {
        assert!(connect("memory://").await.is_ok());
        #[cfg(not(feature = "amqp"))]
        {
            let e = connect("amqp://guest:secret@localhost").await.unwrap_err();
            assert_eq!(
                e.to_string(),
                "scheme amqp needs the `amqp` feature of polybus"
            );
        }
        #[cfg(not(feature = "kafka"))]
        {
            let e = connect("kafka://localhost:9092").await.unwrap_err();
            assert_eq!(
                e.to_string(),
                "scheme kafka needs the `kafka` feature of polybus"
            );
        }
        let e = connect("redis://u:secret@host").await.unwrap_err();
        assert!(e.is_invalid_input());
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(e.to_string().contains("`redis`"), "{e}");
        assert!(connect("nonsense").await.unwrap_err().is_invalid_input());
        let e = connect("guest:secret@rabbit:5672").await.unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = connect("u:secret@h://x").await.unwrap_err();
        assert!(
            e.is_invalid_input() && !e.to_string().contains("secret"),
            "{e}"
        );
    }
}
