//! Failover on a three-node RabbitMQ cluster (`scripts/brokers/rabbitmq-cluster.sh
//! start`): a durable group is a quorum queue replicated on all three nodes;
//! a publisher (single publishes and batches of eight) and a consumer group
//! run, each on its own connection and each naming the three nodes in its URL,
//! while the test
//!
//! 1. kills (`kill -9`) the node that leads the group's quorum queue, and
//!    starts it again;
//! 2. kills a node a client is connected to (the publisher's, or, when that
//!    node now leads the queue, the consumer's), and starts it again;
//! 3. stops a node gracefully, and starts it again.
//!
//! An independent oracle counts every publish that returned `Ok`: each must be
//! delivered; it prints published / confirmed / failed / received / lost /
//! duplicated and how long publishing and delivery stalled after each fault.
//! In its own test binary, as the outages must not touch other tests.
//! `POLYBUS_SKIP_AMQP=1` opts out.
#![cfg(feature = "amqp")]

use std::time::Duration;

use polybus::Subscription;

mod common;

use common::{Traffic, bus, unique, url};

const SCRIPT: &str = "scripts/brokers/rabbitmq-cluster.sh";
const HINT: &str = "start the cluster with `scripts/brokers/rabbitmq-cluster.sh start`, \
                    or set POLYBUS_SKIP_AMQP=1";

/// The cluster's URL with the nodes in `order`.
fn cluster_url(order: [usize; 3]) -> String {
    let hosts: Vec<String> = order.iter().map(|n| format!("127.0.0.1:568{n}")).collect();
    format!("amqp://guest:guest@{}/polybus-test", hosts.join(","))
}

async fn script(args: &[&str]) {
    let out = tokio::process::Command::new("bash")
        .arg(SCRIPT)
        .args(args)
        .output()
        .await
        .expect("bash");
    assert!(
        out.status.success(),
        "{SCRIPT} {args:?}: {}{}; {HINT}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `rabbitmqctl list_…` as JSON, asked of the first node that answers.
async fn list(args: &[&str]) -> Vec<serde_json::Value> {
    for n in 1..=3 {
        let out = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "-n", &format!("pbc{n}@localhost")])
            .args(args)
            .args(["-p", "polybus-test", "--formatter", "json"])
            .output()
            .await
            .expect("rabbitmqctl");
        if out.status.success()
            && let Ok(rows) = serde_json::from_slice(&out.stdout)
        {
            return rows;
        }
    }
    panic!("no node of the cluster answers rabbitmqctl; {HINT}");
}

/// The node (1-3) that leads quorum queue `queue`.
async fn leader(queue: &str) -> usize {
    let rows = list(&["list_queues", "name", "type", "leader", "members"]).await;
    let row = rows
        .iter()
        .find(|r| r["name"] == queue)
        .unwrap_or_else(|| panic!("no queue {queue} in {rows:?}"));
    assert_eq!(row["type"], "quorum", "{row}");
    assert_eq!(
        row["members"].as_array().map(Vec::len),
        Some(3),
        "replicated on every node: {row}"
    );
    node_of(row["leader"].as_str().unwrap())
}

fn node_of(name: &str) -> usize {
    name.strip_prefix("pbc")
        .and_then(|rest| rest.split('@').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a cluster node: {name}"))
}

/// The nodes (1-3) that client connections are on, read from the server side
/// of each connection's name (`client:port -> 127.0.0.1:568N`).
async fn client_nodes() -> Vec<usize> {
    list(&["list_connections", "name"])
        .await
        .iter()
        .filter_map(|r| {
            let server = r["name"].as_str()?.rsplit("-> ").next()?;
            server.strip_prefix("127.0.0.1:568")?.parse().ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_of_leader_client_node_and_a_graceful_restart_loses_nothing() {
    if url().is_none() {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_test_writer()
        .try_init();
    // The publisher prefers node 1, the consumer node 2, where RabbitMQ puts
    // the group's leader (quorum queues are led by the declaring client's node).
    let publisher = bus(&cluster_url([1, 2, 3])).await;
    let consumer = bus(&cluster_url([2, 3, 1])).await;
    let (topic, group) = (unique("cluster."), unique("cluster-"));
    let sub = consumer
        .subscribe(Subscription::new(&topic).group(&group).prefetch(100))
        .await
        .unwrap();
    let mut traffic = Traffic::start(&publisher, &topic, &[1, 8], sub);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let lead = leader(&group).await;
    traffic.fault(&format!(
        "kill -9 of node {lead}, the quorum queue's leader"
    ));
    script(&["kill", &lead.to_string()]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    script(&["start-node", &lead.to_string()]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let clients = client_nodes().await;
    let lead = leader(&group).await;
    // The publisher's node: one with a client that is not the consumer's, if
    // the two are apart (the consumer is where it went after the first kill).
    let target = clients
        .iter()
        .copied()
        .find(|&n| clients.iter().filter(|&&m| m == n).count() == 1 && n != lead)
        .or_else(|| clients.first().copied())
        .expect("the clients' connections");
    traffic.fault(&format!(
        "kill -9 of node {target}, a client's node (clients on {clients:?}, leader {lead})"
    ));
    script(&["kill", &target.to_string()]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    script(&["start-node", &target.to_string()]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let lead = leader(&group).await;
    let quiet = (1..=3).find(|&n| n != lead).unwrap();
    traffic.fault(&format!("graceful stop of node {quiet}, then start"));
    script(&["stop-node", &quiet.to_string()]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    script(&["start-node", &quiet.to_string()]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    traffic
        .finish("rabbitmq cluster failover", Duration::from_secs(90))
        .await;
}
