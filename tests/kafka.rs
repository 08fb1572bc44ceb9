//! Kafka beyond the shared suite: topic creation and its absence, receipts,
//! compression, patterns that pick up new topics, rebalances, the escape hatch,
//! and interop with another Kafka client. Faults injected with librdkafka's mock
//! cluster are tested in `backends/kafka/tests/mock.rs`.
//!
//! Needs the broker of `scripts/brokers/tansu.sh start` (and Python's
//! `confluent-kafka`, which that script installs, for interop).
//! `POLYBUS_SKIP_KAFKA=1` opts out.
#![cfg(feature = "kafka")]

use std::time::Duration;

use futures::StreamExt;
use polybus::kafka::{Compression, KafkaOptions};
use polybus::{Kind, Message, Subscription};

mod common;

use common::{KAFKA_HINT, kafka_bus, kafka_url, unique};

const PATIENCE: Duration = Duration::from_secs(20);

async fn recv(stream: &mut polybus::DeliveryStream) -> polybus::Delivery {
    tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("no delivery in time")
        .expect("stream open")
        .expect("delivery")
}

fn brokers(url: &str) -> &str {
    url.trim_start_matches("kafka://")
        .split('?')
        .next()
        .unwrap_or_default()
}

/// C12: with topic creation off, a missing topic is a typed refusal naming it,
/// for publish and subscribe alike, and the message comes back.
#[tokio::test]
async fn c12_missing_topic_without_auto_creation_is_refused() {
    let Some(url) = kafka_url() else { return };
    let bus =
        polybus::kafka::connect_with(KafkaOptions::from_url(&url).unwrap().create_topics(false))
            .await
            .unwrap_or_else(|e| panic!("{e}; {KAFKA_HINT}"));
    let topic = unique("missing.");
    let err = bus.publish(&topic, Message::new("kept")).await.unwrap_err();
    assert_eq!(err.kind(), Kind::Refused, "{}", err.error());
    assert!(err.error().to_string().contains(&topic), "{}", err.error());
    assert!(!err.may_have_been_delivered());
    assert_eq!(err.into_message().payload().as_ref(), b"kept");
    let err = bus
        .subscribe(Subscription::new(topic.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Kind::Refused, "{err}");
}

/// C4: a receipt says where the record went, and the key decides the partition.
#[tokio::test]
async fn c4_receipt_names_partition_and_offset() {
    let Some(url) = kafka_url() else { return };
    let bus = kafka_bus(&url).await;
    let topic = unique("receipt.");
    let mut partitions = Vec::new();
    let mut last = None;
    for i in 0..3 {
        let r = bus
            .publish(&topic, Message::new(format!("m{i}")).with_key("same"))
            .await
            .unwrap();
        partitions.push(r.partition.expect("a partition"));
        let offset = r.offset.expect("an offset");
        if let Some(prev) = last {
            assert!(offset > prev, "offsets grow within a partition");
        }
        last = Some(offset);
    }
    assert!(
        partitions.windows(2).all(|w| w[0] == w[1]),
        "{partitions:?}"
    );
}

/// C4/C13: lz4 and zstd batches round-trip.
#[tokio::test]
async fn c13_compressed_records_round_trip() {
    let Some(url) = kafka_url() else { return };
    for compression in [Compression::Lz4, Compression::Zstd] {
        let bus = polybus::kafka::connect_with(
            KafkaOptions::from_url(&url)
                .unwrap()
                .compression(compression),
        )
        .await
        .unwrap();
        let topic = unique("compressed.");
        let mut sub = bus
            .subscribe(Subscription::new(topic.clone()))
            .await
            .unwrap();
        let payload = "polybus ".repeat(4096);
        bus.publish(&topic, Message::new(payload.clone()).with_header("h", "v"))
            .await
            .unwrap();
        let d = recv(&mut sub).await;
        assert_eq!(d.message().payload().as_ref(), payload.as_bytes());
        assert_eq!(d.message().header("h"), Some("v"));
        d.ack().await.unwrap();
    }
}

/// C1: a topic created after the subscription, matching its pattern, is picked
/// up, and read from its start.
#[tokio::test]
async fn c1_a_topic_created_after_subscribing_is_picked_up() {
    let Some(url) = kafka_url() else { return };
    let bus = kafka_bus(&url).await;
    let base = unique("later.");
    let mut sub = bus
        .subscribe(Subscription::new(format!("{base}.*")).group(unique("late-")))
        .await
        .unwrap();
    // The first publish creates the topic.
    bus.publish(&format!("{base}.created"), Message::new("first"))
        .await
        .unwrap();
    bus.publish(&format!("{base}.other.words"), Message::new("not matched"))
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(d.message().payload().as_ref(), b"first");
    assert_eq!(d.topic().as_str(), format!("{base}.created"));
    d.ack().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(3), sub.next())
            .await
            .is_err(),
        "a topic with one word too many was delivered"
    );
}

/// C9: when a rebalance takes partitions away, deliveries from them fail to
/// settle with a typed error and come again, counted as an attempt. (With
/// librdkafka's default eager rebalancing, a join revokes every partition and
/// hands some back.)
#[tokio::test]
async fn c9_settling_a_delivery_of_a_revoked_partition_is_a_typed_error() {
    let Some(url) = kafka_url() else { return };
    let bus = kafka_bus(&format!("{url}?partitions=4")).await;
    let topic = unique("revoke.");
    let group = unique("revoke-");
    let sub = || Subscription::new(topic.clone()).group(group.clone());
    let mut a = bus.subscribe(sub()).await.unwrap();
    // One message on each of the four partitions, all held by `a`.
    let mut partitions = std::collections::HashSet::new();
    let mut sent = 0;
    for k in 0.. {
        let r = bus
            .publish(
                &topic,
                Message::new(format!("m{k}")).with_key(format!("k{k}")),
            )
            .await
            .unwrap();
        sent += 1;
        partitions.insert(r.partition.unwrap());
        if partitions.len() == 4 {
            break;
        }
    }
    let mut held = Vec::new();
    for _ in 0..sent {
        held.push(recv(&mut a).await);
    }
    // A second member joins, and some partitions move to it: wait until `b`
    // receives something.
    let other = kafka_bus(&url).await;
    let mut b = other.subscribe(sub()).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut early = Vec::new();
    'moved: for round in 0.. {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no partition moved to b"
        );
        for k in 0..sent {
            bus.publish(
                &topic,
                Message::new(format!("probe{round}")).with_key(format!("k{k}")),
            )
            .await
            .unwrap();
        }
        loop {
            let next = tokio::time::timeout(Duration::from_millis(500), async {
                tokio::select! {
                    d = a.next() => ("a", d),
                    d = b.next() => ("b", d),
                }
            })
            .await;
            match next {
                Ok((member, Some(Ok(d)))) => {
                    // Handed-back deliveries may come again already.
                    if !d.message().payload().starts_with(b"probe") {
                        early.push((d.message().id().to_owned(), d.attempt(), d.redelivered()));
                    }
                    d.ack().await.unwrap();
                    if member == "b" {
                        break 'moved;
                    }
                }
                Ok((_, other)) => panic!("stream: {other:?}"),
                Err(_) => break,
            }
        }
    }
    let mut revoked = std::collections::HashSet::new();
    for d in held {
        let id = d.message().id().to_owned();
        if let Err(e) = d.ack().await {
            assert_eq!(e.kind(), Kind::Closed, "{e}");
            revoked.insert(id);
        }
    }
    assert!(!revoked.is_empty(), "the join revoked no partition");
    let mut again = std::collections::HashSet::new();
    for (id, attempt, redelivered) in early {
        assert!(revoked.contains(&id), "an acked message came again");
        assert_eq!(attempt, 2, "a delivery handed back counts as an attempt");
        assert!(redelivered);
        again.insert(id);
    }
    while again.len() < revoked.len() {
        let d = tokio::time::timeout(PATIENCE, async {
            tokio::select! {
                d = a.next() => d,
                d = b.next() => d,
            }
        })
        .await
        .expect("revoked deliveries came again")
        .expect("stream open")
        .unwrap();
        if d.message().payload().starts_with(b"probe") {
            d.ack().await.unwrap();
            continue;
        }
        assert!(
            revoked.contains(d.message().id()),
            "an acked message came again: {:?}",
            d.message().payload()
        );
        assert_eq!(
            d.attempt(),
            2,
            "a delivery handed back counts as an attempt"
        );
        assert!(d.redelivered());
        again.insert(d.message().id().to_owned());
        d.ack().await.unwrap();
    }
}

/// C6 across a rebalance: a member that had paused fetching for want of room
/// fetches again once its partitions are reassigned. librdkafka keeps a
/// partition's pause across a revocation and a new assignment; a member that
/// forgot it stalled for good (seen after broker restarts under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c6_a_member_paused_for_room_fetches_again_after_a_rebalance() {
    let Some(url) = kafka_url() else { return };
    let bus = kafka_bus(&format!("{url}?partitions=2")).await;
    let topic = unique("paused.");
    let group = unique("paused-");
    let sub = || {
        Subscription::new(topic.clone())
            .group(group.clone())
            .prefetch(1)
    };
    let mut a = bus.subscribe(sub()).await.unwrap();
    // Records on both partitions. `a` is not read yet, so the one record it
    // buffers fills its prefetch and it pauses both partitions.
    let mut partitions = std::collections::HashSet::new();
    let mut sent = std::collections::HashSet::new();
    for k in 0.. {
        let payload = format!("m{k}");
        let r = bus
            .publish(
                &topic,
                Message::new(payload.clone()).with_key(format!("k{k}")),
            )
            .await
            .unwrap();
        sent.insert(payload);
        partitions.insert(r.partition.unwrap());
        if partitions.len() == 2 && sent.len() >= 6 {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A second member joins: the rebalance takes both partitions from `a`,
    // with the record it buffered, and gives one back.
    let other = kafka_bus(&url).await;
    let mut b = other.subscribe(sub()).await.unwrap();
    let mut got = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !sent.is_subset(&got) && tokio::time::Instant::now() < deadline {
        let next = tokio::time::timeout(Duration::from_millis(500), async {
            tokio::select! {
                d = a.next() => d,
                d = b.next() => d,
            }
        })
        .await;
        if let Ok(Some(d)) = next {
            let d = d.unwrap();
            got.insert(String::from_utf8_lossy(d.message().payload()).into_owned());
            d.ack().await.unwrap();
        }
    }
    let missing: Vec<_> = sent.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "never delivered after the rebalance: {missing:?}"
    );
}

/// The escape hatch is applied, and a setting librdkafka does not know is a
/// typed error at connect.
#[tokio::test]
async fn native_settings_reach_librdkafka() {
    let Some(url) = kafka_url() else { return };
    let err = polybus::kafka::connect_with(
        KafkaOptions::from_url(&url)
            .unwrap()
            .native("no.such.setting", "1"),
    )
    .await
    .unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    assert!(err.to_string().contains("no.such.setting"), "{err}");
    let bus = polybus::connect(&format!("{url}?linger.ms=1&client.id=polybus-test"))
        .await
        .unwrap();
    bus.publish(&unique("native."), Message::new("x"))
        .await
        .unwrap();
}

/// C13: records are ordinary Kafka records. Another client (Python's
/// confluent-kafka) reads what polybus wrote, key, headers and all, and polybus
/// reads what that client wrote.
#[tokio::test]
async fn c13_records_interoperate_with_another_kafka_client() {
    let Some(url) = kafka_url() else { return };
    let bus = kafka_bus(&url).await;
    let topic = unique("interop.");
    let plain = unique("interop.plain.");
    let mut sub = bus
        .subscribe(Subscription::new(plain.clone()).group(unique("interop-")))
        .await
        .unwrap();
    bus.publish(
        &topic,
        Message::new("from polybus")
            .with_key("user-7")
            .with_header("trace", "abc")
            .with_content_type("text/plain"),
    )
    .await
    .unwrap();
    let script = r#"
import sys
from confluent_kafka import Consumer, Producer
brokers, topic, plain = sys.argv[1:4]
c = Consumer({"bootstrap.servers": brokers, "group.id": "interop-" + topic,
              "auto.offset.reset": "earliest"})
c.subscribe([topic])
m = None
for _ in range(60):
    m = c.poll(1.0)
    if m is not None and m.error() is None:
        break
assert m is not None and m.error() is None, m and m.error()
headers = dict(m.headers() or [])
print("value=" + m.value().decode())
print("key=" + m.key().decode())
print("trace=" + headers["trace"].decode())
print("content-type=" + headers["polybus-content-type"].decode())
c.close()
p = Producer({"bootstrap.servers": brokers})
p.produce(plain, value=b"from python", key=b"py", headers=[("n", b"7")])
assert p.flush(30) == 0
"#;
    let out = tokio::process::Command::new("python3")
        .args(["-c", script, brokers(&url), &topic, &plain])
        .output()
        .await
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed: {}{stdout}; install it with `python3 -m pip install confluent-kafka` \
         (scripts/brokers/tansu.sh start does)",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "value=from polybus",
        "key=user-7",
        "trace=abc",
        "content-type=text/plain",
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line} not in {stdout}");
    }
    let d = recv(&mut sub).await;
    assert_eq!(d.message().payload().as_ref(), b"from python");
    assert_eq!(d.message().key(), Some("py"));
    assert_eq!(d.message().header("n"), Some("7"));
    assert!(
        d.message().id().starts_with(&format!("{plain}/")),
        "a plain record's id is topic/partition/offset: {}",
        d.message().id()
    );
    d.ack().await.unwrap();
}
