//! C11: RabbitMQ stops and starts mid-stream. In its own test binary, so the
//! outage cannot break other tests (cargo runs test binaries one at a time).
//!
//! Needs the broker of `scripts/brokers/rabbitmq.sh start`, and `rabbitmqctl`
//! rights over it (it runs `stop_app` / `start_app`). `POLYBUS_SKIP_AMQP=1` opts out.
#![cfg(feature = "amqp")]

use std::time::Duration;

use polybus::Subscription;

mod common;

use common::{HINT, Scheduled, Traffic, bus, unique, url};

async fn rabbitmqctl(args: &[&str]) {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("rabbitmqctl: {e}; {HINT}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// C11: RabbitMQ stops and starts while two tasks publish with confirms (one
/// message at a time, and batches of eight) and a group consumes. Every message
/// whose publish returned `Ok` must arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c11_broker_restart_mid_stream_loses_no_confirmed_message() {
    let Some(url) = url() else { return };
    // The backend logs its reconnects; show them beside the test's own lines.
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_test_writer()
        .try_init();
    let publisher = bus(&url).await;
    let consumer_bus = bus(&url).await;
    let topic = unique("restart.");
    let group = unique("restart-");
    let sub = consumer_bus
        .subscribe(
            Subscription::new(topic.clone())
                .group(group.clone())
                .prefetch(100),
        )
        .await
        .unwrap();

    // C14: due after the broker is back; the member defers it into the
    // group's retry store before the restart.
    let scheduled = Scheduled::start(&consumer_bus, Duration::from_secs(9)).await;
    let traffic = Traffic::start(&publisher, &topic, &[1, 8], sub);

    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("restart: stopping RabbitMQ");
    rabbitmqctl(&["stop_app"]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    rabbitmqctl(&["start_app"]).await;
    rabbitmqctl(&["await_startup"]).await;
    eprintln!("restart: RabbitMQ is back");
    tokio::time::sleep(Duration::from_secs(3)).await;
    traffic
        .finish("restart test", Duration::from_secs(60))
        .await;
    scheduled.finish(Duration::from_secs(60)).await;
}
