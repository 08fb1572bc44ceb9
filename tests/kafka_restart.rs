//! C11: the Kafka-protocol broker is killed (`kill -9`) and started again on the
//! same data while two tasks publish and a group consumes. In its own test
//! binary, so the outage cannot break other tests (cargo runs test binaries one
//! at a time).
//!
//! Needs the broker of `scripts/brokers/tansu.sh start` (it runs its `restart`).
//! `POLYBUS_SKIP_KAFKA=1` opts out.
#![cfg(feature = "kafka")]

use std::time::Duration;

use polybus::Subscription;

mod common;

use common::{KAFKA_HINT, Scheduled, Traffic, kafka_bus, kafka_url, unique};

/// C11: every message whose publish returned `Ok` arrives, across a `kill -9`
/// of the broker and a restart three seconds later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c11_broker_killed_and_restarted_mid_stream_loses_no_acknowledged_message() {
    let Some(url) = kafka_url() else { return };
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_test_writer()
        .try_init();
    let publisher = kafka_bus(&format!("{url}?publish_timeout_ms=45000")).await;
    let consumer_bus = kafka_bus(&url).await;
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
    let traffic = Traffic::start(&publisher, &topic, &[16, 16], sub);

    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("restart: kill -9 of the broker, 3 s down, then start again");
    let out = tokio::process::Command::new("bash")
        .args(["scripts/brokers/tansu.sh", "restart", "3"])
        .output()
        .await
        .expect("bash");
    assert!(
        out.status.success(),
        "cannot restart the broker: {}{}; {KAFKA_HINT}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("restart: the broker is back");
    tokio::time::sleep(Duration::from_secs(3)).await;
    traffic
        .finish("kafka restart test", Duration::from_secs(90))
        .await;
    scheduled.finish(Duration::from_secs(60)).await;
}
