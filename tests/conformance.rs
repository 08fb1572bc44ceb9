//! The delivery contract, proven on every enabled backend: one `#[tokio::test]`
//! per case, named `<backend>::<case>`.
//!
//! `cargo test --test conformance -- --list` lists them; `scripts/test` sums up
//! the run, with every skipped case and its reason.

use polybus::{Bus, Result};
use polybus_core::testkit::{Target, unique_name};

/// A fresh named in-memory broker per case; `connect` joins it again.
#[cfg(feature = "memory")]
struct Memory(String);

#[cfg(feature = "memory")]
#[polybus_core::async_trait]
impl Target for Memory {
    async fn connect(&self) -> Result<Bus> {
        polybus::connect(&format!("memory://{}", self.0)).await
    }
}

#[cfg(feature = "memory")]
polybus_core::conformance_suite!(memory, Memory(unique_name()));

/// RabbitMQ at `POLYBUS_AMQP_URL` (default: the vhost `polybus-test` of the local
/// broker that `scripts/brokers/rabbitmq.sh start` runs and resets). `POLYBUS_SKIP_AMQP=1` opts out,
/// and every case then reports itself skipped.
#[cfg(feature = "amqp")]
struct Amqp;

#[cfg(feature = "amqp")]
#[polybus_core::async_trait]
impl Target for Amqp {
    async fn connect(&self) -> Result<Bus> {
        let url = std::env::var("POLYBUS_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/polybus-test".into());
        polybus::connect(&url).await
    }

    async fn connect_unreachable(&self) -> Option<Result<Bus>> {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        Some(polybus::connect("amqp://guest:guest@127.0.0.1:1/%2f?connect_timeout_ms=5000").await)
    }

    fn opted_out(&self) -> Option<String> {
        std::env::var_os("POLYBUS_SKIP_AMQP").map(|_| "POLYBUS_SKIP_AMQP is set".into())
    }

    fn setup_hint(&self) -> &str {
        "Start RabbitMQ with `scripts/brokers/rabbitmq.sh start` (or set POLYBUS_AMQP_URL; \
         POLYBUS_SKIP_AMQP=1 skips these cases)"
    }
}

#[cfg(feature = "amqp")]
polybus_core::conformance_suite!(amqp, Amqp);

/// Kafka at `POLYBUS_KAFKA_URL` (default: the tansu broker that
/// `scripts/brokers/tansu.sh start` runs on 127.0.0.1:9092, on fresh data).
/// `POLYBUS_SKIP_KAFKA=1` opts out, and every case then reports itself skipped.
#[cfg(feature = "kafka")]
struct Kafka;

#[cfg(feature = "kafka")]
#[polybus_core::async_trait]
impl Target for Kafka {
    async fn connect(&self) -> Result<Bus> {
        let url =
            std::env::var("POLYBUS_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into());
        polybus::connect(&url).await
    }

    async fn connect_unreachable(&self) -> Option<Result<Bus>> {
        // Port 1 on loopback: nothing listens; librdkafka would retry forever.
        Some(polybus::connect("kafka://127.0.0.1:1?connect_timeout_ms=3000").await)
    }

    fn opted_out(&self) -> Option<String> {
        std::env::var_os("POLYBUS_SKIP_KAFKA").map(|_| "POLYBUS_SKIP_KAFKA is set".into())
    }

    fn setup_hint(&self) -> &str {
        "Start tansu with `scripts/brokers/tansu.sh start` (or set POLYBUS_KAFKA_URL; \
         POLYBUS_SKIP_KAFKA=1 skips these cases)"
    }
}

#[cfg(feature = "kafka")]
polybus_core::conformance_suite!(kafka, Kafka);
