//! What the consumer-group tests (`tests/groups.rs`) and the join-time bench
//! (`benches/joins.rs`) share: the broker a scenario runs on, and a raw
//! rdkafka group member with polybus's group settings, the baseline each
//! finding is sorted by.
#![allow(dead_code)] // each includer uses its own part

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use polybus_core::Bus;
use polybus_kafka::KafkaOptions;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::mocking::MockCluster;
use rdkafka::topic_partition_list::TopicPartitionList;

pub const HINT: &str =
    "start tansu with `scripts/brokers/tansu.sh start`, or set POLYBUS_SKIP_KAFKA=1";

/// The mock cluster's session time-out. It waits for the members of a
/// rebalancing group to rejoin for the session time-out less a second
/// (`rd_kafka_mock_cgrp_classic_rebalance`), so polybus's 10 s would make each
/// join take 9 s there.
pub const MOCK_SESSION_MS: &str = "3000";
/// polybus's session time-out (`subscriber/config.rs`).
const SESSION_MS: &str = "10000";

/// Where a scenario runs.
pub enum Broker {
    Tansu(String),
    Mock(MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
}

impl Broker {
    /// The tansu of `scripts/brokers/tansu.sh` (or `POLYBUS_KAFKA_URL`);
    /// `None`, saying so, when `POLYBUS_SKIP_KAFKA` opts out.
    pub fn tansu() -> Option<Self> {
        if std::env::var_os("POLYBUS_SKIP_KAFKA").is_some() {
            eprintln!("SKIPPED: POLYBUS_SKIP_KAFKA is set");
            return None;
        }
        let url =
            std::env::var("POLYBUS_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into());
        let brokers = KafkaOptions::from_url(&url).unwrap().brokers().to_owned();
        Some(Broker::Tansu(brokers))
    }

    /// librdkafka's in-process mock cluster of three brokers.
    pub fn mock() -> Self {
        Broker::Mock(MockCluster::new(3).unwrap())
    }

    /// librdkafka's mock cluster whose three brokers answer every request
    /// `rtt` late: a slow broker.
    pub fn slow_mock(rtt: Duration) -> Self {
        let c = MockCluster::new(3).unwrap();
        for id in 1..=3 {
            c.broker_round_trip_time(id, rtt).unwrap();
        }
        Broker::Mock(c)
    }

    /// `kafka` (tansu) or `kafka-mock`, as results name them.
    pub fn label(&self) -> &'static str {
        match self {
            Broker::Tansu(_) => "kafka",
            Broker::Mock(_) => "kafka-mock",
        }
    }

    pub fn brokers(&self) -> String {
        match self {
            Broker::Tansu(b) => b.clone(),
            Broker::Mock(c) => c.bootstrap_servers(),
        }
    }

    /// A new topic name; on the mock cluster, the topic itself, of three
    /// partitions (polybus makes its topics on tansu with three).
    pub fn topic(&self, prefix: &str) -> String {
        let topic = format!("{prefix}.{}", polybus_core::testkit::unique_name());
        if let Broker::Mock(c) = self {
            c.create_topic(&topic, 3, 3).unwrap();
        }
        topic
    }

    pub fn options(&self) -> KafkaOptions {
        let options = KafkaOptions::new(self.brokers());
        match self {
            // The mock cluster has no CreateTopics handler: it makes topics on first use.
            Broker::Mock(_) => options
                .create_topics(false)
                .native("allow.auto.create.topics", "true")
                .native("session.timeout.ms", MOCK_SESSION_MS),
            Broker::Tansu(_) => options,
        }
    }

    /// Make sure `topic` exists before a raw client uses it: on tansu polybus
    /// makes it (three partitions) when it first publishes to it.
    pub async fn ensure_topic(&self, bus: &Bus, topic: &str) {
        if let Broker::Tansu(_) = self {
            bus.publish(topic, polybus_core::Message::new("the topic exists"))
                .await
                .unwrap_or_else(|e| panic!("cannot make topic `{topic}`: {}", e.error()));
        }
    }

    pub async fn bus(&self) -> Bus {
        polybus_kafka::connect_with(self.options())
            .await
            .unwrap_or_else(|e| panic!("cannot reach kafka: {e}; {HINT}"))
    }

    /// A raw consumer's configuration for `group`, with polybus's group
    /// settings on this broker.
    pub fn raw_config(&self, group: &str) -> ClientConfig {
        let session = match self {
            Broker::Mock(_) => MOCK_SESSION_MS,
            Broker::Tansu(_) => SESSION_MS,
        };
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.brokers())
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("heartbeat.interval.ms", "500")
            .set("session.timeout.ms", session)
            .set("log_level", "3");
        c
    }
}

/// Who owned which partition when: each raw member's assignments and
/// revocations, in the order its rebalance callbacks ran.
#[derive(Clone, Default)]
pub struct Ownership(Arc<Mutex<Vec<Change>>>);

/// When, which member, assigned (or else revoked or closed), which partitions.
type Change = (Instant, usize, bool, Vec<(String, i32)>);

impl Ownership {
    fn record(&self, member: usize, assigned: bool, list: &TopicPartitionList) {
        let parts = list
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        self.0
            .lock()
            .unwrap()
            .push((Instant::now(), member, assigned, parts));
    }

    /// A member that closed owns nothing from then on.
    fn closed(&self, member: usize) {
        self.0
            .lock()
            .unwrap()
            .push((Instant::now(), member, false, Vec::new()));
    }

    /// Every moment two members owned the same partition: the partition, the
    /// two members, and how long after `since` the second took it.
    pub fn overlaps(&self, since: Instant) -> Vec<String> {
        let events = self.0.lock().unwrap();
        let mut owner: HashMap<(String, i32), usize> = HashMap::new();
        let mut held: HashMap<usize, Vec<(String, i32)>> = HashMap::new();
        let mut found = Vec::new();
        for (at, member, assigned, parts) in events.iter() {
            if *assigned {
                for p in parts {
                    if let Some(other) = owner.get(p).filter(|o| *o != member) {
                        found.push(format!(
                            "{}[{}]: member {member} took it from member {other}, who still held it, at {:?}",
                            p.0,
                            p.1,
                            at.duration_since(since)
                        ));
                    }
                    owner.insert(p.clone(), *member);
                }
                held.entry(*member)
                    .or_default()
                    .extend(parts.iter().cloned());
            } else {
                // A revocation (eager: all of them) or a close.
                for p in held.remove(member).unwrap_or_default() {
                    if owner.get(&p) == Some(member) {
                        owner.remove(&p);
                    }
                }
            }
        }
        found
    }
}

/// Hears a raw consumer's assignments.
struct RawContext {
    assigned: mpsc::SyncSender<()>,
    log: Option<(Ownership, usize)>,
}

impl rdkafka::ClientContext for RawContext {}

impl ConsumerContext for RawContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let (Rebalance::Revoke(list), Some((log, n))) = (r, &self.log) {
            log.record(*n, false, list);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = r {
            if let Some((log, n)) = &self.log {
                log.record(*n, true, list);
            }
            let _ = self.assigned.try_send(());
        }
    }
}

/// A raw rdkafka group member, polled on a thread of its own (so it takes
/// part in every later rebalance) until it is closed.
pub struct RawMember {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl RawMember {
    /// Subscribe a raw consumer made with `config` to `topic` and wait for its
    /// first assignment: the member and how long that took, or `None` if no
    /// assignment came `within`.
    pub fn join(config: ClientConfig, topic: &str, within: Duration) -> Option<(Self, Duration)> {
        Self::join_logged(config, topic, within, None)
    }

    /// The same, recording the member's assignments in `log` as member `n`.
    pub fn join_logged(
        config: ClientConfig,
        topic: &str,
        within: Duration,
        log: Option<(Ownership, usize)>,
    ) -> Option<(Self, Duration)> {
        let (tx, rx) = mpsc::sync_channel(1);
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let c: BaseConsumer<RawContext> = config
            .create_with_context(RawContext {
                assigned: tx,
                log: log.clone(),
            })
            .unwrap();
        c.subscribe(&[topic]).unwrap();
        let polling = stop.clone();
        let thread = std::thread::spawn(move || {
            while !polling.load(Ordering::SeqCst) {
                let _ = c.poll(Duration::from_millis(20));
            }
            drop(c); // closes: leaves the group
            if let Some((log, n)) = log {
                log.closed(n);
            }
        });
        let member = RawMember { stop, thread };
        match rx.recv_timeout(within) {
            Ok(()) => Some((member, started.elapsed())),
            Err(_) => {
                member.close();
                None
            }
        }
    }

    /// Leave the group (blocking until the consumer has closed).
    pub fn close(self) {
        Self::close_all(vec![self]);
    }

    /// Close `members` at the same moment: every one is told to leave before
    /// the first is waited for.
    pub fn close_all(members: Vec<Self>) {
        for m in &members {
            m.stop.store(true, Ordering::SeqCst);
        }
        for m in members {
            m.thread.join().unwrap();
        }
    }
}
