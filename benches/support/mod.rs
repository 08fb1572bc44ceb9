//! What every bench shares: payload sizes, the runtime, latency at a fixed rate
//! (HDR histogram), allocations per message (a counting allocator), and the
//! results file `scripts/benchmarks.py` turns into BENCHMARKS.md.
//!
//! Included by path (`#[path = ...] mod support;`) from each bench binary, which
//! also installs the counting allocator:
//! `#[global_allocator] static ALLOC: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;`
#![allow(dead_code)] // each bench uses its own part

use std::alloc::System;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use stats_alloc::{Region, StatsAlloc};

/// The payload sizes every throughput bench runs at.
pub const SIZES: [usize; 4] = [16, 256, 1024, 64 * 1024];

/// Fixed rates for the latency runs, messages per second, below saturation.
pub const RATES: [u64; 2] = [1_000, 10_000];
/// tansu carries about a thousand messages a second end to end on these
/// machines (see the end-to-end rows), so Kafka's latency is read below that.
pub const KAFKA_RATES: [u64; 2] = [100, 500];

/// Whether criterion runs in its quick `--test` mode (CI): then latency and
/// allocation runs are short and write no results.
pub fn quick() -> bool {
    std::env::args().any(|a| a == "--test")
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Criterion's settings for broker benches: few, long samples.
pub fn broker_group<'a>(
    c: &'a mut criterion::Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    g
}

/// Messages per measured iteration of a broker bench, fewer for large payloads.
pub fn batch_for(size: usize) -> usize {
    if size >= 64 * 1024 { 200 } else { 1_000 }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// A 16-byte payload carrying the time it was made.
pub fn stamped() -> Bytes {
    let nanos = epoch().elapsed().as_nanos() as u64;
    let mut p = nanos.to_le_bytes().to_vec();
    p.resize(16, 0);
    Bytes::from(p)
}

/// How long ago `payload` (from [`stamped`]) was made.
pub fn age(payload: &[u8]) -> Duration {
    let mut b = [0u8; 8];
    b.copy_from_slice(&payload[..8]);
    let sent = Duration::from_nanos(u64::from_le_bytes(b));
    epoch().elapsed().saturating_sub(sent)
}

/// A histogram of publish-to-delivery times, in microseconds, shared with the
/// consumer side.
#[derive(Clone)]
pub struct Latencies(Arc<Mutex<Histogram<u64>>>);

impl Default for Latencies {
    fn default() -> Self {
        Latencies(Arc::new(Mutex::new(
            Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
        )))
    }
}

impl Latencies {
    pub fn record(&self, payload: &[u8]) {
        let us = age(payload).as_micros().max(1) as u64;
        let _ = self.0.lock().unwrap().record(us.min(60_000_000));
    }

    pub fn count(&self) -> u64 {
        self.0.lock().unwrap().len()
    }

    pub fn row(&self, backend: &str, imp: &str, rate: u64) -> serde_json::Value {
        let h = self.0.lock().unwrap();
        serde_json::json!({
            "backend": backend, "impl": imp, "rate": rate, "n": h.len(),
            "p50_us": h.value_at_quantile(0.50),
            "p99_us": h.value_at_quantile(0.99),
            "p999_us": h.value_at_quantile(0.999),
        })
    }
}

/// Publish `n` messages at `rate` per second, each stamped, each publish spawned
/// so a slow confirm never lowers the rate; wait until `latencies` has them all.
pub async fn at_rate<F, Fut>(rate: u64, n: u64, latencies: &Latencies, publish: F)
where
    F: Fn(Bytes) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let start = tokio::time::Instant::now();
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    for i in 0..n {
        tokio::time::sleep_until(start + interval * i as u32).await;
        tokio::spawn(publish(stamped()));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while latencies.count() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        latencies.count(),
        n,
        "not every message arrived within 60 s"
    );
}

/// Whether to run the latency and allocation part after criterion's
/// (`POLYBUS_BENCH_EXTRAS=0` leaves it out, for a run of one criterion group).
pub fn extras() -> bool {
    std::env::var("POLYBUS_BENCH_EXTRAS").map_or(true, |v| v != "0")
}

/// A topic name no earlier run has used.
pub fn name(prefix: &str) -> String {
    format!("bench.{prefix}.{}", polybus_core::testkit::unique_name())
}

/// Whether `POLYBUS_SKIP_<BACKEND>` opts this broker bench out; says so if it does.
pub fn skipped(backend: &str) -> bool {
    let var = format!("POLYBUS_SKIP_{}", backend.to_uppercase());
    let skip = std::env::var_os(&var).is_some();
    if skip {
        eprintln!("SKIPPED: the {backend} bench ({var} is set)");
    }
    skip
}

/// A subscription to `topic` in a group of its own, so a bench reads exactly
/// what it publishes.
pub async fn own_group(
    bus: &polybus_core::Bus,
    topic: &str,
    prefetch: u32,
) -> polybus_core::DeliveryStream {
    bus.subscribe(
        polybus_core::Subscription::new(topic)
            .group(format!("g{}", polybus_core::testkit::unique_name()))
            .prefetch(prefetch),
    )
    .await
    .expect("subscribe")
}

/// Publish `n` messages of `payload` to `topic` as one pipelined batch; every
/// publish must succeed.
pub async fn publish_batch(bus: &polybus_core::Bus, topic: &str, payload: &Bytes, n: usize) {
    let batch: Vec<polybus_core::Message> = (0..n)
        .map(|_| polybus_core::Message::new(payload.clone()))
        .collect();
    for r in bus.publish_batch(topic, batch).await {
        r.expect("publish");
    }
}

/// polybus's side of a latency run: a group subscription on `topic` records
/// each delivery's age and acks it while `n` stamped messages are published at
/// `rate`.
pub async fn polybus_latency(
    bus: &polybus_core::Bus,
    topic: &str,
    prefetch: u32,
    rate: u64,
    n: u64,
) -> Latencies {
    use futures::StreamExt;
    let lat = Latencies::default();
    let mut sub = own_group(bus, topic, prefetch).await;
    let l = lat.clone();
    let consumer = tokio::spawn(async move {
        while let Some(Ok(d)) = sub.next().await {
            l.record(d.message().payload());
            d.ack().await.expect("ack");
        }
    });
    at_rate(rate, n, &lat, |p| {
        let (bus, topic) = (bus.clone(), topic.to_owned());
        async move {
            bus.publish(&topic, polybus_core::Message::new(p))
                .await
                .expect("publish");
        }
    })
    .await;
    consumer.abort();
    lat
}

/// Publish `n` messages of `payload` to `topic` as one pipelined batch while
/// receiving and acking `n` from `sub`: one end-to-end round of polybus.
pub async fn polybus_round(
    bus: &polybus_core::Bus,
    topic: &str,
    sub: &mut polybus_core::DeliveryStream,
    payload: &Bytes,
    n: usize,
) {
    use futures::StreamExt;
    tokio::join!(publish_batch(bus, topic, payload, n), async {
        for _ in 0..n {
            let d = sub.next().await.expect("open").expect("delivery");
            d.ack().await.expect("ack");
        }
    });
}

/// polybus end to end at one size as a [`Timed`]: a group subscription of its
/// own (with `prefetch`) to a fresh topic made by `topic`; each iteration is
/// one [`polybus_round`] of `n` messages.
pub fn polybus_end_to_end<'a>(
    rt: &'a tokio::runtime::Runtime,
    bus: &'a polybus_core::Bus,
    topic: String,
    prefetch: u32,
    payload: Bytes,
    n: usize,
) -> Timed<'a> {
    let mut sub = rt.block_on(own_group(bus, &topic, prefetch));
    Box::new(move |iters| {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..iters {
                polybus_round(bus, &topic, &mut sub, &payload, n).await;
            }
            start.elapsed()
        })
    })
}

/// How many messages a latency run sends at `rate`: two seconds' worth, or a
/// tenth of a second in quick mode.
pub fn latency_count(rate: u64) -> u64 {
    if quick() {
        (rate / 10).max(10)
    } else {
        (rate * 2).max(1_000)
    }
}

/// Allocations per message of `run`, which handles `n` messages.
pub fn allocations_per_message<F: FnOnce()>(
    alloc: &'static StatsAlloc<System>,
    n: u64,
    run: F,
) -> f64 {
    let region = Region::new(alloc);
    run();
    let change = region.change();
    change.allocations as f64 / n as f64
}

/// The allocation rows of `backend`: polybus's and the raw client's, per message.
pub fn alloc_rows(backend: &str, polybus: f64, raw: f64) -> Vec<serde_json::Value> {
    [("polybus", polybus), ("raw", raw)]
        .into_iter()
        .map(|(imp, per_message)| {
            serde_json::json!({ "backend": backend, "impl": imp, "allocations_per_message": per_message })
        })
        .collect()
}

/// Write the latency and allocation rows of `backend` for BENCHMARKS.md
/// (`target/polybus-bench/<backend>.json`); nothing in quick mode.
pub fn write_results(
    backend: &str,
    latency: Vec<serde_json::Value>,
    allocs: Vec<serde_json::Value>,
) {
    write(
        backend,
        serde_json::json!({ "latency": latency, "allocations": allocs }),
    );
}

/// Write allocation rows alone (`target/polybus-bench/<backend>-allocations.json`).
pub fn write_allocations(backend: &str, allocs: Vec<serde_json::Value>) {
    write(
        &format!("{backend}-allocations"),
        serde_json::json!({ "allocations": allocs }),
    );
}

fn write(name: &str, doc: serde_json::Value) {
    if quick() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|p| p.join("Cargo.lock").exists())
        .expect("workspace root")
        .join("target/polybus-bench");
    std::fs::create_dir_all(&dir).expect("results dir");
    let text = serde_json::to_string_pretty(&doc).unwrap();
    std::fs::write(dir.join(format!("{name}.json")), &text).expect("results file");
    println!("{text}");
}

/// A sustained stream's shared counters: the producers and the consumer of
/// one implementation update them while the driver reads the rate.
#[derive(Clone)]
pub struct Stream {
    published: Arc<std::sync::atomic::AtomicU64>,
    done: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Whether a consumer runs: then producers keep the backlog under [`BACKLOG`].
    consumed: bool,
}

/// Producer tasks of a sustained stream, each with one batch in flight.
pub const PRODUCERS: usize = 2;
/// Messages each producer has in flight, awaited together.
pub const IN_FLIGHT: usize = 100;
/// The most messages published and not yet acked in a sustained end-to-end
/// stream: producers wait beyond it, so the queue stays short and a round does
/// not leave the broker a backlog for the next.
pub const BACKLOG: u64 = 10_000;
/// The payload of the sustained streams.
pub const SUSTAINED_SIZE: usize = 16;

impl Stream {
    fn new(consumed: bool) -> Self {
        Stream {
            published: Arc::default(),
            done: Arc::default(),
            stop: Arc::default(),
            consumed,
        }
    }

    /// Wait until `n` more may be published; false once the stream stops.
    pub async fn may_publish(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        loop {
            if self.stop.load(Acquire) {
                return false;
            }
            let published = self.published.load(Acquire);
            if !self.consumed || published.saturating_sub(self.done.load(Acquire)) < BACKLOG {
                self.published.fetch_add(n as u64, AcqRel);
                return true;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }

    /// Count `n` messages done: acked by the consumer, or confirmed where no
    /// consumer runs.
    pub fn done(&self, n: u64) {
        self.done.fetch_add(n, std::sync::atomic::Ordering::AcqRel);
    }

    fn count(&self) -> u64 {
        self.done.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Sets up one implementation's stream (topology, producers, consumer) and
/// returns its tasks once they run; they stop when the stream says so or are
/// aborted.
pub type Start<'a> = Box<
    dyn Fn(Stream) -> std::pin::Pin<Box<dyn Future<Output = Vec<tokio::task::JoinHandle<()>>> + 'a>>
        + 'a,
>;

/// How many interleaved rounds the throughput and sustained benches run
/// (`POLYBUS_BENCH_ROUNDS`, default 5; one in quick mode).
pub fn rounds() -> usize {
    if quick() {
        return 1;
    }
    std::env::var("POLYBUS_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// One implementation's part of a throughput bench: run `iters` iterations and
/// return the time that counts (criterion's `iter_custom` shape), so criterion
/// and the interleaved rounds run the same code.
pub type Timed<'a> = Box<dyn FnMut(u64) -> Duration + 'a>;

/// Whether the throughput group `group` (`amqp/publish`) runs: criterion's
/// filter, the first argument not starting with `-`, is a part of its name, or
/// there is none (`cargo bench --bench amqp -- amqp/publish`). A filter no
/// group matches, such as `sustained-only`, runs none of them.
pub fn wants(group: &str) -> bool {
    std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .is_none_or(|filter| group.contains(&filter))
}

/// Whether criterion measures the throughput groups too
/// (`POLYBUS_BENCH_CRITERION=0` leaves that to the interleaved rounds alone,
/// as `scripts/bench` does).
pub fn criterion_wanted() -> bool {
    std::env::var("POLYBUS_BENCH_CRITERION").map_or(true, |v| v != "0")
}

/// Whether to run the interleaved throughput rounds
/// (`POLYBUS_BENCH_INTERLEAVED=0` leaves them out, for criterion alone).
pub fn interleaved_wanted() -> bool {
    std::env::var("POLYBUS_BENCH_INTERLEAVED").map_or(true, |v| v != "0")
}

/// Run the throughput implementations `impls` of `backend/kind` at `size`
/// (each iteration `per_iter` messages): in criterion's `group` unless
/// `POLYBUS_BENCH_CRITERION=0`, then as interleaved rounds unless
/// `POLYBUS_BENCH_INTERLEAVED=0`, whose rows are returned.
pub fn throughput<M: criterion::measurement::Measurement<Value = Duration>>(
    group: &mut criterion::BenchmarkGroup<'_, M>,
    (backend, kind): (&str, &str),
    size: usize,
    per_iter: usize,
    mut impls: Vec<(&'static str, Timed<'_>)>,
) -> Vec<serde_json::Value> {
    if criterion_wanted() {
        group.throughput(criterion::Throughput::Elements(per_iter as u64));
        for (name, run) in impls.iter_mut() {
            group.bench_function(
                criterion::BenchmarkId::new(*name, format!("{size}B")),
                |b| b.iter_custom(&mut *run),
            );
        }
    }
    if !interleaved_wanted() {
        return Vec::new();
    }
    interleaved(backend, kind, size, per_iter, &mut impls)
}

/// Throughput as interleaved rounds: every implementation of `impls` runs once
/// per round, in a rotating order, for [`rounds`] rounds, each time for about
/// two seconds (as many iterations of `per_iter` messages as fit, sized by an
/// untimed warm-up and one timed iteration). Machine noise that lasts seconds
/// then falls on every implementation alike, which criterion's one-after-the-
/// other samples cannot give. Returns one row per implementation with the rate
/// of every round, in round order, for `scripts/benchmarks.py`.
pub fn interleaved(
    backend: &str,
    kind: &str,
    size: usize,
    per_iter: usize,
    impls: &mut [(&'static str, Timed<'_>)],
) -> Vec<serde_json::Value> {
    let target = Duration::from_secs(2);
    let iters: Vec<u64> = impls
        .iter_mut()
        .map(|(_, run)| {
            if quick() {
                // Quick mode runs the code once, as criterion's `--test` does.
                return 1;
            }
            run(1);
            let one = run(1).as_secs_f64().max(1e-6);
            ((target.as_secs_f64() / one).round() as u64).clamp(1, 1_000_000)
        })
        .collect();
    let mut rates = vec![Vec::new(); impls.len()];
    for round in 0..rounds() {
        for k in 0..impls.len() {
            let i = (round + k) % impls.len();
            let took = (impls[i].1)(iters[i]);
            let rate = (iters[i] * per_iter as u64) as f64 / took.as_secs_f64();
            println!(
                "{backend}/{kind}/{}/{size}B round {round}: {} msg/s",
                impls[i].0,
                rate.round()
            );
            rates[i].push(rate);
        }
    }
    rows(
        impls.iter().map(|(name, _)| *name),
        rates,
        serde_json::json!({
            "backend": backend, "kind": kind, "size": size, "per_iter": per_iter,
        }),
    )
}

/// One row per implementation for `scripts/benchmarks.py`: `common` with the
/// implementation's name and its rate in every round, in round order.
fn rows<'a>(
    names: impl Iterator<Item = &'a str>,
    rates: Vec<Vec<f64>>,
    common: serde_json::Value,
) -> Vec<serde_json::Value> {
    names
        .zip(rates)
        .map(|(name, rates)| {
            let mut row = common.clone();
            row["impl"] = name.into();
            row["rates"] = rates.into();
            row
        })
        .collect()
}

/// Write interleaved throughput rows as `target/polybus-bench/throughput-<name>.json`;
/// nothing if there are none (a filtered run keeps the file of an earlier one).
pub fn write_throughput(name: &str, rows: Vec<serde_json::Value>) {
    if rows.is_empty() {
        return;
    }
    write(
        &format!("throughput-{name}"),
        serde_json::json!({ "rows": rows }),
    );
}

/// How long a sustained stream may take to do its first message (a group join
/// on a slow broker) before the bench fails.
const FIRST_DONE: Duration = Duration::from_secs(60);

/// Run every implementation of `impls` as a sustained stream, one after the
/// other in a rotating order, for [`rounds`] rounds: each warms up for 2 s
/// from its first done message, then its rate is what is done (acked, or
/// confirmed for publish only) in the next 10 s, per second. Returns one row per implementation with
/// the rate of every round, in round order, for `scripts/benchmarks.py`.
pub async fn sustained(
    backend: &str,
    kind: &str,
    consumed: bool,
    impls: &[(&str, Start<'_>)],
) -> Vec<serde_json::Value> {
    let (warm_up, window) = if quick() {
        (Duration::from_millis(500), Duration::from_secs(1))
    } else {
        (Duration::from_secs(2), Duration::from_secs(10))
    };
    let mut rates = vec![Vec::new(); impls.len()];
    let mut cpu = vec![Vec::new(); impls.len()];
    let broker = Cpu::broker(backend);
    for round in 0..rounds() {
        for k in 0..impls.len() {
            let i = (round + k) % impls.len();
            let (name, start) = &impls[i];
            let stream = Stream::new(consumed);
            let tasks = start(stream.clone()).await;
            // A consumer that joins its group in the background (ruststream's
            // subscribe returns before the assignment; a tansu group takes
            // seconds) would spend the warm-up, or the window, joining: the
            // warm-up starts when the stream has done its first message.
            let flowing = Instant::now();
            while stream.count() == 0 {
                assert!(
                    flowing.elapsed() < FIRST_DONE,
                    "{backend} {kind} {name}: nothing done within {FIRST_DONE:?} of starting"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(warm_up).await;
            let (before, started) = (stream.count(), Instant::now());
            let ticks = (Cpu::ticks("self"), broker.as_ref().and_then(Cpu::now));
            tokio::time::sleep(window).await;
            // An aged broker (tansu after CI's tests) may do nothing in quick
            // mode's one-second window: it then lasts until something is done.
            while stream.count() == before {
                assert!(
                    started.elapsed() < window + FIRST_DONE,
                    "{backend} {kind} {name}: nothing done within {:?} of the window's start",
                    window + FIRST_DONE
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let done = stream.count() - before;
            let rate = done as f64 / started.elapsed().as_secs_f64();
            cpu[i].push(Cpu::per_message(ticks, broker.as_ref(), done));
            stream
                .stop
                .store(true, std::sync::atomic::Ordering::Release);
            for t in &tasks {
                t.abort();
            }
            for t in tasks {
                let _ = t.await;
            }
            println!(
                "{backend}/{kind}/{name} round {round}: {} msg/s",
                rate.round()
            );
            rates[i].push(rate);
        }
    }
    let mut rows = rows(
        impls.iter().map(|(name, _)| *name),
        rates,
        serde_json::json!({
            "backend": backend, "kind": kind, "size": SUSTAINED_SIZE,
            "warm_up_s": warm_up.as_secs_f64(), "window_s": window.as_secs_f64(),
            "producers": PRODUCERS, "in_flight": IN_FLIGHT,
            "backlog": if consumed { Some(BACKLOG) } else { None },
            "broker_process": broker.as_ref().map(|b| b.name),
        }),
    );
    for (row, cpu) in rows.iter_mut().zip(cpu) {
        row["client_us_per_msg"] = cpu.iter().map(|c| c.0).collect::<Vec<_>>().into();
        row["broker_us_per_msg"] = cpu.iter().map(|c| c.1).collect::<Vec<_>>().into();
    }
    rows
}

/// CPU time of a process, read from `/proc`: where a sustained stream's time
/// goes, per message, on the client's side (this process, every thread: tokio's
/// workers, lapin's I/O thread, librdkafka's threads) and on the broker's.
/// Less noisy than a rate on a shared machine, and it tells a client that works
/// more per message from one that waits more.
pub struct Cpu {
    pid: String,
    /// What the broker process is, for BENCHMARKS.md.
    name: &'static str,
}

impl Cpu {
    /// The broker process of `backend`, asked of the script that starts it
    /// (`scripts/brokers/<script> pid`); none when that script's broker is not
    /// the one running, or the broker runs inside this process (the mock cluster).
    fn broker(backend: &str) -> Option<Cpu> {
        let (script, name) = match backend {
            "amqp" => ("rabbitmq.sh", "RabbitMQ's beam.smp"),
            "kafka" => ("tansu.sh", "tansu"),
            _ => return None,
        };
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .find(|d| d.join("scripts/brokers").is_dir())?;
        let out = std::process::Command::new("bash")
            .arg(root.join("scripts/brokers").join(script))
            .arg("pid")
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        let pid = String::from_utf8(out.stdout).ok()?.trim().to_owned();
        (out.status.success() && Cpu::ticks(&pid).is_some()).then_some(Cpu { pid, name })
    }

    fn now(&self) -> Option<u64> {
        Cpu::ticks(&self.pid)
    }

    /// User and system time of `pid` (or `self`) so far, in clock ticks.
    fn ticks(pid: &str) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which may hold spaces: state is the
        // first; utime and stime are the 12th and 13th.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    }

    /// Microseconds of CPU per message done since `before`, for this process
    /// and the broker.
    fn per_message(
        before: (Option<u64>, Option<u64>),
        broker: Option<&Cpu>,
        done: u64,
    ) -> (Option<f64>, Option<f64>) {
        static TICK_US: OnceLock<f64> = OnceLock::new();
        let tick_us = *TICK_US.get_or_init(|| {
            std::process::Command::new("getconf")
                .arg("CLK_TCK")
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<f64>().ok())
                .map_or(10_000.0, |hz| 1e6 / hz)
        });
        let per = |before: Option<u64>, now: Option<u64>| {
            let spent = now?.checked_sub(before?)?;
            (done > 0).then(|| spent as f64 * tick_us / done as f64)
        };
        (
            per(before.0, Cpu::ticks("self")),
            per(before.1, broker.and_then(Cpu::now)),
        )
    }
}

/// Write sustained rows as `target/polybus-bench/sustained-<name>.json`.
pub fn write_sustained(name: &str, rows: Vec<serde_json::Value>) {
    write(
        &format!("sustained-{name}"),
        serde_json::json!({ "rows": rows }),
    );
}

/// Write group-join rows (`backends/kafka/benches/joins.rs`) as
/// `target/polybus-bench/joins.json`.
pub fn write_joins(rows: Vec<serde_json::Value>) {
    write("joins", serde_json::json!({ "rows": rows }));
}

/// polybus's producers of a sustained stream: [`PRODUCERS`] tasks, each
/// publishing batches of [`IN_FLIGHT`] and awaiting every confirm; with
/// `count`, each confirmed batch counts as done (publish only).
pub fn polybus_producers(
    bus: &polybus_core::Bus,
    topic: &str,
    stream: &Stream,
    count: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    let payload = Bytes::from(vec![7u8; SUSTAINED_SIZE]);
    (0..PRODUCERS)
        .map(|_| {
            let (bus, topic, stream, payload) = (
                bus.clone(),
                topic.to_owned(),
                stream.clone(),
                payload.clone(),
            );
            tokio::spawn(async move {
                while stream.may_publish(IN_FLIGHT).await {
                    publish_batch(&bus, &topic, &payload, IN_FLIGHT).await;
                    if count {
                        stream.done(IN_FLIGHT as u64);
                    }
                }
            })
        })
        .collect()
}

/// ruststream's consumer of a sustained stream (any of its brokers): receive
/// and ack each delivery.
pub fn ruststream_consumer<S>(mut sub: S, stream: &Stream) -> tokio::task::JoinHandle<()>
where
    S: ruststream::Subscriber + 'static,
{
    use futures::StreamExt;
    use ruststream::IncomingMessage;
    let stream = stream.clone();
    tokio::spawn(async move {
        let mut deliveries = std::pin::pin!(sub.stream());
        while let Some(m) = deliveries.next().await {
            let m = m.expect("ruststream delivery");
            std::hint::black_box(m.payload());
            m.ack().await.expect("ruststream ack");
            stream.done(1);
        }
    })
}

/// polybus's consumer of a sustained stream: receive and ack each delivery.
pub fn polybus_consumer(
    mut sub: polybus_core::DeliveryStream,
    stream: &Stream,
) -> tokio::task::JoinHandle<()> {
    use futures::StreamExt;
    let stream = stream.clone();
    tokio::spawn(async move {
        while let Some(d) = sub.next().await {
            d.expect("delivery").ack().await.expect("ack");
            stream.done(1);
        }
    })
}

/// Whether to run the sustained streams (`POLYBUS_BENCH_SUSTAINED=0` leaves
/// them out, for a run of one criterion group).
pub fn sustained_wanted() -> bool {
    std::env::var("POLYBUS_BENCH_SUSTAINED").map_or(true, |v| v != "0")
}
