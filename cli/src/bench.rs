//! `polybus bench`: a load generator in the manner of RabbitMQ's PerfTest:
//! producers publish (confirmed) at a rate or as fast as they can, a consumer
//! group acks, a line a second says the rates, and a summary gives throughput
//! and publish-to-delivery latency percentiles.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use polybus::{Bus, Error, Message, Subscription};

use crate::io::Out;

#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// The topic to load (default: a new one, bench.ID)
    #[arg(long)]
    topic: Option<String>,
    /// Producer tasks
    #[arg(long, short = 'x', default_value_t = 1)]
    producers: usize,
    /// Consumers, members of one group
    #[arg(long, short = 'y', default_value_t = 1)]
    consumers: usize,
    /// Payload size in bytes (at least 8: the send time rides in the payload)
    #[arg(long, short = 's', default_value_t = 16)]
    size: usize,
    /// Messages a second, all producers together (0: as fast as they can)
    #[arg(long, short = 'r', default_value_t = 0)]
    rate: u64,
    /// How long producers publish, in seconds
    #[arg(long, short = 'z', default_value_t = 10.0)]
    duration: f64,
    /// Each consumer's prefetch
    #[arg(long, short = 'q', default_value_t = 100)]
    prefetch: u32,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    failed: AtomicU64,
    received: AtomicU64,
}

pub(crate) async fn run(bus: &Bus, args: BenchArgs, out: &Out) -> polybus::Result<ExitCode> {
    if args.size < 8
        || args.producers == 0
        || args.consumers == 0
        || !args.duration.is_finite()
        || args.duration <= 0.0
    {
        return Err(Error::invalid_input(
            "bench needs --size of at least 8, one producer and one consumer or more, and a positive --duration",
        ));
    }
    // A message id is a UUIDv7: unique, and the tool needs no generator of its own.
    let stamp = Message::new("").id().replace('-', "");
    let topic = args
        .topic
        .clone()
        .unwrap_or_else(|| format!("bench.{stamp}"));
    let group = format!("bench-{stamp}");
    let epoch = Instant::now();
    let counters = Arc::new(Counters::default());
    let latency = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
    ));
    let mut consumers = Vec::with_capacity(args.consumers);
    for _ in 0..args.consumers {
        let sub = Subscription::new(topic.clone())
            .group(group.clone())
            .prefetch(args.prefetch);
        let mut stream = bus.subscribe(sub).await?;
        let (counters, latency) = (counters.clone(), latency.clone());
        consumers.push(tokio::spawn(async move {
            while let Some(Ok(d)) = stream.next().await {
                let sent =
                    u64::from_be_bytes(d.message().payload()[..8].try_into().unwrap_or([0; 8]));
                let now = epoch.elapsed().as_micros() as u64;
                let _ = latency
                    .lock()
                    .map(|mut h| h.record(now.saturating_sub(sent).max(1)));
                if d.ack().await.is_ok() {
                    counters.received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::with_capacity(args.producers);
    for _ in 0..args.producers {
        let (bus, topic, counters, stop) =
            (bus.clone(), topic.clone(), counters.clone(), stop.clone());
        let (size, rate, n) = (args.size, args.rate, args.producers as u64);
        producers.push(tokio::spawn(async move {
            let mut pace = (rate > 0).then(|| {
                let mut t = tokio::time::interval(Duration::from_secs_f64(n as f64 / rate as f64));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            while !stop.load(Ordering::Relaxed) {
                if let Some(t) = &mut pace {
                    t.tick().await;
                }
                let mut payload = vec![0u8; size];
                payload[..8].copy_from_slice(&(epoch.elapsed().as_micros() as u64).to_be_bytes());
                match bus.publish(&topic, Message::new(payload)).await {
                    Ok(_) => counters.sent.fetch_add(1, Ordering::Relaxed),
                    Err(_) => counters.failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    if !out.json {
        eprintln!(
            "bench: {} producer(s), {} consumer(s), {} B, {} on `{topic}` for {} s",
            args.producers,
            args.consumers,
            args.size,
            if args.rate == 0 {
                "unlimited rate".to_owned()
            } else {
                format!("{} msg/s", args.rate)
            },
            args.duration
        );
    }
    let started = Instant::now();
    let window = Duration::from_secs_f64(args.duration);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let (mut last_sent, mut last_received) = (0, 0);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    while started.elapsed() < window {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => break,
        }
        let (sent, received) = (
            counters.sent.load(Ordering::Relaxed),
            counters.received.load(Ordering::Relaxed),
        );
        if !out.json {
            eprintln!(
                "time {:>4.0} s, sent {:>8} msg/s, received {:>8} msg/s",
                started.elapsed().as_secs_f64(),
                sent - last_sent,
                received - last_received
            );
        }
        (last_sent, last_received) = (sent, received);
    }
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        let _ = p.await;
    }
    let published_for = started.elapsed();
    // The consumers catch up, within a bound.
    let sent = counters.sent.load(Ordering::Relaxed);
    let drain = Instant::now();
    while counters.received.load(Ordering::Relaxed) < sent
        && drain.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received_for = started.elapsed();
    for c in consumers {
        c.abort();
    }
    summarize(&counters, &latency, published_for, received_for, out);
    Ok(ExitCode::SUCCESS)
}

fn summarize(
    counters: &Counters,
    latency: &Mutex<Histogram<u64>>,
    published_for: Duration,
    received_for: Duration,
    out: &Out,
) {
    let (sent, failed, received) = (
        counters.sent.load(Ordering::Relaxed),
        counters.failed.load(Ordering::Relaxed),
        counters.received.load(Ordering::Relaxed),
    );
    let h = latency
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|e| e.into_inner().clone());
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let send_rate = sent as f64 / published_for.as_secs_f64();
    let receive_rate = received as f64 / received_for.as_secs_f64();
    if out.json {
        out.line(&serde_json::json!({
            "sent": sent,
            "failed": failed,
            "received": received,
            "send_rate": send_rate.round(),
            "receive_rate": receive_rate.round(),
            "latency_ms": { "p50": ms(0.5), "p95": ms(0.95), "p99": ms(0.99), "max": h.max() as f64 / 1000.0 },
        }));
        return;
    }
    println!("sent {sent} ({failed} failed), received {received}");
    println!("throughput: sent {send_rate:.0} msg/s, received {receive_rate:.0} msg/s");
    println!(
        "latency (publish to delivery): p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(0.5),
        ms(0.95),
        ms(0.99),
        h.max() as f64 / 1000.0
    );
}
