//! C9: a consumer *process* is killed (`SIGKILL`) holding a delivery it never
//! settled; another member of its group then receives the message.
//!
//! The test runs its own binary again as the doomed consumer (the ignored test
//! `doomed_consumer`, which does nothing unless `POLYBUS_CRASH_BROKERS` is set).
//! It runs twice: against tansu (`scripts/brokers/tansu.sh start`;
//! `POLYBUS_SKIP_KAFKA=1` opts out), and against librdkafka's mock cluster,
//! which, like Apache Kafka and unlike tansu 0.6, returns the metadata of
//! committed offsets, so there the kill also counts as an attempt.

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use polybus_core::{Message, Subscription};
use polybus_kafka::KafkaOptions;
use rdkafka::mocking::MockCluster;
use tokio::io::{AsyncBufReadExt, BufReader};

const HINT: &str = "start tansu with `scripts/brokers/tansu.sh start`, or set POLYBUS_SKIP_KAFKA=1";

/// The mock cluster has no CreateTopics handler: there, topics are made by the
/// cluster on first use instead.
fn consumer_options(brokers: &str, mock: bool) -> KafkaOptions {
    let options = KafkaOptions::new(brokers);
    if mock {
        options
            .create_topics(false)
            .native("allow.auto.create.topics", "true")
    } else {
        options
    }
}

/// Run the doomed consumer, hand it one message, kill it, and return what the
/// surviving member then receives: (id sent, id received, attempt).
async fn kill_a_consumer_holding_a_message(brokers: &str, mock: bool) -> (String, String, u32) {
    let options = consumer_options(brokers, mock);
    let topic = format!("crash.{}", polybus_core::testkit::unique_name());
    let group = format!("crash-{}", polybus_core::testkit::unique_name());
    let bus = polybus_kafka::connect_with(options.clone())
        .await
        .unwrap_or_else(|e| panic!("cannot reach kafka: {e}; {HINT}"));
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "doomed_consumer", "--ignored", "--nocapture"])
        .env("POLYBUS_CRASH_BROKERS", options.brokers())
        .env("POLYBUS_CRASH_TOPIC", &topic)
        .env("POLYBUS_CRASH_GROUP", &group)
        .env("POLYBUS_CRASH_MOCK", if mock { "1" } else { "" })
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the doomed consumer starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut wait_for = async |prefix: &str| -> String {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("the doomed consumer never said {prefix}"))
                .unwrap()
                .unwrap_or_else(|| panic!("the doomed consumer ended before {prefix}"));
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.trim().to_owned();
            }
        }
    };
    wait_for("READY").await;
    let sent = Message::new("held by the doomed").with_key("k");
    let id = sent.id().to_owned();
    bus.publish(&topic, sent).await.unwrap();
    let got = wait_for("GOT").await;
    assert_eq!(got, id);
    // Give its periodic commit (every 100 ms) time to record the hand-out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "killed, not finished: {status}");
    let killed = Instant::now();
    // The survivor joins; the group gives it the partitions once the dead
    // member's session times out.
    let mut survivor = bus
        .subscribe(Subscription::new(topic.clone()).group(group.clone()))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(60), survivor.next())
        .await
        .expect("the survivor received nothing within 60 s")
        .unwrap()
        .unwrap();
    println!(
        "crash test: redelivered {:?} after the kill, attempt {}",
        killed.elapsed(),
        d.attempt()
    );
    let out = (id, d.message().id().to_owned(), d.attempt());
    d.ack().await.unwrap();
    survivor.close(Duration::from_secs(1)).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c9_a_killed_consumer_process_leaves_its_message_to_another_member() {
    if std::env::var_os("POLYBUS_SKIP_KAFKA").is_some() {
        eprintln!("SKIPPED: POLYBUS_SKIP_KAFKA is set");
        return;
    }
    let url =
        std::env::var("POLYBUS_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into());
    let brokers = KafkaOptions::from_url(&url).unwrap().brokers().to_owned();
    let (sent, got, _) = kill_a_consumer_holding_a_message(&brokers, false).await;
    assert_eq!(got, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c8_a_killed_consumer_counts_as_an_attempt_where_commit_metadata_is_kept() {
    let cluster = MockCluster::new(1).unwrap();
    let (sent, got, attempt) =
        kill_a_consumer_holding_a_message(&cluster.bootstrap_servers(), true).await;
    assert_eq!(got, sent);
    assert_eq!(attempt, 2, "the kill counts as an attempt");
}

/// The doomed consumer: subscribes, says READY, receives one delivery, says GOT
/// and its id, and waits, never settling it, until it is killed.
#[tokio::test]
#[ignore = "the child process of the crash tests; does nothing when run alone"]
async fn doomed_consumer() {
    let Ok(brokers) = std::env::var("POLYBUS_CRASH_BROKERS") else {
        return;
    };
    let topic = std::env::var("POLYBUS_CRASH_TOPIC").unwrap();
    let group = std::env::var("POLYBUS_CRASH_GROUP").unwrap();
    let mock = std::env::var("POLYBUS_CRASH_MOCK").is_ok_and(|v| v == "1");
    let bus = polybus_kafka::connect_with(consumer_options(&brokers, mock))
        .await
        .unwrap();
    let mut sub = bus
        .subscribe(Subscription::new(topic).group(group))
        .await
        .unwrap();
    println!("READY");
    let d = sub.next().await.unwrap().unwrap();
    println!("GOT {}", d.message().id());
    tokio::time::sleep(Duration::from_secs(3600)).await;
    drop(d);
}
