//! The in-memory broker beside its peers: polybus's `memory://`, ruststream's
//! in-memory broker, omniqueue's `in_memory` queue and a bounded tokio mpsc of
//! `Bytes` carry the same workload in one run, interleaved: each round runs
//! every implementation once per row, in an order that rotates from round to
//! round, so a slow patch of a shared machine falls on all of them.
//!
//! The workload: one producer task publishes N messages, one consumer receives
//! and acks each, on a multi-thread tokio runtime with 2 workers (a fresh one
//! per run). Two task layouts: `spawned` (producer and consumer both spawned)
//! and `block_on` (producer spawned, consumer in `Runtime::block_on`). Payloads
//! of 16 B and 1 KiB. Publish-only rows time N publishes of 16 B with a
//! consumer subscribed that reads only afterwards (the drain is not timed).
//! Peak RSS per implementation is read for the spawned 16 B workload, each in
//! a child process of its own so that what the allocator kept from an earlier
//! run does not count against the next.
//!
//! `cargo bench --features memory --bench peers`; `POLYBUS_PEERS_N` (default
//! 1,000,000) and `POLYBUS_PEERS_ROUNDS` (default 7). Writes
//! `target/polybus-bench/peers.json` for `scripts/benchmarks.py`. With
//! `-- --test`, or under `cargo test --benches`, it runs 10,000 messages once,
//! checks that every implementation received all of them, and writes nothing.
#![forbid(unsafe_code)]

use std::future::Future;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use polybus::Message;
use ruststream::memory::MemoryBroker;
use ruststream::{Broker, IncomingMessage, OutgoingMessage, Publisher, Subscribe, Subscriber};
use serde_json::json;
use tokio::runtime::Runtime;

#[path = "support/mod.rs"]
mod support;

const TOPIC: &str = "bench.peers";
/// polybus's prefetch, and the capacity of the mpsc baseline end to end.
const PREFETCH: u32 = 256;
const SIZES: [usize; 2] = [16, 1024];
const DEFAULT_N: usize = 1_000_000;
const DEFAULT_ROUNDS: usize = 7;
const QUICK_N: usize = 10_000;
/// Set in a child process that measures one implementation's peak RSS:
/// `<impl>:<n>`.
const RSS_CHILD: &str = "POLYBUS_PEERS_RSS_CHILD";
/// A run that has not finished by then has lost messages; the bench stops.
const WATCHDOG: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Impl {
    Polybus,
    Ruststream,
    Omniqueue,
    Mpsc,
}

const IMPLS: [Impl; 4] = [Impl::Polybus, Impl::Ruststream, Impl::Omniqueue, Impl::Mpsc];

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Polybus => "polybus",
            Impl::Ruststream => "ruststream",
            Impl::Omniqueue => "omniqueue",
            Impl::Mpsc => "mpsc",
        }
    }

    fn from_name(name: &str) -> Option<Impl> {
        IMPLS.into_iter().find(|i| i.name() == name)
    }

    /// What an ack does, and what becomes of a delivery dropped without one,
    /// as each implementation's source says (the versions in Cargo.lock).
    fn ack(self) -> &'static str {
        match self {
            Impl::Polybus => {
                "ack settles the delivery in the broker: it leaves the member's unsettled set \
                 (at most prefetch = 256 outstanding; a full set holds further deliveries back \
                 until one settles) and wakes a consumer waiting at that limit; a delivery \
                 dropped unsettled is nacked: retried after the retry policy's delay with \
                 attempt + 1, dead-lettered once the attempts are spent; the group is bounded \
                 (10,000 ready messages by default: a publisher waits while it is full; \
                 unbounded for publish only)"
            }
            Impl::Ruststream => {
                "ack only takes the delivery out of the message handle (drops its Arc; the \
                 future is ready at once): nothing tracks unsettled deliveries and there is no \
                 prefetch (each subscription reads an unbounded channel); a delivery dropped \
                 unsettled is requeued at the back of its subscription's queue with its \
                 delivery count + 1 (ruststream-memory src/subscriber.rs, Drop for MemoryMessage)"
            }
            Impl::Omniqueue => {
                "ack only sets a flag on the boxed acker (a second ack or nack is an error): \
                 nothing tracks unsettled deliveries and there is no prefetch (an unbounded \
                 channel); nack sends the acker's copy of the payload to the back of the queue; \
                 a delivery dropped unsettled is lost: nothing implements Drop \
                 (src/backends/in_memory.rs)"
            }
            Impl::Mpsc => {
                "no ack: recv hands the Bytes over; bounded at 256 end to end, so the producer \
                 waits while it is full (capacity N for publish only)"
            }
        }
    }

    /// The ack column of the printed table.
    fn ack_short(self) -> &'static str {
        match self {
            Impl::Polybus => {
                "settles: unsettled set ≤ prefetch 256; drop → retry, dead letter; bounded 10,000"
            }
            Impl::Ruststream => "drops the handle: no unsettled set, no prefetch; drop → requeue",
            Impl::Omniqueue => "sets a flag: no unsettled set, no prefetch; drop → lost",
            Impl::Mpsc => "none; bounded 256 (N when publish only)",
        }
    }

    /// What each copies or allocates on the way, beside the payload it is given.
    fn copies(self) -> &'static str {
        match self {
            Impl::Polybus => {
                "no payload copy: the Bytes is shared by reference count; per message one \
                 allocation, the Arc<Message> its delivery and the member's unsettled set share \
                 (made at hand-out, on the consumer's thread); the message id is drawn when \
                 first read"
            }
            Impl::Ruststream => {
                "one payload copy per publish: OutgoingMessage::new over &[u8] copies into a \
                 fresh BytesMut (its memory Publisher takes an owned BytesMut), frozen and \
                 shared with the subscriber by reference count; per message an Arc of name, \
                 payload and headers"
            }
            Impl::Omniqueue => {
                "two payload copies per message: send_raw(&[u8]) copies into a Vec, receive \
                 clones that Vec for the acker's nack copy; the acker is boxed, and so is each \
                 ack future"
            }
            Impl::Mpsc => "no payload copy: the Bytes is cloned (reference count) into the channel",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    Spawned,
    BlockOn,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Spawned => "spawned",
            Layout::BlockOn => "block_on",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    EndToEnd,
    Publish,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::EndToEnd => "end_to_end",
            Kind::Publish => "publish",
        }
    }
}

/// One table row: a workload every implementation runs.
#[derive(Clone, Copy)]
struct Row {
    layout: Layout,
    size: usize,
    kind: Kind,
}

fn rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for layout in [Layout::Spawned, Layout::BlockOn] {
        for size in SIZES {
            rows.push(Row {
                layout,
                size,
                kind: Kind::EndToEnd,
            });
        }
    }
    for layout in [Layout::Spawned, Layout::BlockOn] {
        rows.push(Row {
            layout,
            size: 16,
            kind: Kind::Publish,
        });
    }
    rows
}

/// Quick mode: criterion's `--test`, or no `--bench` (as `cargo test --benches`
/// runs a bench binary), which is how criterion itself tells.
fn quick() -> bool {
    support::quick() || !std::env::args().any(|a| a == "--bench")
}

fn env_count(var: &str, default: usize) -> usize {
    match std::env::var(var) {
        Ok(v) => v
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{var}={v}: not a count")),
        Err(_) => default,
    }
}

/// What a consumer saw: messages and payload bytes.
#[derive(Clone, Copy, Default)]
struct Received {
    messages: usize,
    bytes: usize,
}

impl Received {
    fn add(&mut self, payload_len: usize) {
        self.messages += 1;
        self.bytes += payload_len;
    }

    fn check(self, what: &str, n: usize, size: usize) {
        assert_eq!(
            self.messages, n,
            "{what}: received {} of {n} messages",
            self.messages
        );
        assert_eq!(self.bytes, n * size, "{what}: payload bytes received");
    }
}

/// Time `producer` and `consumer` in `layout`: both spawned, or the producer
/// spawned and the consumer on the thread that blocks on the runtime.
fn end_to_end<P, C>(rt: &Runtime, layout: Layout, producer: P, consumer: C) -> (Duration, Received)
where
    P: Future<Output = ()> + Send + 'static,
    C: Future<Output = Received> + Send + 'static,
{
    rt.block_on(async move {
        let start = Instant::now();
        let received = match layout {
            Layout::Spawned => {
                let p = tokio::spawn(producer);
                let c = tokio::spawn(consumer);
                p.await.expect("producer");
                c.await.expect("consumer")
            }
            Layout::BlockOn => {
                let p = tokio::spawn(producer);
                let received = consumer.await;
                p.await.expect("producer");
                received
            }
        };
        (start.elapsed(), received)
    })
}

/// Time `producer` alone in `layout` (spawned, or on the blocking thread), then
/// run `drain`, untimed.
fn publish_only<P, D>(rt: &Runtime, layout: Layout, producer: P, drain: D) -> (Duration, Received)
where
    P: Future<Output = ()> + Send + 'static,
    D: Future<Output = Received> + Send + 'static,
{
    rt.block_on(async move {
        let start = Instant::now();
        match layout {
            Layout::Spawned => tokio::spawn(producer).await.expect("producer"),
            Layout::BlockOn => producer.await,
        }
        let elapsed = start.elapsed();
        (elapsed, drain.await)
    })
}

/// Run `row` once through `imp` with `n` messages; the time measured, after
/// checking that all `n` arrived.
fn run(imp: Impl, row: Row, n: usize) -> Duration {
    let rt = support::runtime();
    let payload = Bytes::from(vec![7u8; row.size]);
    let what = format!(
        "{} {} {} B {}",
        imp.name(),
        row.layout.name(),
        row.size,
        row.kind.name()
    );
    // A run that loses a message would wait for it forever: stop the bench.
    let (done, watched) = std_mpsc::channel::<()>();
    let watch_what = what.clone();
    let watchdog = std::thread::spawn(move || {
        if let Err(std_mpsc::RecvTimeoutError::Timeout) = watched.recv_timeout(WATCHDOG) {
            eprintln!("peers: {watch_what} did not finish within {WATCHDOG:?}");
            std::process::exit(1);
        }
    });
    let (elapsed, received) = match imp {
        Impl::Polybus => {
            let (bus, mut sub) = rt.block_on(async {
                // End to end the default bound holds the producer back, as a
                // broker would; publish only, room for all, as for the mpsc.
                let url = match row.kind {
                    Kind::EndToEnd => "memory://",
                    Kind::Publish => "memory://?max_depth=unbounded",
                };
                let bus = polybus::connect(url).await.expect("memory bus");
                let sub = support::own_group(&bus, TOPIC, PREFETCH).await;
                (bus, sub)
            });
            let publisher = bus.clone();
            let out = drive(
                &rt,
                row,
                async move {
                    for _ in 0..n {
                        publisher
                            .publish(TOPIC, Message::new(payload.clone()))
                            .await
                            .expect("publish");
                    }
                },
                async move {
                    let mut r = Received::default();
                    while r.messages < n {
                        let Some(d) = sub.next().await else { break };
                        let d = d.expect("delivery");
                        r.add(d.message().payload().len());
                        d.ack().await.expect("ack");
                    }
                    r
                },
            );
            drop(bus);
            out
        }
        Impl::Ruststream => {
            let (connected, mut sub) = rt.block_on(async {
                let connected = MemoryBroker::new().connect().await.expect("connect");
                let sub = Subscribe::subscribe(&connected, TOPIC)
                    .await
                    .expect("subscribe");
                (connected, sub)
            });
            let publisher = connected.publisher();
            let out = drive(
                &rt,
                row,
                async move {
                    for _ in 0..n {
                        publisher
                            .publish(OutgoingMessage::new(TOPIC, &payload), None)
                            .await
                            .expect("publish");
                    }
                },
                async move {
                    let mut r = Received::default();
                    let mut stream = std::pin::pin!(sub.stream());
                    while r.messages < n {
                        let Some(m) = stream.next().await else { break };
                        let m = m.expect("delivery");
                        r.add(m.payload().len());
                        m.ack().await.expect("ack");
                    }
                    r
                },
            );
            drop(connected);
            out
        }
        Impl::Omniqueue => {
            let (producer, mut consumer) = rt.block_on(async {
                omniqueue::backends::InMemoryBackend::builder()
                    .build_pair()
                    .await
                    .expect("in-memory queue")
            });
            drive(
                &rt,
                row,
                async move {
                    for _ in 0..n {
                        producer.send_raw(&payload).await.expect("send");
                    }
                },
                async move {
                    let mut r = Received::default();
                    while r.messages < n {
                        let d = consumer.receive().await.expect("receive");
                        r.add(d.borrow_payload().map_or(0, <[u8]>::len));
                        if let Err((e, _)) = d.ack().await {
                            panic!("ack: {e}");
                        }
                    }
                    r
                },
            )
        }
        Impl::Mpsc => {
            // End to end the bound is the prefetch's; publish only, room for all.
            let capacity = match row.kind {
                Kind::EndToEnd => PREFETCH as usize,
                Kind::Publish => n.max(1),
            };
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(capacity);
            drive(
                &rt,
                row,
                async move {
                    for _ in 0..n {
                        tx.send(payload.clone()).await.expect("send");
                    }
                },
                async move {
                    let mut r = Received::default();
                    while r.messages < n {
                        let Some(p) = rx.recv().await else { break };
                        r.add(std::hint::black_box(p).len());
                    }
                    r
                },
            )
        }
    };
    drop(done);
    watchdog.join().expect("watchdog");
    received.check(&what, n, row.size);
    elapsed
}

/// Time one run of `row`: end to end, or publish only with `consumer` as the
/// untimed drain.
fn drive<P, C>(rt: &Runtime, row: Row, producer: P, consumer: C) -> (Duration, Received)
where
    P: Future<Output = ()> + Send + 'static,
    C: Future<Output = Received> + Send + 'static,
{
    match row.kind {
        Kind::EndToEnd => end_to_end(rt, row.layout, producer, consumer),
        Kind::Publish => publish_only(rt, row.layout, producer, consumer),
    }
}

/// `VmHWM` or `VmRSS` of this process, in kB.
fn status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// In a child process: reset the peak RSS, run the spawned 16 B workload once
/// through `imp`, and print the peak (and the resident set it started from).
fn rss_child(spec: &str) {
    let (name, n) = spec.split_once(':').expect("impl:n");
    let imp = Impl::from_name(name).expect("implementation");
    let n: usize = n.parse().expect("n");
    let reset = std::fs::write("/proc/self/clear_refs", "5");
    let base = status_kb("VmRSS");
    run(
        imp,
        Row {
            layout: Layout::Spawned,
            size: 16,
            kind: Kind::EndToEnd,
        },
        n,
    );
    match (reset, status_kb("VmHWM"), base) {
        (Ok(()), Some(peak), Some(base)) => println!("rss {peak} {base}"),
        (Err(e), ..) => println!("rss n/a: writing /proc/self/clear_refs: {e}"),
        _ => println!("rss n/a: /proc/self/status has no VmHWM or VmRSS"),
    }
}

/// One child's answer: (peak kB, base kB), or why there is none.
fn measure_rss(imp: Impl, n: usize) -> Result<(u64, u64), String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let out = std::process::Command::new(exe)
        .env(RSS_CHILD, format!("{}:{n}", imp.name()))
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("child: {e}"))?;
    assert!(
        out.status.success(),
        "{} RSS child failed: {}",
        imp.name(),
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("rss "))
        .ok_or_else(|| "the child printed no rss line".to_owned())?;
    if let Some(why) = line.strip_prefix("n/a: ") {
        return Err(why.to_owned());
    }
    let mut nums = line.split(' ').map(|v| v.parse::<u64>());
    match (nums.next(), nums.next()) {
        (Some(Ok(peak)), Some(Ok(base))) => Ok((peak, base)),
        _ => Err(format!("unreadable rss line `{line}`")),
    }
}

/// Median, min and max.
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    };
    (median, v[0], v[v.len() - 1])
}

fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn size_label(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn main() {
    if let Ok(spec) = std::env::var(RSS_CHILD) {
        rss_child(&spec);
        return;
    }
    let quick = quick();
    let (n, rounds) = if quick {
        (QUICK_N, 1)
    } else {
        (
            env_count("POLYBUS_PEERS_N", DEFAULT_N).max(1),
            env_count("POLYBUS_PEERS_ROUNDS", DEFAULT_ROUNDS).max(1),
        )
    };
    let rows = rows();
    println!(
        "peers: {n} messages, {rounds} round(s), {} rows x {} implementations, interleaved{}",
        rows.len(),
        IMPLS.len(),
        if quick {
            " (quick: checks counts, writes nothing)"
        } else {
            ""
        }
    );
    // rates[row][impl][round], msg/s
    let mut rates = vec![vec![Vec::with_capacity(rounds); IMPLS.len()]; rows.len()];
    // rss[impl]: (peak kB, base kB) per round, or why not
    let mut rss: Vec<Vec<Result<(u64, u64), String>>> = vec![Vec::new(); IMPLS.len()];
    // One untimed pass first, so the first timed runs do not pay for growing
    // the heap and faulting in its pages.
    if !quick {
        for imp in IMPLS {
            for row in &rows {
                run(imp, *row, n.min(100_000));
            }
        }
    }
    for round in 0..rounds {
        let order: Vec<usize> = (0..IMPLS.len())
            .map(|i| (i + round) % IMPLS.len())
            .collect();
        for (r, row) in rows.iter().enumerate() {
            for &i in &order {
                let elapsed = run(IMPLS[i], *row, n);
                rates[r][i].push(n as f64 / elapsed.as_secs_f64());
            }
        }
        for &i in &order {
            rss[i].push(measure_rss(IMPLS[i], n));
        }
        eprintln!("peers: round {} of {rounds} done", round + 1);
    }

    let polybus = 0;
    let mut row_docs = Vec::new();
    let mut ratio_docs = Vec::new();
    println!();
    println!(
        "{:<9} {:<6} {:<10} {:<10} {:>10} {:>21} {:>28}  ack",
        "layout", "size", "kind", "impl", "median/s", "min–max", "polybus/impl (min–max)"
    );
    for (r, row) in rows.iter().enumerate() {
        let (_, pmin, pmax) = spread(&rates[r][polybus]);
        for (i, imp) in IMPLS.iter().enumerate() {
            let (median, min, max) = spread(&rates[r][i]);
            row_docs.push(json!({
                "layout": row.layout.name(), "size": row.size, "kind": row.kind.name(),
                "impl": imp.name(), "median": median, "min": min, "max": max,
            }));
            let ratio = if i == polybus {
                String::new()
            } else {
                let per_round: Vec<f64> = rates[r][polybus]
                    .iter()
                    .zip(&rates[r][i])
                    .map(|(p, q)| p / q)
                    .collect();
                let (rm, rmin, rmax) = spread(&per_round);
                let indistinguishable = pmin <= max && min <= pmax;
                ratio_docs.push(json!({
                    "layout": row.layout.name(), "size": row.size, "kind": row.kind.name(),
                    "peer": imp.name(), "median": rm, "min": rmin, "max": rmax,
                    "indistinguishable": indistinguishable,
                }));
                format!(
                    "{rm:.2}× ({rmin:.2}–{rmax:.2}){}",
                    if indistinguishable { " ≈" } else { "" }
                )
            };
            println!(
                "{:<9} {:<6} {:<10} {:<10} {:>10} {:>21} {:>28}  {}",
                row.layout.name(),
                size_label(row.size),
                row.kind.name(),
                imp.name(),
                fmt_rate(median),
                format!("{}–{}", fmt_rate(min), fmt_rate(max)),
                ratio,
                imp.ack_short(),
            );
        }
    }
    println!("(≈: indistinguishable, the polybus and peer ranges over rounds overlap)");

    println!("\npeak RSS, spawned 16 B end to end, {n} messages (one child process per run):");
    let mut rss_docs = Vec::new();
    for (i, imp) in IMPLS.iter().enumerate() {
        let ok: Vec<(u64, u64)> = rss[i].iter().filter_map(|r| r.clone().ok()).collect();
        if ok.is_empty() {
            let why = rss[i]
                .iter()
                .find_map(|r| r.clone().err())
                .unwrap_or_default();
            println!("  {:<10} n/a ({why})", imp.name());
            rss_docs.push(
                json!({ "impl": imp.name(), "peak_mb": null, "note": format!("n/a: {why}") }),
            );
            continue;
        }
        let mb = |kb: u64| kb as f64 / 1024.0;
        let peaks: Vec<f64> = ok.iter().map(|&(p, _)| mb(p)).collect();
        let bases: Vec<f64> = ok.iter().map(|&(_, b)| mb(b)).collect();
        let (peak, pmin, pmax) = spread(&peaks);
        let (base, _, _) = spread(&bases);
        println!(
            "  {:<10} {peak:>8.1} MB ({pmin:.1}–{pmax:.1}), from {base:.1} MB at the start",
            imp.name()
        );
        rss_docs.push(json!({
            "impl": imp.name(), "peak_mb": peak, "min_mb": pmin, "max_mb": pmax, "base_mb": base,
        }));
    }
    println!("\nack semantics:");
    for imp in IMPLS {
        println!("  {}: {}", imp.name(), imp.ack());
    }
    println!("\nwhat each copies:");
    for imp in IMPLS {
        println!("  {}: {}", imp.name(), imp.copies());
    }

    if quick {
        return;
    }
    let acks: serde_json::Map<String, serde_json::Value> = IMPLS
        .iter()
        .map(|i| (i.name().to_owned(), json!(i.ack())))
        .collect();
    let acks_short: serde_json::Map<String, serde_json::Value> = IMPLS
        .iter()
        .map(|i| (i.name().to_owned(), json!(i.ack_short())))
        .collect();
    let copies: serde_json::Map<String, serde_json::Value> = IMPLS
        .iter()
        .map(|i| (i.name().to_owned(), json!(i.copies())))
        .collect();
    let doc = json!({
        "n": n, "rounds": rounds, "workers": 2, "prefetch": PREFETCH,
        "rows": row_docs, "ratios": ratio_docs, "rss": rss_docs,
        "acks": acks, "acks_short": acks_short, "copies": copies,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/polybus-bench");
    std::fs::create_dir_all(&dir).expect("results dir");
    let path = dir.join("peers.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc).expect("json")).expect("peers.json");
    println!("\nwrote {}", path.display());
}
