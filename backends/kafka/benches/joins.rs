//! How long a member takes to join a consumer group that already has members:
//! polybus beside raw rdkafka with polybus's group settings, on tansu and on
//! librdkafka's mock cluster, in interleaved rounds.
//!
//! Each round gives each client a new group on the same topic and joins
//! `POLYBUS_JOINS_MEMBERS` members (default 20; 3 with `--test`) one after
//! another, each timed from `subscribe` to its first assignment; every member
//! keeps polling, so it takes part in each later rebalance, as a service's
//! replicas do. A round's first join makes the group and is left out of the
//! figures. `POLYBUS_JOINS_ROUNDS` rounds (default 3; 1 with `--test`), the
//! clients' order rotating. What each broker does to a join (tansu's fixed 3 s
//! follower pause, the mock cluster's wait of the session time-out less a
//! second) is in `tests/groups.rs`; both clients meet it alike.
//!
//! Needs the broker of `scripts/brokers/tansu.sh start` (or
//! `POLYBUS_KAFKA_URL`); `POLYBUS_SKIP_KAFKA=1` skips it, saying so. Writes
//! `target/polybus-bench/joins.json` for `scripts/benchmarks.py`.

use std::time::{Duration, Instant};

use polybus_core::Subscription;

#[path = "../../../benches/support/mod.rs"]
mod support;

#[path = "../tests/support/mod.rs"]
mod groups;

use groups::{Broker, RawMember};

/// How long a join may take before the bench fails, saying so.
const WITHIN: Duration = Duration::from_secs(60);

fn setting(var: &str, default: usize, quick: usize) -> usize {
    if support::quick() {
        return quick;
    }
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Join `members` polybus members to a new `group` of `topic`: each join's
/// milliseconds.
async fn polybus_round(
    bus: &polybus_core::Bus,
    topic: &str,
    group: &str,
    members: usize,
) -> Vec<f64> {
    let (mut streams, mut took) = (Vec::new(), Vec::new());
    for n in 0..members {
        let started = Instant::now();
        let stream =
            tokio::time::timeout(WITHIN, bus.subscribe(Subscription::new(topic).group(group)))
                .await
                .unwrap_or_else(|_| panic!("polybus member {n} did not join within {WITHIN:?}"))
                .unwrap_or_else(|e| panic!("polybus member {n} failed to join: {e}"));
        took.push(started.elapsed().as_secs_f64() * 1e3);
        streams.push(stream);
    }
    futures::future::join_all(streams.into_iter().map(|s| async move {
        s.close(Duration::from_secs(5)).await.expect("close");
    }))
    .await;
    took
}

/// The same with raw rdkafka members.
fn raw_round(broker: &Broker, topic: &str, group: &str, members: usize) -> Vec<f64> {
    let (mut joined, mut took) = (Vec::new(), Vec::new());
    for n in 0..members {
        let (member, t) = RawMember::join(broker.raw_config(group), topic, WITHIN)
            .unwrap_or_else(|| panic!("raw member {n} did not join within {WITHIN:?}"));
        took.push(t.as_secs_f64() * 1e3);
        joined.push(member);
    }
    RawMember::close_all(joined);
    took
}

/// Interleaved rounds on `broker`: one row per client with every join's time,
/// round by round.
fn joins_on(rt: &tokio::runtime::Runtime, broker: &Broker) -> Vec<serde_json::Value> {
    let (members, rounds) = (
        // The first join of a round is not counted: at least one more.
        setting("POLYBUS_JOINS_MEMBERS", 20, 3).max(2),
        setting("POLYBUS_JOINS_ROUNDS", 3, 1),
    );
    let bus = rt.block_on(broker.bus());
    let topic = broker.topic("bench.joins");
    rt.block_on(broker.ensure_topic(&bus, &topic));
    let names = ["polybus", "raw"];
    let mut joins: [Vec<Vec<f64>>; 2] = Default::default();
    for round in 0..rounds {
        for k in 0..names.len() {
            let i = (round + k) % names.len();
            let group = format!("bench-joins-{}", polybus_core::testkit::unique_name());
            let took = match i {
                0 => rt.block_on(polybus_round(&bus, &topic, &group, members)),
                _ => raw_round(broker, &topic, &group, members),
            };
            let later = &took[1..];
            println!(
                "{}/joins/{} round {round}: first {:.0} ms, then {:.0}–{:.0} ms",
                broker.label(),
                names[i],
                took[0],
                later.iter().cloned().fold(f64::INFINITY, f64::min),
                later.iter().cloned().fold(0.0, f64::max),
            );
            joins[i].push(took);
        }
    }
    names
        .iter()
        .zip(joins)
        .map(|(name, joins_ms)| {
            serde_json::json!({
                "broker": broker.label(), "impl": name, "members": members, "joins_ms": joins_ms,
            })
        })
        .collect()
}

fn main() {
    if support::skipped("kafka") {
        return;
    }
    let rt = support::runtime();
    let Some(tansu) = Broker::tansu() else {
        return;
    };
    let mut rows = joins_on(&rt, &tansu);
    rows.extend(joins_on(&rt, &Broker::mock()));
    support::write_joins(rows);
}
