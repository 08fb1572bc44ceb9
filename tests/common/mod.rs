//! What the RabbitMQ test binaries share: where the broker is, how to opt out,
//! and what to say when it is not there.
#![allow(dead_code)] // each test binary uses its own part

pub const HOST: &str = "127.0.0.1:5672";
pub const VHOST: &str = "polybus-test";
pub const HINT: &str =
    "start RabbitMQ with `scripts/brokers/rabbitmq.sh start`, or set POLYBUS_SKIP_AMQP=1";

/// The test vhost's URL; `None` (and a line on stderr) when the run opted out.
pub fn url() -> Option<String> {
    if std::env::var_os("POLYBUS_SKIP_AMQP").is_some() {
        eprintln!("SKIPPED: POLYBUS_SKIP_AMQP is set");
        return None;
    }
    Some(format!("amqp://guest:guest@{HOST}/{VHOST}"))
}

/// Connect, or fail the test saying how to start the broker.
pub async fn bus(url: &str) -> polybus::Bus {
    polybus::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot reach RabbitMQ: {e}; {HINT}"))
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", polybus_core::testkit::unique_name())
}

/// How to start the Kafka-protocol broker the kafka tests use.
pub const KAFKA_HINT: &str =
    "start tansu with `scripts/brokers/tansu.sh start`, or set POLYBUS_SKIP_KAFKA=1";

/// The test broker's URL (`POLYBUS_KAFKA_URL`, default the local tansu); `None`
/// (and a line on stderr) when the run opted out.
pub fn kafka_url() -> Option<String> {
    if std::env::var_os("POLYBUS_SKIP_KAFKA").is_some() {
        eprintln!("SKIPPED: POLYBUS_SKIP_KAFKA is set");
        return None;
    }
    Some(std::env::var("POLYBUS_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into()))
}

/// Connect, or fail the test saying how to start the broker.
pub async fn kafka_bus(url: &str) -> polybus::Bus {
    polybus::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot reach kafka: {e}; {KAFKA_HINT}"))
}
