//! The in-memory backend beside a bounded tokio mpsc hand-off of the same
//! payloads, in the same run: the ratio is the figure that matters.
//!
//! `cargo bench --bench memory`

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use polybus::{Message, Subscription};

/// Messages per measured iteration.
const BATCH: usize = 1_000;
/// The prefetch of the subscription, and the capacity of the mpsc baseline.
const PREFETCH: u32 = 256;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn end_to_end(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("memory/end_to_end");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.measurement_time(Duration::from_secs(5));
    for size in [16usize, 256, 1024, 64 * 1024] {
        let payload = Bytes::from(vec![7u8; size]);

        // polybus: publish -> deliver -> ack, a producer task beside the consumer.
        let bus = rt.block_on(async { polybus::connect("memory://").await.expect("memory bus") });
        let mut sub = rt.block_on(async {
            bus.subscribe(
                Subscription::new("bench.e2e")
                    .group("bench")
                    .prefetch(PREFETCH),
            )
            .await
            .expect("subscribe")
        });
        group.bench_function(BenchmarkId::new("polybus", format!("{size}B")), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let bus = bus.clone();
                        let payload = payload.clone();
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
            })
        });

        // Baseline: a bounded mpsc of Bytes, the least a hand-off can do.
        group.bench_function(BenchmarkId::new("tokio_mpsc", format!("{size}B")), |b| {
            b.to_async(&rt).iter(|| {
                let payload = payload.clone();
                async move {
                    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(PREFETCH as usize);
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
            })
        });
    }
    group.finish();
}

fn publish_only(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("memory/publish");
    group.throughput(Throughput::Elements(BATCH as u64));
    let payload = Bytes::from_static(&[7u8; 16]);
    let bus = rt.block_on(async { polybus::connect("memory://").await.expect("memory bus") });
    // A bound group, drained between iterations, so publishing does real routing.
    let mut sub = rt.block_on(async {
        bus.subscribe(
            Subscription::new("bench.pub")
                .group("sink")
                .prefetch(65_535),
        )
        .await
        .expect("subscribe")
    });
    group.bench_function(BenchmarkId::new("polybus", "16B"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut measured = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    for _ in 0..BATCH {
                        bus.publish("bench.pub", Message::new(payload.clone()))
                            .await
                            .expect("publish");
                    }
                    measured += start.elapsed();
                    // Draining is not measured.
                    for _ in 0..BATCH {
                        let d = sub.next().await.expect("open").expect("delivery");
                        d.ack().await.expect("ack");
                    }
                }
                measured
            })
        })
    });
    group.finish();
}

criterion_group!(benches, end_to_end, publish_only);
criterion_main!(benches);
