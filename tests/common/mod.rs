//! What the RabbitMQ test binaries share: where the broker is, how to opt out,
//! and what to say when it is not there.
#![allow(dead_code)] // each test binary uses its own part

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use polybus::{Bus, DeliveryStream, Kind, Message};

pub mod proxy;

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

/// Publishers and a consumer running through a broker outage (the restart
/// tests): every message whose publish returned `Ok` must arrive.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    seq: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    confirmed: Arc<Mutex<HashSet<u64>>>,
    received: Arc<Mutex<Vec<u64>>>,
    /// When each publish was confirmed and each delivery acked, for the
    /// recovery times.
    confirmed_at: Arc<Mutex<Vec<Instant>>>,
    received_at: Arc<Mutex<Vec<Instant>>>,
    faults: Vec<(String, Instant)>,
    publishers: Vec<tokio::task::JoinHandle<()>>,
    consumer: tokio::task::JoinHandle<()>,
}

impl Traffic {
    /// Start a publisher to `topic` for each of `batches`, each with that many
    /// publishes in flight (a batch of one goes through `publish`, larger ones
    /// through `publish_batch`), and a consumer acking everything `sub` delivers.
    pub fn start(publisher: &Bus, topic: &str, batches: &[u64], mut sub: DeliveryStream) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seq = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let confirmed = Arc::new(Mutex::new(HashSet::new()));
        let confirmed_at = Arc::new(Mutex::new(Vec::new()));
        let received_at = Arc::new(Mutex::new(Vec::new()));
        let publishers = batches
            .iter()
            .map(|&batch| {
                let (bus, topic, stop, seq, failed, confirmed, confirmed_at) = (
                    publisher.clone(),
                    topic.to_owned(),
                    stop.clone(),
                    seq.clone(),
                    failed.clone(),
                    confirmed.clone(),
                    confirmed_at.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Acquire) {
                        let first = seq.fetch_add(batch, Ordering::AcqRel);
                        let mut messages: Vec<Message> = (first..first + batch)
                            .map(|n| {
                                Message::new(n.to_string())
                                    .with_id(n.to_string())
                                    .with_key(format!("k{}", n % 7))
                            })
                            .collect();
                        let results = if batch == 1 {
                            let only = messages.pop().expect("a batch of one");
                            vec![bus.publish(&topic, only).await]
                        } else {
                            bus.publish_batch(&topic, messages).await
                        };
                        for (n, result) in (first..).zip(results) {
                            match result {
                                Ok(_) => {
                                    confirmed.lock().unwrap().insert(n);
                                    confirmed_at.lock().unwrap().push(Instant::now());
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
                })
            })
            .collect();
        let received = Arc::new(Mutex::new(Vec::new()));
        let consumer = {
            let (received, received_at) = (received.clone(), received_at.clone());
            tokio::spawn(async move {
                while let Some(item) = sub.next().await {
                    match item {
                        Ok(d) => {
                            let n: u64 = d.message().id().parse().unwrap();
                            // A settlement the outage interrupted fails; the
                            // message comes again.
                            if d.ack().await.is_ok() {
                                received.lock().unwrap().push(n);
                                received_at.lock().unwrap().push(Instant::now());
                            }
                        }
                        Err(e) => eprintln!("consumer: {e}"),
                    }
                }
            })
        };
        Traffic {
            stop,
            seq,
            failed,
            confirmed,
            received,
            confirmed_at,
            received_at,
            faults: Vec::new(),
            publishers,
            consumer,
        }
    }

    /// Note that a fault (`label`) is injected now: `finish` reports how long
    /// publishing and delivery stalled after it.
    pub fn fault(&mut self, label: &str) {
        eprintln!("fault: {label}");
        self.faults.push((label.to_owned(), Instant::now()));
    }

    /// The recovery after each fault: the longest gap between two confirmed
    /// publishes, and between two acked deliveries, from the fault until the
    /// next fault (or the end).
    fn recoveries(&self) -> Vec<String> {
        // `None` when nothing happened after the fault at all.
        let longest_gap = |times: &[Instant], from: Instant, to: Instant| {
            let mut last = None;
            let mut gap = Duration::ZERO;
            for &t in times.iter().filter(|&&t| t >= from && t <= to) {
                gap = gap.max(t - last.unwrap_or(from));
                last = Some(t);
            }
            last.map(|_| format!("{:.2} s", gap.as_secs_f64()))
                .unwrap_or_else(|| "never".into())
        };
        let (mut confirmed, mut received) = (
            self.confirmed_at.lock().unwrap().clone(),
            self.received_at.lock().unwrap().clone(),
        );
        confirmed.sort();
        received.sort();
        let end = Instant::now();
        self.faults
            .iter()
            .enumerate()
            .map(|(i, (label, at))| {
                let to = self.faults.get(i + 1).map_or(end, |f| f.1);
                format!(
                    "{label}: publishing recovered in {}, delivery in {}",
                    longest_gap(&confirmed, *at, to),
                    longest_gap(&received, *at, to)
                )
            })
            .collect()
    }

    /// Stop publishing, wait up to `patience` for every confirmed message,
    /// print the counts and fail if any confirmed message was lost.
    pub async fn finish(mut self, label: &str, patience: Duration) {
        self.stop.store(true, Ordering::Release);
        for p in std::mem::take(&mut self.publishers) {
            p.await.unwrap();
        }
        let confirmed: HashSet<u64> = self.confirmed.lock().unwrap().clone();
        let deadline = Instant::now() + patience;
        loop {
            let got: HashSet<u64> = self.received.lock().unwrap().iter().copied().collect();
            if confirmed.is_subset(&got) || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.consumer.abort();
        let received = self.received.lock().unwrap().clone();
        let unique: HashSet<u64> = received.iter().copied().collect();
        let lost = confirmed.difference(&unique).count();
        let duplicated = received.len() - unique.len();
        let published = self.seq.load(Ordering::Acquire);
        let unexpected = unique.iter().filter(|&&n| n >= published).count();
        let mut lines = vec![format!(
            "{label}: published {published} confirmed {} failed {} received {} lost {lost} duplicated {duplicated} unexpected {unexpected}",
            confirmed.len(),
            self.failed.load(Ordering::Acquire),
            unique.len(),
        )];
        lines.extend(self.recoveries().iter().map(|r| format!("{label}: {r}")));
        for line in &lines {
            println!("{line}");
            report(line);
        }
        assert_eq!(unexpected, 0, "messages nobody published");
        assert!(
            confirmed.len() > 100,
            "too little traffic to prove anything"
        );
        assert_eq!(lost, 0, "confirmed messages that never arrived");
    }
}

/// Add `line` to the report `scripts/test` prints after the tests (cargo
/// shows a passing test's output only with `--nocapture`).
pub fn report(line: &str) {
    use std::io::Write;
    let Some(path) = std::env::var_os("POLYBUS_REPORT") else {
        return;
    };
    // One short write with O_APPEND: lines from parallel tests do not interleave.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(format!("outage\t{line}\n").as_bytes());
    }
}

/// A scheduled message (C14) in flight across a broker restart: a group member
/// receives it early and sends it to the group's retry store before the
/// restart, and it must come back on time after it.
pub struct Scheduled {
    due: std::time::SystemTime,
    received: tokio::task::JoinHandle<std::time::SystemTime>,
}

impl Scheduled {
    /// Subscribe a new group to a new topic and publish one message due `delay`
    /// from now.
    pub async fn start(bus: &Bus, delay: Duration) -> Self {
        let (topic, group) = (&unique("scheduled."), &unique("scheduled-"));
        let mut s = bus
            .subscribe(polybus::Subscription::new(topic).group(group))
            .await
            .expect("subscribe the scheduled group");
        let m = Message::new("scheduled").deliver_after(delay);
        let due = m.scheduled_for().expect("scheduled");
        bus.publish(topic, m)
            .await
            .expect("publish a scheduled message");
        let received = tokio::spawn(async move {
            let d = s
                .next()
                .await
                .expect("a live stream")
                .expect("the scheduled delivery");
            let at = std::time::SystemTime::now();
            d.ack().await.expect("ack");
            at
        });
        Scheduled { due, received }
    }

    /// Wait up to `patience` for it; fail if it came early or never.
    pub async fn finish(self, patience: Duration) {
        let at = tokio::time::timeout(patience, self.received)
            .await
            .expect("the scheduled message came after the restart")
            .expect("the scheduled consumer");
        assert!(at >= self.due, "delivered before its time");
        let line = format!(
            "scheduled message: delivered {:?} after its time, across the restart",
            at.duration_since(self.due).unwrap_or_default()
        );
        eprintln!("{line}");
        report(&line);
    }
}
