//! Allocations per message of the in-memory backend beside a bounded tokio mpsc
//! hand-off of the same payloads, counted by a counting global allocator. Apart
//! from the `memory` bench, whose throughput the counters would slow.
//!
//! `cargo bench --bench memory_allocations`; with `--features otel` (and
//! `POLYBUS_BENCH_OTEL_SDK=1`), a telemetry variant's (`support/otel.rs`).

use std::alloc::System;

use bytes::Bytes;
use futures::StreamExt;
use polybus::Message;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

#[path = "support/otel.rs"]
mod otel;
#[path = "support/mod.rs"]
mod support;

#[global_allocator]
static ALLOC: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const PREFETCH: u32 = 256;

fn main() {
    otel::install();
    let rt = support::runtime();
    let n: u64 = if support::quick() { 1_000 } else { 20_000 };
    let payload = Bytes::from_static(&[7u8; 16]);
    let (bus, mut sub) = rt.block_on(async {
        let bus = polybus::connect("memory://").await.unwrap();
        let sub = support::own_group(&bus, "bench.alloc", PREFETCH).await;
        (bus, sub)
    });
    let polybus_allocs = support::allocations_per_message(ALLOC, n, || {
        rt.block_on(async {
            let b = bus.clone();
            let p = payload.clone();
            let producer = tokio::spawn(async move {
                for _ in 0..n {
                    b.publish("bench.alloc", Message::new(p.clone()))
                        .await
                        .unwrap();
                }
            });
            for _ in 0..n {
                sub.next().await.unwrap().unwrap().ack().await.unwrap();
            }
            producer.await.unwrap();
        })
    });
    let raw_allocs = support::allocations_per_message(ALLOC, n, || {
        rt.block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(PREFETCH as usize);
            let p = payload.clone();
            let producer = tokio::spawn(async move {
                for _ in 0..n {
                    tx.send(p.clone()).await.unwrap();
                }
            });
            for _ in 0..n {
                std::hint::black_box(rx.recv().await.unwrap());
            }
            producer.await.unwrap();
        })
    });
    // The peers of benches/peers.rs, the same workload: their own subscriber
    // and ack, each delivery acked.
    let ruststream_allocs = support::allocations_per_message(ALLOC, n, || {
        rt.block_on(async {
            use ruststream::Subscriber;
            use ruststream::{Broker, IncomingMessage, OutgoingMessage, Publisher, Subscribe};
            let connected = ruststream::memory::MemoryBroker::new()
                .connect()
                .await
                .unwrap();
            let mut sub = Subscribe::subscribe(&connected, "bench.alloc")
                .await
                .unwrap();
            let publisher = connected.publisher();
            let p = payload.clone();
            let producer = tokio::spawn(async move {
                for _ in 0..n {
                    publisher
                        .publish(OutgoingMessage::new("bench.alloc", &p), None)
                        .await
                        .unwrap();
                }
            });
            let mut stream = std::pin::pin!(sub.stream());
            for _ in 0..n {
                stream.next().await.unwrap().unwrap().ack().await.unwrap();
            }
            producer.await.unwrap();
        })
    });
    let omniqueue_allocs = support::allocations_per_message(ALLOC, n, || {
        rt.block_on(async {
            let (producer, mut consumer) = omniqueue::backends::InMemoryBackend::builder()
                .build_pair()
                .await
                .unwrap();
            let p = payload.clone();
            let producer = tokio::spawn(async move {
                for _ in 0..n {
                    producer.send_raw(&p).await.unwrap();
                }
            });
            for _ in 0..n {
                if consumer.receive().await.unwrap().ack().await.is_err() {
                    panic!("omniqueue ack failed");
                }
            }
            producer.await.unwrap();
        })
    });
    let label = otel::label();
    let mut rows = support::alloc_rows(label, polybus_allocs, raw_allocs);
    if label != "memory" {
        // A telemetry variant: polybus and the mpsc only.
        support::write_allocations(label, rows);
        return;
    }
    for (imp, per_message) in [
        ("ruststream", ruststream_allocs),
        ("omniqueue", omniqueue_allocs),
    ] {
        rows.push(serde_json::json!({
            "backend": "memory", "impl": imp, "allocations_per_message": per_message,
        }));
    }
    support::write_allocations("memory", rows);
}
