//! C11: the Kafka-protocol broker is killed (`kill -9`) and started again on the
//! same data while two tasks publish and a group consumes. In its own test
//! binary, so the outage cannot break other tests (cargo runs test binaries one
//! at a time).
//!
//! Needs the broker of `scripts/brokers/tansu.sh start` (it runs its `restart`).
//! `POLYBUS_SKIP_KAFKA=1` opts out.
#![cfg(feature = "kafka")]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use polybus::{Kind, Message, Subscription};

mod common;

use common::{KAFKA_HINT, kafka_bus, kafka_url, unique};

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
    let mut sub = consumer_bus
        .subscribe(
            Subscription::new(topic.clone())
                .group(group.clone())
                .prefetch(100),
        )
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let confirmed = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let mut publishers = Vec::new();
    for _ in 0..2 {
        let (bus, topic, stop, seq, failed, confirmed) = (
            publisher.clone(),
            topic.clone(),
            stop.clone(),
            seq.clone(),
            failed.clone(),
            confirmed.clone(),
        );
        publishers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                // Sixteen in flight per task, as a service with a batch would.
                let batch: Vec<Message> = (0..16)
                    .map(|_| {
                        let n = seq.fetch_add(1, Ordering::AcqRel);
                        Message::new(n.to_string())
                            .with_id(n.to_string())
                            .with_key(format!("k{}", n % 7))
                    })
                    .collect();
                let ids: Vec<u64> = batch.iter().map(|m| m.id().parse().unwrap()).collect();
                for (n, result) in ids.into_iter().zip(bus.publish_batch(&topic, batch).await) {
                    match result {
                        Ok(_) => {
                            confirmed.lock().unwrap().insert(n);
                        }
                        Err(e) => {
                            assert!(
                                matches!(
                                    e.kind(),
                                    Kind::Connection | Kind::Timeout | Kind::Refused
                                ),
                                "untyped failure: {}",
                                e.error()
                            );
                            failed.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                }
            }
        }));
    }

    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let consumer = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(item) = sub.next().await {
                match item {
                    Ok(d) => {
                        let n: u64 = d.message().id().parse().unwrap();
                        // An ack of a partition a rebalance took away fails; the
                        // message comes again.
                        if d.ack().await.is_ok() {
                            received.lock().unwrap().push(n);
                        }
                    }
                    Err(e) => eprintln!("consumer: {e}"),
                }
            }
        })
    };

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
    stop.store(true, Ordering::Release);
    for p in publishers {
        p.await.unwrap();
    }

    let confirmed: HashSet<u64> = confirmed.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got: HashSet<u64> = received.lock().unwrap().iter().copied().collect();
        if confirmed.is_subset(&got) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    consumer.abort();
    let received = received.lock().unwrap().clone();
    let unique: HashSet<u64> = received.iter().copied().collect();
    let lost = confirmed.difference(&unique).count();
    let duplicated = received.len() - unique.len();
    println!(
        "kafka restart test: published {} confirmed {} failed {} received {} lost {lost} duplicated {duplicated}",
        seq.load(Ordering::Acquire),
        confirmed.len(),
        failed.load(Ordering::Acquire),
        unique.len(),
    );
    assert!(
        confirmed.len() > 100,
        "too little traffic to prove anything"
    );
    assert_eq!(lost, 0, "acknowledged messages that never arrived");
}
