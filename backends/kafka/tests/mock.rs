//! Faults injected with librdkafka's in-process mock cluster (`rdkafka::mocking`):
//! no broker to install, and brokers go down and come back on command. It has
//! no CreateTopics handler, so topics are made on the cluster directly.

use std::time::Duration;

use futures::StreamExt;
use polybus_core::{Kind, Message, Subscription};
use polybus_kafka::KafkaOptions;
use rdkafka::mocking::MockCluster;

async fn recv(stream: &mut polybus_core::DeliveryStream) -> polybus_core::Delivery {
    tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("no delivery in time")
        .expect("stream open")
        .expect("delivery")
}

fn mock_bus_options(
    cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
) -> KafkaOptions {
    KafkaOptions::new(cluster.bootstrap_servers())
        .create_topics(false)
        .connect_timeout(Duration::from_secs(5))
}

/// C11/C12: with its broker down, a publish fails within its time-out with a
/// typed error that says it may have been delivered, and hands the message
/// back; once the broker is up, publishing works again on the same bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c11_publish_during_an_outage_is_typed_and_recovers() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("outage", 1, 1).unwrap();
    let bus = polybus_kafka::connect_with(
        mock_bus_options(&cluster).publish_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    bus.publish("outage", Message::new("before")).await.unwrap();
    cluster.broker_down(1).unwrap();
    let started = std::time::Instant::now();
    let err = bus
        .publish("outage", Message::new("during"))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "failed only after {took:?}");
    assert!(
        matches!(err.kind(), Kind::Timeout | Kind::Connection),
        "{}",
        err.error()
    );
    assert!(err.may_have_been_delivered());
    assert_eq!(err.message().payload().as_ref(), b"during");
    cluster.broker_up(1).unwrap();
    let mut ok = false;
    for _ in 0..20 {
        if bus.publish("outage", Message::new("after")).await.is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "publishing did not recover after the broker came back");
}

/// C11/C12: a publish made while the broker has been down for a while still
/// fails within its time-out (plus a second), not after librdkafka's reconnect
/// back-off. Found in CI: librdkafka 2.12 drops the next time-out of messages
/// already in a broker's transmit queue (`rd_kafka_broker_toppar_msgq_scan`
/// compares against 0), so such a message times out only when the broker
/// thread next wakes, which while the broker is down is the next reconnect
/// attempt: up to `reconnect.backoff.max.ms` (10 s by default) away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c11_a_publish_in_a_long_outage_fails_within_its_timeout() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("long-outage", 1, 1).unwrap();
    let timeout = Duration::from_secs(2);
    let bus = polybus_kafka::connect_with(mock_bus_options(&cluster).publish_timeout(timeout))
        .await
        .unwrap();
    bus.publish("long-outage", Message::new("before"))
        .await
        .unwrap();
    cluster.broker_down(1).unwrap();
    // Let the reconnect back-off grow as it does in a real outage.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let publishes = (0..4).map(|i| {
        let bus = bus.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(700) * i).await;
            let started = std::time::Instant::now();
            let err = bus
                .publish("long-outage", Message::new(format!("during-{i}")))
                .await
                .unwrap_err();
            (started.elapsed(), err)
        }
    });
    for (took, err) in futures::future::join_all(publishes).await {
        assert!(
            matches!(err.kind(), Kind::Timeout | Kind::Connection),
            "{}",
            err.error()
        );
        assert!(
            took < timeout + Duration::from_secs(3),
            "a publish with a {timeout:?} time-out failed only after {took:?}"
        );
    }
}

/// C4: a transient produce error is retried by the idempotent producer; the
/// publish succeeds, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c4_transient_produce_errors_are_retried_without_duplicates() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("flaky", 1, 1).unwrap();
    let bus = polybus_kafka::connect_with(mock_bus_options(&cluster))
        .await
        .unwrap();
    let mut sub = bus
        .subscribe(Subscription::new("flaky").group("flaky-readers"))
        .await
        .unwrap();
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        ],
    );
    bus.publish("flaky", Message::new("once")).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(d.message().payload().as_ref(), b"once");
    d.ack().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), sub.next())
            .await
            .is_err(),
        "the retried record arrived twice"
    );
}

/// C2/C9: a durable group keeps what was published while no member ran, even
/// when the broker fails to answer the new member's read of the committed
/// offsets. Found in review: the assignment then treated the group as new and
/// started (and committed) every partition at its end, skipping the backlog.
/// Two failures are outlasted by asking again; three (every read) make the
/// member read from the start, so the backlog comes, perhaps twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c2_a_failed_offset_read_at_assignment_skips_no_backlog() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let cluster = MockCluster::new(1).unwrap();
    let bus = polybus_kafka::connect_with(mock_bus_options(&cluster))
        .await
        .unwrap();
    for failures in [2, 3] {
        let topic = format!("backlog-{failures}");
        cluster.create_topic(&topic, 1, 1).unwrap();
        let group = || Subscription::new(topic.as_str()).group(format!("readers-{failures}"));
        // The group exists, and has committed its "now".
        bus.subscribe(group())
            .await
            .unwrap()
            .close(Duration::ZERO)
            .await
            .unwrap();
        for i in 0..3 {
            bus.publish(&topic, Message::new(format!("m{i}")))
                .await
                .unwrap();
        }
        // The next OffsetFetch requests fail, as a busy or failing-over coordinator's do.
        cluster.request_errors(
            RDKafkaApiKey::OffsetFetch,
            &vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED; failures],
        );
        let mut sub = bus.subscribe(group()).await.unwrap();
        let mut got = std::collections::BTreeSet::new();
        while got.len() < 3 {
            let d = recv(&mut sub).await;
            got.insert(String::from_utf8_lossy(d.message().payload()).into_owned());
            d.ack().await.unwrap();
        }
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            ["m0", "m1", "m2"],
            "{failures} failures"
        );
        sub.close(Duration::ZERO).await.unwrap();
    }
}

/// C3/C12: a subscribe whose group never completes a rebalance fails within
/// its time-out with a `Timeout` that says what this member is waiting for,
/// in librdkafka's words, whether or not the coordinator answers
/// DescribeGroups (tansu 0.6 does not; `tests/groups.rs` has the broker fault
/// this stands for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c3_a_join_that_never_completes_says_what_the_member_waits_for() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let cluster = MockCluster::new(1).unwrap();
    let bus = polybus_kafka::connect_with(
        mock_bus_options(&cluster).subscribe_timeout(Duration::from_secs(6)),
    )
    .await
    .unwrap();
    cluster.create_topic("stuck", 1, 1).unwrap();
    // Every SyncGroup is answered as tansu answers a group with a departed leader.
    cluster.request_errors(
        RDKafkaApiKey::SyncGroup,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; 500],
    );
    let started = std::time::Instant::now();
    let Err(e) = bus
        .subscribe(Subscription::new("stuck").group("stuck-readers"))
        .await
    else {
        panic!("no assignment can complete");
    };
    assert_eq!(e.kind(), Kind::Timeout, "{e}");
    assert!(started.elapsed() < Duration::from_secs(20), "{e}");
    let text = e.to_string();
    assert!(text.contains("join state `wait-"), "{text}");
    assert!(
        text.contains("JoinGroup") || text.contains("SyncGroup"),
        "{text}"
    );
    println!("{text}");
}

/// C7: an acked message is not delivered to its group again because a commit
/// failed. Found with ten members on the mock cluster (490 of 500 acked
/// messages came again after a rolling restart): a failed periodic commit was
/// counted as done, so neither the next one nor the revocation's sent it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c7_acks_whose_commit_failed_are_committed_again() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("commits", 1, 1).unwrap();
    let bus = polybus_kafka::connect_with(mock_bus_options(&cluster))
        .await
        .unwrap();
    let group = || Subscription::new("commits").group("committers");
    let mut sub = bus.subscribe(group()).await.unwrap();
    // The next commits fail, as they do while a busy coordinator rebalances.
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED; 3],
    );
    for i in 0..3 {
        bus.publish("commits", Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    // Acked together, so one commit carries all three.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(recv(&mut sub).await);
    }
    for d in held {
        d.ack().await.unwrap();
    }
    // Past a few commit intervals: the failed commit, and the next chance.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    sub.close(Duration::from_secs(1)).await.unwrap();
    let mut again = bus.subscribe(group()).await.unwrap();
    if let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(3), again.next()).await {
        let d = d.unwrap();
        panic!(
            "acked {:?} came again (attempt {})",
            String::from_utf8_lossy(d.message().payload()),
            d.attempt()
        );
    }
}

/// C3: a private subscription whose offset reads fail still starts at "now":
/// it has no offsets to read, and replaying the topic's history would be wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c3_a_private_subscription_starts_at_now_when_offset_reads_fail() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("history", 1, 1).unwrap();
    let bus = polybus_kafka::connect_with(mock_bus_options(&cluster))
        .await
        .unwrap();
    bus.publish("history", Message::new("old")).await.unwrap();
    cluster.request_errors(
        RDKafkaApiKey::OffsetFetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED; 3],
    );
    let mut sub = bus.subscribe(Subscription::new("history")).await.unwrap();
    bus.publish("history", Message::new("new")).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(
        d.message().payload().as_ref(),
        b"new",
        "the history was replayed"
    );
    d.ack().await.unwrap();
}

/// Not polybus's: librdkafka 2.12.1's mock cluster stalls a plain rdkafka
/// consumer in the middle of a burst of 200 records of 64 KiB (three brokers,
/// replication factor 3): it received 80, 110 and 140 of them and then nothing
/// for 20 s in three of four runs on 2026-12-06, and a polybus subscription
/// stalled the same way (65, 125, 140, 155 of 200). Run it with `--ignored`
/// after a librdkafka upgrade; the benches leave out 64 KiB end to end on the
/// mock cluster until it passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "librdkafka 2.12.1's mock cluster stalls consumers on 64 KiB bursts (see the doc comment)"]
async fn mock_cluster_delivers_a_burst_of_64_kib_records_to_raw_rdkafka() {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let cluster = MockCluster::new(3).unwrap();
    cluster.create_topic("large", 3, 3).unwrap();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("group.id", "raw-large")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "20")
        .create()
        .unwrap();
    consumer.subscribe(&["large"]).unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create()
        .unwrap();
    let payload = vec![7u8; 64 * 1024];
    let sends = (0..200).map(|_| {
        producer.send(
            FutureRecord::<(), [u8]>::to("large").payload(&payload),
            Duration::from_secs(30),
        )
    });
    for r in futures::future::join_all(sends).await {
        r.unwrap();
    }
    let mut n = 0;
    while n < 200 {
        tokio::time::timeout(Duration::from_secs(20), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("raw received {n} of 200, then nothing for 20 s"))
            .unwrap();
        n += 1;
    }
}
