//! Kafka failover, on librdkafka's mock cluster: three brokers in process,
//! every partition replicated three times. The broker that leads every
//! partition goes down mid-stream (the mock moves no leader by itself, so the
//! test moves them, as the controller would), then comes back and leads
//! again, while a single publisher, a batch publisher and a consumer group
//! run. An independent oracle counts every publish that returned `Ok`: each
//! must be delivered.
//!
//! What the mock cannot show: replication itself (it keeps one log per
//! partition, so no acknowledged write can be lost to an unclean election),
//! and a coordinator failover (the group's coordinator is pinned to a broker
//! that stays up). tansu runs as one broker, so it takes no part here; its
//! kill -9 and restart is `kafka_restart.rs`.
#![cfg(feature = "kafka")]

use std::time::Duration;

use polybus::Subscription;
use polybus::names::{dead_letter_topic, retry_store};
use rdkafka::mocking::{MockCluster, MockCoordinator};

mod common;

use common::{Traffic, unique};

/// Make `topic` on the cluster, three partitions led by `leader`.
fn topic_led_by(
    cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
    topic: &str,
    leader: i32,
) {
    cluster.create_topic(topic, 3, 3).unwrap();
    lead(cluster, topic, leader);
}

fn lead(
    cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
    topic: &str,
    leader: i32,
) {
    for partition in 0..3 {
        cluster
            .partition_leader(topic, partition, Some(leader))
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_the_partition_leader_dies_and_returns_and_nothing_is_lost() {
    let cluster = MockCluster::new(3).unwrap();
    let topic = unique("failover.");
    let group = unique("failover-");
    let topics = [
        topic.clone(),
        retry_store(&group),
        dead_letter_topic(&group),
    ];
    for t in &topics {
        topic_led_by(&cluster, t, 1);
    }
    cluster
        .coordinator(MockCoordinator::Group(group.clone()), 3)
        .unwrap();
    // The mock has no CreateTopics handler: the topics are made above.
    let url = format!(
        "kafka://{}?create_topics=false&publish_timeout_ms=20000&session.timeout.ms=3000",
        cluster.bootstrap_servers()
    );
    let publisher = polybus::connect(&url).await.unwrap();
    let consumer = polybus::connect(&url).await.unwrap();
    let sub = consumer
        .subscribe(Subscription::new(&topic).group(&group).prefetch(100))
        .await
        .unwrap();
    let mut traffic = Traffic::start(&publisher, &topic, &[1, 16], sub);

    tokio::time::sleep(Duration::from_secs(2)).await;
    traffic.fault("broker 1, every partition's leader, goes down; broker 2 leads");
    cluster.broker_down(1).unwrap();
    for t in &topics {
        lead(&cluster, t, 2);
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    traffic.fault("broker 1 comes back and leads again");
    cluster.broker_up(1).unwrap();
    for t in &topics {
        lead(&cluster, t, 1);
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    traffic
        .finish("kafka failover (mock cluster)", Duration::from_secs(60))
        .await;
}
