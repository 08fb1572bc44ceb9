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
