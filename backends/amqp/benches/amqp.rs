//! The RabbitMQ backend beside raw lapin doing the same work with the same
//! settings, in the same run: persistent messages with publisher confirms, the
//! whole batch in flight; consuming from a durable quorum queue with the same
//! prefetch and one ack per message. Raw lapin sends the same AMQP message
//! polybus does (a message id, the timestamp, the millisecond timestamp header
//! of C13), as the Kafka bench's raw producer writes polybus's id header, so the
//! ratios compare the clients, not what they carry. Then latency at fixed rates and allocations
//! per message, both beside raw.
//!
//! Needs the broker of `scripts/brokers/rabbitmq.sh start` (or `POLYBUS_AMQP_URL`);
//! `POLYBUS_SKIP_AMQP=1` skips it, saying so. `scripts/bench` runs every bench
//! and writes BENCHMARKS.md.

use std::alloc::System;
use std::num::NonZeroU16;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use criterion::Criterion;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use omniqueue::backends::rabbitmq as oq;
use polybus_core::Bus;
use ruststream::{Broker, OutgoingMessage, Publisher};
use ruststream_lapin::{ConnectedLapinBroker, LapinBroker, LapinPublish, RabbitQuorumQueue};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

#[path = "../../../benches/support/mod.rs"]
mod support;

use support::{Latencies, SIZES};

#[global_allocator]
static ALLOC: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const HINT: &str =
    "start RabbitMQ with `scripts/brokers/rabbitmq.sh start`, or set POLYBUS_SKIP_AMQP=1";
const PREFETCH: u16 = 300;
const RAW_EXCHANGE: &str = "polybus-bench-raw";

fn url() -> String {
    std::env::var("POLYBUS_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/polybus-test".into())
}

/// polybus on an exchange of its own, so routing is not slowed by the bindings
/// test runs leave on the default `polybus` exchange; raw lapin has its own too.
async fn bus() -> Bus {
    let url = url();
    let sep = if url.contains('?') { '&' } else { '?' };
    polybus_amqp::connect(&format!("{url}{sep}exchange=polybus-bench"))
        .await
        .unwrap_or_else(|e| panic!("cannot reach RabbitMQ: {e}; {HINT}"))
}

/// Raw lapin: a confirm channel for publishing, a topic exchange like polybus's.
struct Raw {
    conn: Connection,
    publish: Channel,
    consume: Channel,
}

async fn raw() -> Raw {
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("cannot reach RabbitMQ: {e}; {HINT}"));
    let publish = conn.create_channel().await.unwrap();
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish
        .exchange_declare(
            RAW_EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consume = conn.create_channel().await.unwrap();
    consume
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    Raw {
        conn,
        publish,
        consume,
    }
}

impl Raw {
    /// A durable quorum queue bound to `topic`, as polybus makes for a group.
    async fn queue(&self, topic: &str) -> lapin::Consumer {
        self.queue_on(&self.consume, topic).await
    }

    async fn queue_on(&self, channel: &Channel, topic: &str) -> lapin::Consumer {
        let queue = self.declare(channel, topic).await;
        channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap()
    }

    /// Declare the queue of `topic` and bind it; its name.
    async fn declare(&self, channel: &Channel, topic: &str) -> String {
        let queue = format!("raw-{topic}");
        declare_quorum(channel, &queue).await;
        channel
            .queue_bind(
                queue.as_str().into(),
                RAW_EXCHANGE.into(),
                topic.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        queue
    }

    /// Publish `n` persistent messages, all in flight, and wait for every confirm.
    async fn publish_all(&self, topic: &str, payload: &[u8], n: usize) {
        publish_on(&self.publish, (RAW_EXCHANGE, topic), payload, n).await
    }
}

/// Declare `queue` durable and quorum, as polybus makes a group's queue.
async fn declare_quorum(channel: &Channel, queue: &str) {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
}

/// One persistent publish of `payload` on the confirm channel `channel`,
/// resolved once lapin's I/O thread has written it.
async fn raw_publish_one(
    channel: &Channel,
    (exchange, routing_key): (&str, &str),
    payload: &[u8],
) -> lapin::PublisherConfirm {
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            payload,
            raw_properties(),
        )
        .await
        .unwrap()
}

/// Publish `n` persistent messages on the confirm channel `channel`, all in
/// flight, and wait for every confirm. Each `basic_publish` is awaited (lapin's
/// I/O thread has written it) before the next is made, as a plain loop does.
async fn publish_on(channel: &Channel, target: (&str, &str), payload: &[u8], n: usize) {
    let mut confirms = Vec::with_capacity(n);
    for _ in 0..n {
        confirms.push(raw_publish_one(channel, target, payload).await);
    }
    for c in futures::future::join_all(confirms).await {
        assert!(c.unwrap().is_ack());
    }
}

/// [`publish_on`] with every `basic_publish` awaited together, so lapin writes
/// the batch's frames in few writes (as ruststream's publishes, and polybus's
/// batches, go): what pipelining saves the client and the broker.
async fn publish_pipelined(channel: &Channel, target: (&str, &str), payload: &[u8], n: usize) {
    let publishes = (0..n).map(|_| async {
        let confirm = raw_publish_one(channel, target, payload).await;
        assert!(confirm.await.unwrap().is_ack());
    });
    futures::future::join_all(publishes).await;
}

/// What polybus puts on each message, made by hand: a message id, the time in
/// seconds (the AMQP property) and in milliseconds (a header).
fn raw_properties() -> BasicProperties {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    let mut headers = FieldTable::default();
    headers.insert(
        "polybus-timestamp-ms".into(),
        AMQPValue::LongString(millis.to_string().into_bytes().into()),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(uuid::Uuid::now_v7().to_string().into())
        .with_timestamp(millis / 1000)
        .with_headers(headers)
}

async fn raw_consume(consumer: &mut lapin::Consumer, n: usize) {
    for _ in 0..n {
        let d = consumer.next().await.expect("open").expect("delivery");
        std::hint::black_box(&d.data);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
}

/// Publish with confirms and end to end at every size: criterion's groups and
/// the interleaved rounds (`support::throughput`) run the same closures.
/// Publishing runs polybus, raw lapin and the peers; end to end polybus and
/// raw lapin (the sustained streams have the peers end to end).
fn throughput(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let bus = rt.block_on(bus());
    let raw = rt.block_on(raw());
    let connected = rt.block_on(ruststream_on());
    let queues = std::sync::Mutex::new(Vec::new());
    let mut rows = Vec::new();
    if support::wants("amqp/publish") {
        let mut group = support::broker_group(c, "amqp/publish");
        for size in SIZES {
            let (n, payload) = (support::batch_for(size), Bytes::from(vec![7u8; size]));
            let impls = vec![
                (
                    "polybus",
                    polybus_publish(rt, &bus, &raw, &queues, payload.clone(), n),
                ),
                ("raw", raw_publish(rt, &raw, &queues, payload.clone(), n)),
                (
                    "ruststream",
                    ruststream_publish(rt, &connected, &raw, &queues, payload.clone(), n),
                ),
                (
                    "omniqueue",
                    omniqueue_publish(rt, &raw, &queues, payload, n),
                ),
            ];
            rows.extend(support::throughput(
                &mut group,
                ("amqp", "publish"),
                size,
                n,
                impls,
            ));
        }
        group.finish();
    }
    if support::wants("amqp/end_to_end") {
        let mut group = support::broker_group(c, "amqp/end_to_end");
        for size in SIZES {
            let (n, payload) = (support::batch_for(size), Bytes::from(vec![7u8; size]));
            let polybus = support::polybus_end_to_end(
                rt,
                &bus,
                support::name("e2e"),
                PREFETCH.into(),
                payload.clone(),
                n,
            );
            let raw_topic = support::name("e2eraw");
            let mut consumer = rt.block_on(raw.queue(&raw_topic));
            let raw = &raw;
            let raw: support::Timed<'_> = Box::new(move |iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        tokio::join!(
                            raw.publish_all(&raw_topic, &payload, n),
                            raw_consume(&mut consumer, n)
                        );
                    }
                    start.elapsed()
                })
            });
            rows.extend(support::throughput(
                &mut group,
                ("amqp", "end_to_end"),
                size,
                n,
                vec![("polybus", polybus), ("raw", raw)],
            ));
        }
        group.finish();
    }
    support::write_throughput("amqp", rows);
    delete_queues(rt, &raw, &queues);
}

/// polybus publishing a batch with every publish in flight, to a group's
/// queue nobody consumes while the batch is timed: the queue is purged between
/// iterations, unmeasured, as every implementation's is (a consumer attached
/// during the publishes would add the broker's deliveries to the timed work).
fn polybus_publish<'a>(
    rt: &'a tokio::runtime::Runtime,
    bus: &'a Bus,
    raw: &'a Raw,
    queues: &std::sync::Mutex<Vec<String>>,
    payload: Bytes,
    n: usize,
) -> support::Timed<'a> {
    let topic = support::name("pub");
    let group = format!("g{}", polybus_core::testkit::unique_name());
    queues.lock().unwrap().push(group.clone());
    // Subscribing declares and binds the group's queue (named after the group);
    // the subscription itself is not needed.
    drop(
        rt.block_on(
            bus.subscribe(polybus_core::Subscription::new(topic.as_str()).group(group.as_str())),
        )
        .expect("subscribe"),
    );
    Box::new(move |iters| {
        rt.block_on(async {
            let mut measured = std::time::Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                support::publish_batch(bus, &topic, &payload, n).await;
                measured += start.elapsed();
                purge(raw, &group).await;
            }
            measured
        })
    })
}

/// Raw lapin publishing as polybus does, to a queue purged the same way.
fn raw_publish<'a>(
    rt: &'a tokio::runtime::Runtime,
    raw: &'a Raw,
    queues: &std::sync::Mutex<Vec<String>>,
    payload: Bytes,
    n: usize,
) -> support::Timed<'a> {
    let topic = support::name("pubraw");
    let queue = rt.block_on(raw.declare(&raw.consume, &topic));
    queues.lock().unwrap().push(queue.clone());
    Box::new(move |iters| {
        rt.block_on(async {
            let mut measured = std::time::Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                raw.publish_all(&topic, &payload, n).await;
                measured += start.elapsed();
                purge(raw, &queue).await;
            }
            measured
        })
    })
}

/// ruststream's confirming publisher, `n` publishes to a fresh quorum queue
/// awaited together; the queue is purged between iterations, unmeasured.
fn ruststream_publish<'a>(
    rt: &'a tokio::runtime::Runtime,
    connected: &'a ConnectedLapinBroker,
    raw: &'a Raw,
    queues: &std::sync::Mutex<Vec<String>>,
    payload: Bytes,
    n: usize,
) -> support::Timed<'a> {
    let queue = support::name("pubrs");
    queues.lock().unwrap().push(queue.clone());
    // Subscribing declares the queue, as polybus's subscription does; the
    // subscription itself is not needed.
    drop(
        rt.block_on(connected.subscribe(RabbitQuorumQueue::new(queue.as_str())))
            .expect("ruststream subscribe"),
    );
    let publisher = connected.publisher(LapinPublish::default().confirms());
    Box::new(move |iters| {
        rt.block_on(async {
            let mut measured = std::time::Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let sends = (0..n).map(|_| {
                    publisher.publish(OutgoingMessage::new(queue.as_str(), &payload), None)
                });
                for r in futures::future::join_all(sends).await {
                    r.expect("ruststream publish");
                }
                measured += start.elapsed();
                purge(raw, &queue).await;
            }
            measured
        })
    })
}

/// omniqueue's producer, `n` sends awaited together (each waits only for the
/// frame to be written: omniqueue cannot ask for confirms); purged as
/// ruststream's queue is.
fn omniqueue_publish<'a>(
    rt: &'a tokio::runtime::Runtime,
    raw: &'a Raw,
    queues: &std::sync::Mutex<Vec<String>>,
    payload: Bytes,
    n: usize,
) -> support::Timed<'a> {
    let queue = support::name("puboq");
    queues.lock().unwrap().push(queue.clone());
    let producer = rt.block_on(async {
        declare_quorum(&raw.consume, &queue).await;
        oq::RabbitMqBackend::builder(omniqueue_config(&queue))
            .build_producer()
            .await
            .expect("omniqueue producer")
    });
    Box::new(move |iters| {
        rt.block_on(async {
            let mut measured = std::time::Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let sends = (0..n).map(|_| producer.send_raw(&payload));
                for r in futures::future::join_all(sends).await {
                    r.expect("omniqueue send");
                }
                measured += start.elapsed();
                purge(raw, &queue).await;
            }
            measured
        })
    })
}

/// Empty `queue`, so a peer's publishes meet a short queue as polybus's do.
async fn purge(raw: &Raw, queue: &str) {
    raw.consume
        .queue_purge(queue.into(), Default::default())
        .await
        .expect("purge");
}

/// Delete the queues the peers' and the sustained streams' setups recorded.
fn delete_queues(rt: &tokio::runtime::Runtime, raw: &Raw, queues: &std::sync::Mutex<Vec<String>>) {
    let queues = std::mem::take(&mut *queues.lock().unwrap());
    rt.block_on(async {
        for q in queues {
            let _ = raw
                .consume
                .queue_delete(q.as_str().into(), Default::default())
                .await;
        }
    });
}

/// Acks each raw delivery coalesce into, as RabbitMQ's PerfTest
/// `--multi-ack-every`: polybus's own batch at this prefetch (100, under half
/// of 300), so the two send the same frames when nothing is out of order.
const RAW_MULTI_ACK: u64 = 100;

/// A raw lapin stream: [`support::PRODUCERS`] producers, each on a confirm
/// channel of its own (lapin's confirms are not safe to share between
/// concurrent publishers), and a consumer on a fresh channel with the same
/// prefetch acking each delivery (`multi` = 1) or every `multi`-th with
/// `multiple`. Its queue is recorded in `queues`, deleted after the bench.
async fn raw_stream(
    raw: &Raw,
    stream: support::Stream,
    multi: u64,
    queues: &std::sync::Mutex<Vec<String>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let topic = support::name("susraw");
    queues.lock().unwrap().push(format!("raw-{topic}"));
    let channel = raw.conn.create_channel().await.unwrap();
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = raw.queue_on(&channel, &topic).await;
    let mut tasks = raw_producers(raw, (RAW_EXCHANGE, &topic), &stream, false, false).await;
    tasks.push(tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(d) = consumer.next().await {
            let d = d.expect("delivery");
            std::hint::black_box(&d.data);
            n += 1;
            if multi == 1 {
                d.ack(BasicAckOptions::default()).await.unwrap();
                stream.done(1);
            } else if n.is_multiple_of(multi) {
                d.ack(BasicAckOptions { multiple: true }).await.unwrap();
                stream.done(multi);
            }
        }
    }));
    tasks
}

/// Raw lapin's producers of a sustained stream, each on a confirm channel of
/// its own, publishing to `(exchange, routing key)`; with `count`, each
/// confirmed batch counts as done (publish only).
async fn raw_producers(
    raw: &Raw,
    (exchange, topic): (&'static str, &str),
    stream: &support::Stream,
    count: bool,
    pipelined: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    let payload = Bytes::from(vec![7u8; support::SUSTAINED_SIZE]);
    let mut tasks = Vec::new();
    for _ in 0..support::PRODUCERS {
        let channel = raw.conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let (stream, topic, payload) = (stream.clone(), topic.to_owned(), payload.clone());
        tasks.push(tokio::spawn(async move {
            while stream.may_publish(support::IN_FLIGHT).await {
                let target = (exchange, topic.as_str());
                if pipelined {
                    publish_pipelined(&channel, target, &payload, support::IN_FLIGHT).await;
                } else {
                    publish_on(&channel, target, &payload, support::IN_FLIGHT).await;
                }
                if count {
                    stream.done(support::IN_FLIGHT as u64);
                }
            }
        }));
    }
    tasks
}

/// ruststream's lapin adapter set up as polybus is: it declares the durable
/// quorum queue it subscribes to, with the same prefetch.
async fn ruststream_on() -> ConnectedLapinBroker {
    LapinBroker::new(url())
        .prefetch(NonZeroU16::new(PREFETCH).expect("non-zero prefetch"))
        .declare_topology(true)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot reach RabbitMQ: {e}; {HINT}"))
}

/// ruststream's stream on a fresh quorum queue: [`support::PRODUCERS`]
/// confirming publishers (each opens a confirm channel of its own), each
/// awaiting the confirms of [`support::IN_FLIGHT`] persistent publishes to the
/// default exchange together, and (end to end) a subscriber acking each
/// delivery. Publish only subscribes just to declare the queue, then drops the
/// subscription, as polybus does. Its queue is recorded in `queues`.
async fn ruststream_stream(
    connected: &ConnectedLapinBroker,
    stream: support::Stream,
    count: bool,
    queues: &std::sync::Mutex<Vec<String>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let queue = support::name("susrs");
    queues.lock().unwrap().push(queue.clone());
    let sub = connected
        .subscribe(RabbitQuorumQueue::new(queue.as_str()))
        .await
        .expect("ruststream subscribe");
    let mut tasks = Vec::new();
    if count {
        drop(sub);
    } else {
        tasks.push(support::ruststream_consumer(sub, &stream));
    }
    let payload = vec![7u8; support::SUSTAINED_SIZE];
    for _ in 0..support::PRODUCERS {
        let publisher = connected.publisher(LapinPublish::default().confirms());
        let (stream, queue, payload) = (stream.clone(), queue.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            while stream.may_publish(support::IN_FLIGHT).await {
                let sends = (0..support::IN_FLIGHT).map(|_| {
                    publisher.publish(OutgoingMessage::new(queue.as_str(), &payload), None)
                });
                for r in futures::future::join_all(sends).await {
                    r.expect("ruststream publish");
                }
                if count {
                    stream.done(support::IN_FLIGHT as u64);
                }
            }
        }));
    }
    tasks
}

/// omniqueue's settings for `queue`: persistent messages to the default
/// exchange, routed to `queue`, consumed with the same prefetch. It brings
/// lapin 2, here on tokio, and never selects confirms on its channel.
fn omniqueue_config(queue: &str) -> oq::RabbitMqConfig {
    oq::RabbitMqConfig {
        uri: url(),
        connection_properties: oq::ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio),
        publish_exchange: String::new(),
        publish_routing_key: queue.to_owned(),
        publish_options: oq::BasicPublishOptions::default(),
        publish_properties: oq::BasicProperties::default().with_delivery_mode(2),
        consume_queue: queue.to_owned(),
        consumer_tag: String::new(),
        consume_options: oq::BasicConsumeOptions::default(),
        consume_arguments: oq::FieldTable::default(),
        consume_prefetch_count: Some(PREFETCH),
        requeue_on_nack: false,
    }
}

/// omniqueue's stream on a fresh quorum queue, declared here since omniqueue
/// declares nothing: [`support::PRODUCERS`] producers, each awaiting
/// [`support::IN_FLIGHT`] sends together (a send waits only for lapin writing
/// the frame: omniqueue cannot ask for a confirm), and (end to end) a consumer
/// acking each delivery. Each build dials a connection of its own, and only
/// `build_pair` shares one, so the consumer shares the first producer's; a
/// producer has one channel and cannot be cloned, so each task has its own.
async fn omniqueue_stream(
    raw: &Raw,
    stream: support::Stream,
    count: bool,
    queues: &std::sync::Mutex<Vec<String>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let queue = support::name("susoq");
    declare_quorum(&raw.consume, &queue).await;
    queues.lock().unwrap().push(queue.clone());
    let builder = || oq::RabbitMqBackend::builder(omniqueue_config(&queue));
    let (mut tasks, mut producers) = (Vec::new(), Vec::new());
    if !count {
        let (producer, mut consumer) = builder().build_pair().await.expect("omniqueue pair");
        producers.push(producer);
        let stream = stream.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(d) = consumer.receive().await {
                std::hint::black_box(d.borrow_payload());
                d.ack().await.map_err(|(e, _)| e).expect("omniqueue ack");
                stream.done(1);
            }
        }));
    }
    while producers.len() < support::PRODUCERS {
        producers.push(
            builder()
                .build_producer()
                .await
                .expect("omniqueue producer"),
        );
    }
    let payload = vec![7u8; support::SUSTAINED_SIZE];
    for producer in producers {
        let (stream, payload) = (stream.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            while stream.may_publish(support::IN_FLIGHT).await {
                let sends = (0..support::IN_FLIGHT).map(|_| producer.send_raw(&payload));
                for r in futures::future::join_all(sends).await {
                    r.expect("omniqueue send");
                }
                if count {
                    stream.done(support::IN_FLIGHT as u64);
                }
            }
        }));
    }
    tasks
}

/// Producers and a consumer group running continuously: polybus (acks
/// coalesced, its default), raw lapin acking each delivery, raw lapin acking
/// with `multiple` every [`RAW_MULTI_ACK`], then the peers ruststream and
/// omniqueue acking each; then each publisher alone.
fn sustained(rt: &tokio::runtime::Runtime) {
    let bus = rt.block_on(bus());
    let raw = rt.block_on(raw());
    let connected = rt.block_on(ruststream_on());
    let queues = std::sync::Mutex::new(Vec::new());
    let polybus = |count: bool| -> support::Start<'_> {
        let (bus, queues) = (&bus, &queues);
        Box::new(move |stream| {
            Box::pin(async move {
                let topic = support::name("sus");
                let group = format!("g{}", polybus_core::testkit::unique_name());
                queues.lock().unwrap().push(group.clone());
                let sub = bus
                    .subscribe(
                        polybus_core::Subscription::new(topic.as_str())
                            .group(group)
                            .prefetch(PREFETCH.into()),
                    )
                    .await
                    .expect("subscribe");
                let mut tasks = support::polybus_producers(bus, &topic, &stream, count);
                if count {
                    drop(sub);
                } else {
                    tasks.push(support::polybus_consumer(sub, &stream));
                }
                tasks
            })
        })
    };
    let (raw, queues_ref) = (&raw, &queues);
    let raw_e2e = |multi: u64| -> support::Start<'_> {
        Box::new(move |stream| Box::pin(raw_stream(raw, stream, multi, queues_ref)))
    };
    let connected = &connected;
    let ruststream_peer = |count: bool| -> support::Start<'_> {
        Box::new(move |stream| Box::pin(ruststream_stream(connected, stream, count, queues_ref)))
    };
    let omniqueue_peer = |count: bool| -> support::Start<'_> {
        Box::new(move |stream| Box::pin(omniqueue_stream(raw, stream, count, queues_ref)))
    };
    let mut rows = rt.block_on(support::sustained(
        "amqp",
        "end_to_end",
        true,
        &[
            ("polybus", polybus(false)),
            ("raw", raw_e2e(1)),
            ("raw-multi-ack", raw_e2e(RAW_MULTI_ACK)),
            ("ruststream", ruststream_peer(false)),
            ("omniqueue", omniqueue_peer(false)),
        ],
    ));
    // Publish only: the same producers, bound to a group queue nobody consumes.
    // Raw lapin also publishes pipelined (every publish of a batch awaited
    // together) and straight to the queue through the default exchange, as
    // ruststream does: what pipelining and the topic exchange's routing cost.
    let raw_publish = |direct: bool, pipelined: bool| -> support::Start<'_> {
        Box::new(move |stream| {
            Box::pin(async move {
                let topic = support::name("suspubraw");
                let queue = raw.declare(&raw.consume, &topic).await;
                queues_ref.lock().unwrap().push(queue.clone());
                let target = if direct {
                    ("", queue.as_str())
                } else {
                    (RAW_EXCHANGE, topic.as_str())
                };
                raw_producers(raw, target, &stream, true, pipelined).await
            })
        })
    };
    rows.extend(rt.block_on(support::sustained(
        "amqp",
        "publish",
        false,
        &[
            ("polybus", polybus(true)),
            ("raw", raw_publish(false, false)),
            ("raw-pipelined", raw_publish(false, true)),
            ("raw-default-exchange", raw_publish(true, false)),
            ("raw-pipelined-default-exchange", raw_publish(true, true)),
            ("ruststream", ruststream_peer(true)),
            ("omniqueue", omniqueue_peer(true)),
        ],
    )));
    support::write_sustained("amqp", rows);
    delete_queues(rt, raw, &queues);
}

fn latency_and_allocations(rt: &tokio::runtime::Runtime) {
    let bus = rt.block_on(bus());
    let raw = std::sync::Arc::new(rt.block_on(raw()));
    let mut latency = Vec::new();
    for rate in support::RATES {
        let n = support::latency_count(rate);
        let lat = rt.block_on(support::polybus_latency(
            &bus,
            &support::name("lat"),
            PREFETCH.into(),
            rate,
            n,
        ));
        latency.push(lat.row("amqp", "polybus", rate));

        let lat = Latencies::default();
        rt.block_on(async {
            let topic = support::name("latraw");
            let mut consumer = raw.queue(&topic).await;
            let l = lat.clone();
            let task = tokio::spawn(async move {
                while let Some(Ok(d)) = consumer.next().await {
                    l.record(&d.data);
                    d.ack(BasicAckOptions::default()).await.unwrap();
                }
            });
            support::at_rate(rate, n, &lat, |p| {
                let (raw, topic) = (raw.clone(), topic.clone());
                async move {
                    raw.publish_all(&topic, &p, 1).await;
                }
            })
            .await;
            task.abort();
        });
        latency.push(lat.row("amqp", "raw", rate));
    }

    let n: u64 = if support::quick() { 200 } else { 2_000 };
    let payload = Bytes::from_static(&[7u8; 16]);
    let topic = support::name("alloc");
    let mut sub = rt.block_on(support::own_group(&bus, &topic, PREFETCH.into()));
    let polybus_allocs = support::allocations_per_message(ALLOC, n, || {
        rt.block_on(async {
            support::polybus_round(&bus, &topic, &mut sub, &payload, n as usize).await;
        })
    });
    let raw_topic = support::name("allocraw");
    let mut consumer = rt.block_on(raw.queue(&raw_topic));
    let raw_allocs = support::allocations_per_message(ALLOC, n, || {
        rt.block_on(async {
            tokio::join!(
                raw.publish_all(&raw_topic, &payload, n as usize),
                raw_consume(&mut consumer, n as usize)
            );
        })
    });
    support::write_results(
        "amqp",
        latency,
        support::alloc_rows("amqp", polybus_allocs, raw_allocs),
    );
}

fn main() {
    if support::skipped("amqp") {
        return;
    }
    let rt = support::runtime();
    let mut c = Criterion::default().configure_from_args();
    throughput(&mut c, &rt);
    c.final_summary();
    if support::extras() {
        latency_and_allocations(&rt);
    }
    if support::sustained_wanted() {
        sustained(&rt);
    }
}
