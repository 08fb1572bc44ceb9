//! C11: RabbitMQ stops and starts mid-stream. In its own test binary, so the
//! outage cannot break other tests (cargo runs test binaries one at a time).
//!
//! Needs the broker of `scripts/brokers/rabbitmq.sh start`, and `rabbitmqctl`
//! rights over it (it runs `stop_app` / `start_app`). `POLYBUS_SKIP_AMQP=1` opts out.
#![cfg(feature = "amqp")]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use polybus::{Kind, Message, Subscription};

mod common;

use common::{HINT, bus, unique, url};

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

/// C11: RabbitMQ stops and starts while two tasks publish with confirms and a
/// group consumes. Every message whose publish returned `Ok` must arrive.
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
                let n = seq.fetch_add(1, Ordering::AcqRel);
                let m = Message::new(n.to_string()).with_id(n.to_string());
                match bus.publish(&topic, m).await {
                    Ok(_) => {
                        confirmed.lock().unwrap().insert(n);
                    }
                    Err(e) => {
                        assert!(
                            matches!(e.kind(), Kind::Connection | Kind::Timeout | Kind::Refused),
                            "untyped failure: {e}"
                        );
                        failed.fetch_add(1, Ordering::AcqRel);
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
                        // An ack on a channel the restart killed fails; the broker redelivers.
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
    eprintln!("restart: stopping RabbitMQ");
    rabbitmqctl(&["stop_app"]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    rabbitmqctl(&["start_app"]).await;
    rabbitmqctl(&["await_startup"]).await;
    eprintln!("restart: RabbitMQ is back");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Release);
    for p in publishers {
        p.await.unwrap();
    }

    let confirmed: HashSet<u64> = confirmed.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
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
    let failed = failed.load(Ordering::Acquire);
    println!(
        "restart test: published {} confirmed {} failed {} received {} lost {lost} duplicated {duplicated}",
        seq.load(Ordering::Acquire),
        confirmed.len(),
        failed,
        unique.len(),
    );
    assert!(
        confirmed.len() > 100,
        "too little traffic to prove anything"
    );
    assert_eq!(lost, 0, "confirmed messages that never arrived");
}
