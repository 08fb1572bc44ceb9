//! The in-memory backend beside a bounded tokio mpsc hand-off of the same
//! payloads, in the same run: the ratio is the figure that matters. Then
//! publish-to-delivery latency at fixed rates beside the same baseline.
//! Allocations are counted in `memory_allocations`, apart: the counting
//! allocator's shared counters would slow this bench's hot path.
//!
//! `cargo bench --bench memory` (`scripts/bench` runs every bench and writes
//! BENCHMARKS.md); with `--features otel` (and `POLYBUS_BENCH_OTEL_SDK=1`) the
//! throughput rows are those of a telemetry variant (`support/otel.rs`).

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::Criterion;
use futures::StreamExt;
use polybus::Message;

#[path = "support/otel.rs"]
mod otel;
#[path = "support/mod.rs"]
mod support;

use support::{Latencies, SIZES, Timed};

/// Messages per measured iteration.
const BATCH: usize = 1_000;
/// The prefetch of the subscription, and the capacity of the mpsc baseline.
const PREFETCH: u32 = 256;

/// One kind's implementations at one size.
type Impls = for<'a> fn(&'a tokio::runtime::Runtime, usize) -> Vec<(&'static str, Timed<'a>)>;

/// End to end and publish only at every size, polybus beside the mpsc, as
/// criterion's groups and as interleaved rounds (`support::throughput`).
fn throughput(c: &mut Criterion) {
    let rt = support::runtime();
    let mut rows = Vec::new();
    for (kind, impls) in [
        ("end_to_end", end_to_end as Impls),
        ("publish", publish_only),
    ] {
        let group_name = format!("memory/{kind}");
        if !support::wants(&group_name) {
            continue;
        }
        let mut group = c.benchmark_group(group_name);
        group.measurement_time(Duration::from_secs(5));
        for size in SIZES {
            let impls = impls(&rt, size);
            rows.extend(support::throughput(
                &mut group,
                (otel::label(), kind),
                size,
                BATCH,
                impls,
            ));
        }
        group.finish();
    }
    support::write_throughput(otel::label(), rows);
}

/// polybus: publish -> deliver -> ack, a producer task beside the consumer;
/// the baseline: a bounded mpsc of `Bytes`, the least a hand-off can do.
fn end_to_end(rt: &tokio::runtime::Runtime, size: usize) -> Vec<(&'static str, Timed<'_>)> {
    let payload = Bytes::from(vec![7u8; size]);
    let bus = rt.block_on(async { polybus::connect("memory://").await.expect("memory bus") });
    let mut sub = rt.block_on(support::own_group(&bus, "bench.e2e", PREFETCH));
    let p = payload.clone();
    let polybus: Timed<'_> = Box::new(move |iters| {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..iters {
                let (bus, payload) = (bus.clone(), p.clone());
                let producer = tokio::spawn(async move {
                    for _ in 0..BATCH {
                        bus.publish("bench.e2e", Message::new(payload.clone()))
                            .await
                            .expect("publish");
                    }
                });
                for _ in 0..BATCH {
                    let d = sub.next().await.expect("open").expect("delivery");
                    d.ack().await.expect("ack");
                }
                producer.await.expect("producer");
            }
            start.elapsed()
        })
    });
    let raw: Timed<'_> = Box::new(move |iters| {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..iters {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(PREFETCH as usize);
                let payload = payload.clone();
                let producer = tokio::spawn(async move {
                    for _ in 0..BATCH {
                        tx.send(payload.clone()).await.expect("send");
                    }
                });
                for _ in 0..BATCH {
                    std::hint::black_box(rx.recv().await.expect("recv"));
                }
                producer.await.expect("producer");
            }
            start.elapsed()
        })
    });
    vec![("polybus", polybus), ("raw", raw)]
}

/// Publishes alone into a bound group, drained between iterations unmeasured,
/// so publishing does real routing; the baseline sends into an mpsc with room
/// for the whole batch.
fn publish_only(rt: &tokio::runtime::Runtime, size: usize) -> Vec<(&'static str, Timed<'_>)> {
    let payload = Bytes::from(vec![7u8; size]);
    let bus = rt.block_on(async { polybus::connect("memory://").await.expect("memory bus") });
    let mut sub = rt.block_on(support::own_group(&bus, "bench.pub", 65_535));
    let p = payload.clone();
    let polybus: Timed<'_> = Box::new(move |iters| {
        rt.block_on(async {
            let mut measured = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                for _ in 0..BATCH {
                    bus.publish("bench.pub", Message::new(p.clone()))
                        .await
                        .expect("publish");
                }
                measured += start.elapsed();
                for _ in 0..BATCH {
                    let d = sub.next().await.expect("open").expect("delivery");
                    d.ack().await.expect("ack");
                }
            }
            measured
        })
    });
    let raw: Timed<'_> = Box::new(move |iters| {
        rt.block_on(async {
            let mut measured = Duration::ZERO;
            for _ in 0..iters {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(BATCH);
                let start = Instant::now();
                for _ in 0..BATCH {
                    tx.send(payload.clone()).await.expect("send");
                }
                measured += start.elapsed();
                while let Ok(p) = rx.try_recv() {
                    std::hint::black_box(p);
                }
            }
            measured
        })
    });
    vec![("polybus", polybus), ("raw", raw)]
}

/// Publish-to-delivery latency at fixed rates.
fn latency() {
    let rt = support::runtime();
    let mut latency = Vec::new();
    for rate in support::RATES {
        let n = support::latency_count(rate);
        let lat = rt.block_on(async {
            let bus = polybus::connect("memory://").await.unwrap();
            support::polybus_latency(&bus, "bench.lat", PREFETCH, rate, n).await
        });
        latency.push(lat.row("memory", "polybus", rate));

        let lat = Latencies::default();
        rt.block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(PREFETCH as usize);
            let l = lat.clone();
            let consumer = tokio::spawn(async move {
                while let Some(p) = rx.recv().await {
                    l.record(&p);
                }
            });
            support::at_rate(rate, n, &lat, |p| {
                let tx = tx.clone();
                async move {
                    tx.send(p).await.unwrap();
                }
            })
            .await;
            consumer.abort();
        });
        latency.push(lat.row("memory", "raw", rate));

        // The peers of benches/peers.rs, measured the same way: each delivery
        // acked as it is recorded.
        let lat = Latencies::default();
        rt.block_on(async {
            use ruststream::{Broker, IncomingMessage, OutgoingMessage, Publisher, Subscribe};
            let connected = ruststream::memory::MemoryBroker::new()
                .connect()
                .await
                .expect("ruststream connect");
            let mut sub = Subscribe::subscribe(&connected, "bench.lat")
                .await
                .expect("ruststream subscribe");
            let l = lat.clone();
            let consumer = tokio::spawn(async move {
                use ruststream::Subscriber;
                let mut stream = std::pin::pin!(sub.stream());
                while let Some(Ok(m)) = stream.next().await {
                    l.record(m.payload());
                    m.ack().await.expect("ruststream ack");
                }
            });
            support::at_rate(rate, n, &lat, |p| {
                let connected = connected.clone();
                async move {
                    connected
                        .publisher()
                        .publish(OutgoingMessage::new("bench.lat", &p), None)
                        .await
                        .expect("ruststream publish");
                }
            })
            .await;
            consumer.abort();
        });
        latency.push(lat.row("memory", "ruststream", rate));

        let lat = Latencies::default();
        rt.block_on(async {
            let (producer, mut consumer) = omniqueue::backends::InMemoryBackend::builder()
                .build_pair()
                .await
                .expect("omniqueue queue");
            let producer = std::sync::Arc::new(producer);
            let l = lat.clone();
            let consumer = tokio::spawn(async move {
                while let Ok(d) = consumer.receive().await {
                    l.record(d.borrow_payload().unwrap_or_default());
                    if let Err((e, _)) = d.ack().await {
                        panic!("omniqueue ack: {e}");
                    }
                }
            });
            support::at_rate(rate, n, &lat, |p| {
                let producer = producer.clone();
                async move {
                    producer.send_raw(&p).await.expect("omniqueue send");
                }
            })
            .await;
            consumer.abort();
        });
        latency.push(lat.row("memory", "omniqueue", rate));
    }

    support::write_results("memory", latency, Vec::new());
}

fn main() {
    otel::install();
    let mut c = Criterion::default().configure_from_args();
    throughput(&mut c);
    c.final_summary();
    // Latency is measured without telemetry only: its rows would replace them.
    if support::extras() && otel::label() == "memory" {
        latency();
    }
}
