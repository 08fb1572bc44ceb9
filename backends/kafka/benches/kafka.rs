//! The Kafka backend beside raw rdkafka doing the same work with the same
//! settings, in the same run: `acks=all` and idempotence on both producers,
//! the whole batch in flight; on the consuming side a `StreamConsumer` that
//! stores each offset after handling it (auto-committed), against a polybus
//! group subscription that acks each delivery. Then latency at fixed rates and
//! allocations per message, both beside raw.
//!
//! Needs the broker of `scripts/brokers/tansu.sh start` (or `POLYBUS_KAFKA_URL`);
//! `POLYBUS_SKIP_KAFKA=1` skips it, saying so. `scripts/bench` runs every bench
//! and writes BENCHMARKS.md.

use std::alloc::System;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use polybus_core::{Bus, Message};
use rdkafka::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

#[path = "../../../benches/support/mod.rs"]
mod support;

use support::{Latencies, SIZES};

#[global_allocator]
static ALLOC: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const HINT: &str = "start tansu with `scripts/brokers/tansu.sh start`, or set POLYBUS_SKIP_KAFKA=1";

fn brokers() -> String {
    std::env::var("POLYBUS_KAFKA_URL")
        .unwrap_or_else(|_| "kafka://127.0.0.1:9092".into())
        .trim_start_matches("kafka://")
        .split('?')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// A 36-character id, as long as polybus's (a hyphenated uuid).
/// A message id as polybus makes them, for the raw producer's id header.
fn message_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

async fn bus() -> Bus {
    polybus_kafka::connect(&format!("kafka://{}", brokers()))
        .await
        .unwrap_or_else(|e| panic!("cannot reach kafka: {e}; {HINT}"))
}

/// The raw producer, configured as polybus configures its own.
fn raw_producer() -> FutureProducer {
    raw_producer_on(&brokers())
}

fn raw_producer_on(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("log_level", "3")
        .create()
        .expect("raw producer")
}

/// The raw consumer: stored offsets, auto-committed; the fetch settings polybus uses.
fn raw_consumer(topic: &str) -> StreamConsumer {
    raw_consumer_on(&brokers(), topic)
}

fn raw_consumer_on(brokers: &str, topic: &str) -> StreamConsumer {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("raw-{}", polybus_core::testkit::unique_name()),
        )
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "latest")
        .set("fetch.wait.max.ms", "100")
        .set("heartbeat.interval.ms", "500")
        .set("log_level", "3")
        .create()
        .expect("raw consumer");
    c.subscribe(&[topic]).expect("subscribe");
    c
}

/// Wait until a raw consumer has its partitions, the way polybus's subscribe does.
async fn raw_ready(c: &StreamConsumer, producer: &FutureProducer, topic: &str) {
    // Probe until a record arrives: then the assignment is in place.
    loop {
        producer
            .send(
                FutureRecord::<(), [u8]>::to(topic).payload(b"probe"),
                Duration::from_secs(5),
            )
            .await
            .expect("probe");
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(2), c.recv()).await {
            c.store_offset_from_message(&m).expect("store");
            break;
        }
    }
    // Drain any further probes.
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), c.recv()).await {
        c.store_offset_from_message(&m).expect("store");
    }
}

/// A record as a raw client that wants message ids writes it: the payload and
/// an id header, as polybus writes `polybus-id` (C13).
fn raw_record<'a>(topic: &'a str, payload: &'a [u8], id: &'a str) -> FutureRecord<'a, (), [u8]> {
    FutureRecord::to(topic)
        .payload(payload)
        .headers(OwnedHeaders::new().insert(Header {
            key: "id",
            value: Some(id.as_bytes()),
        }))
}

async fn raw_send_all(producer: &FutureProducer, topic: &str, payload: &Bytes, n: usize) {
    let ids: Vec<String> = (0..n).map(|_| message_id()).collect();
    let sends = ids
        .iter()
        .map(|id| producer.send(raw_record(topic, payload, id), Duration::from_secs(30)));
    for r in futures::future::join_all(sends).await {
        r.expect("raw send");
    }
}

fn publish(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let mut group = support::broker_group(c, "kafka/publish");
    let bus = rt.block_on(bus());
    let producer = raw_producer();
    for size in SIZES {
        let n = support::batch_for(size);
        group.throughput(Throughput::Elements(n as u64));
        let payload = Bytes::from(vec![7u8; size]);
        let topic = support::name("pub");
        // Creates the topic; the raw producer writes to one made the same way.
        let raw_topic = support::name("pubraw");
        rt.block_on(async {
            bus.publish(&topic, Message::new("warm")).await.unwrap();
            bus.publish(&raw_topic, Message::new("warm")).await.unwrap();
        });
        group.bench_function(BenchmarkId::new("polybus", format!("{size}B")), |b| {
            b.to_async(rt)
                .iter(|| support::publish_batch(&bus, &topic, &payload, n))
        });
        group.bench_function(BenchmarkId::new("raw", format!("{size}B")), |b| {
            b.to_async(rt)
                .iter(|| raw_send_all(&producer, &raw_topic, &payload, n))
        });
    }
    group.finish();
}

fn end_to_end(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let mut group = support::broker_group(c, "kafka/end_to_end");
    let bus = rt.block_on(bus());
    let producer = raw_producer();
    for size in SIZES {
        let n = support::batch_for(size);
        group.throughput(Throughput::Elements(n as u64));
        let payload = Bytes::from(vec![7u8; size]);

        let topic = support::name("e2e");
        let mut sub = rt.block_on(support::own_group(&bus, &topic, 1_000));
        group.bench_function(BenchmarkId::new("polybus", format!("{size}B")), |b| {
            b.iter_custom(|iters| {
                support::time_rounds(rt, &bus, &topic, &mut sub, &payload, n, iters)
            })
        });

        let raw_topic = support::name("e2eraw");
        rt.block_on(bus.publish(&raw_topic, Message::new("create")))
            .unwrap();
        let consumer = raw_consumer(&raw_topic);
        rt.block_on(raw_ready(&consumer, &producer, &raw_topic));
        group.bench_function(BenchmarkId::new("raw", format!("{size}B")), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        tokio::join!(raw_send_all(&producer, &raw_topic, &payload, n), async {
                            for _ in 0..n {
                                let m = consumer.recv().await.expect("recv");
                                std::hint::black_box(m.payload());
                                consumer.store_offset_from_message(&m).expect("store");
                            }
                        });
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

/// Producers and a consumer group running continuously, polybus beside raw
/// rdkafka, on the broker at `brokers` (`broker` names it in the results):
/// end to end, then publish only. `topic` makes a topic ready for both.
fn sustained_on(
    rt: &tokio::runtime::Runtime,
    broker: &str,
    bus: &Bus,
    brokers: &str,
    topic: &dyn Fn(&'static str) -> futures::future::BoxFuture<'static, String>,
) -> Vec<serde_json::Value> {
    let producer = raw_producer_on(brokers);
    let polybus = |count: bool| -> support::Start<'_> {
        Box::new(move |stream| {
            Box::pin(async move {
                let topic = topic("sus").await;
                let mut tasks = Vec::new();
                if !count {
                    let sub = support::own_group(bus, &topic, 1_000).await;
                    tasks.push(support::polybus_consumer(sub, &stream));
                }
                tasks.extend(support::polybus_producers(bus, &topic, &stream, count));
                tasks
            })
        })
    };
    let producer = &producer;
    let raw = |count: bool| -> support::Start<'_> {
        Box::new(move |stream| {
            Box::pin(async move {
                let topic = topic("susraw").await;
                let mut tasks = Vec::new();
                if !count {
                    let consumer = raw_consumer_on(brokers, &topic);
                    raw_ready(&consumer, producer, &topic).await;
                    let stream = stream.clone();
                    tasks.push(tokio::spawn(async move {
                        loop {
                            let m = consumer.recv().await.expect("recv");
                            std::hint::black_box(m.payload());
                            consumer.store_offset_from_message(&m).expect("store");
                            stream.done(1);
                        }
                    }));
                }
                let payload = Bytes::from(vec![7u8; support::SUSTAINED_SIZE]);
                for _ in 0..support::PRODUCERS {
                    let (producer, stream, topic, payload) = (
                        producer.clone(),
                        stream.clone(),
                        topic.clone(),
                        payload.clone(),
                    );
                    tasks.push(tokio::spawn(async move {
                        while stream.may_publish(support::IN_FLIGHT).await {
                            raw_send_all(&producer, &topic, &payload, support::IN_FLIGHT).await;
                            if count {
                                stream.done(support::IN_FLIGHT as u64);
                            }
                        }
                    }));
                }
                tasks
            })
        })
    };
    let mut rows = rt.block_on(support::sustained(
        broker,
        "end_to_end",
        true,
        &[("polybus", polybus(false)), ("raw", raw(false))],
    ));
    rows.extend(rt.block_on(support::sustained(
        broker,
        "publish",
        false,
        &[("polybus", polybus(true)), ("raw", raw(true))],
    )));
    rows
}

/// The sustained streams on tansu, then on librdkafka's in-process mock
/// cluster (three brokers, replication factor 3), where the broker is not the
/// bottleneck and the figures show the clients.
fn sustained(rt: &tokio::runtime::Runtime) {
    let bus = rt.block_on(bus());
    let on_tansu = |prefix: &'static str| -> futures::future::BoxFuture<'static, String> {
        let bus = bus.clone();
        Box::pin(async move {
            let topic = support::name(prefix);
            // polybus creates its topics (3 partitions); the raw side uses one made so.
            bus.publish(&topic, Message::new("create"))
                .await
                .expect("create the topic");
            topic
        })
    };
    let mut rows = sustained_on(rt, "kafka", &bus, &brokers(), &on_tansu);
    let cluster = MockCluster::new(3).expect("librdkafka's mock cluster");
    let mock_bus = rt
        .block_on(polybus_kafka::connect_with(
            polybus_kafka::KafkaOptions::new(cluster.bootstrap_servers()).create_topics(false),
        ))
        .expect("the mock cluster");
    let on_mock = |prefix: &'static str| -> futures::future::BoxFuture<'static, String> {
        let topic = support::name(prefix);
        cluster.create_topic(&topic, 3, 3).expect("mock topic");
        Box::pin(futures::future::ready(topic))
    };
    rows.extend(sustained_on(
        rt,
        "kafka-mock",
        &mock_bus,
        &cluster.bootstrap_servers(),
        &on_mock,
    ));
    support::write_sustained("kafka", rows);
}

fn latency_and_allocations(rt: &tokio::runtime::Runtime) {
    let bus = rt.block_on(bus());
    let producer = raw_producer();
    let mut latency = Vec::new();
    for rate in support::KAFKA_RATES {
        let n = support::latency_count(rate);
        let lat = rt.block_on(support::polybus_latency(
            &bus,
            &support::name("lat"),
            1_000,
            rate,
            n,
        ));
        latency.push(lat.row("kafka", "polybus", rate));

        let lat = Latencies::default();
        rt.block_on(async {
            let topic = support::name("latraw");
            bus.publish(&topic, Message::new("create")).await.unwrap();
            let consumer = raw_consumer(&topic);
            raw_ready(&consumer, &producer, &topic).await;
            let l = lat.clone();
            let task = tokio::spawn(async move {
                loop {
                    let m = consumer.recv().await.expect("recv");
                    l.record(m.payload().unwrap_or_default());
                    consumer.store_offset_from_message(&m).unwrap();
                }
            });
            support::at_rate(rate, n, &lat, |p| {
                let (producer, topic) = (producer.clone(), topic.clone());
                async move {
                    let id = message_id();
                    producer
                        .send(raw_record(&topic, &p, &id), Duration::from_secs(30))
                        .await
                        .unwrap();
                }
            })
            .await;
            task.abort();
        });
        latency.push(lat.row("kafka", "raw", rate));
    }

    let n: u64 = if support::quick() { 200 } else { 2_000 };
    let payload = Bytes::from_static(&[7u8; 16]);
    let topic = support::name("alloc");
    let mut sub = rt.block_on(support::own_group(&bus, &topic, 1_000));
    let polybus_allocs = support::allocations_per_message(ALLOC, n, || {
        rt.block_on(async {
            support::polybus_round(&bus, &topic, &mut sub, &payload, n as usize).await;
        })
    });
    let raw_topic = support::name("allocraw");
    rt.block_on(bus.publish(&raw_topic, Message::new("create")))
        .unwrap();
    let consumer = raw_consumer(&raw_topic);
    rt.block_on(raw_ready(&consumer, &producer, &raw_topic));
    let raw_allocs = support::allocations_per_message(ALLOC, n, || {
        rt.block_on(async {
            tokio::join!(
                raw_send_all(&producer, &raw_topic, &payload, n as usize),
                async {
                    for _ in 0..n {
                        let m = consumer.recv().await.unwrap();
                        consumer.store_offset_from_message(&m).unwrap();
                    }
                }
            );
        })
    });
    support::write_results(
        "kafka",
        latency,
        support::alloc_rows("kafka", polybus_allocs, raw_allocs),
    );
}

fn main() {
    if support::skipped("kafka") {
        return;
    }
    let rt = support::runtime();
    // rdkafka's StreamConsumer registers with the runtime it is made in.
    let _context = rt.enter();
    let mut c = Criterion::default().configure_from_args();
    publish(&mut c, &rt);
    end_to_end(&mut c, &rt);
    c.final_summary();
    if support::extras() {
        latency_and_allocations(&rt);
    }
    if support::sustained_wanted() {
        sustained(&rt);
    }
}
