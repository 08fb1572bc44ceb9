//! The `polybus` binary, driven as a user drives it: arguments, stdin, exit
//! codes, what it prints, and Ctrl-C. The broker tests run against the
//! RabbitMQ that `scripts/brokers/rabbitmq.sh start` runs (and Kafka's
//! `check` against `scripts/brokers/tansu.sh start`); `POLYBUS_SKIP_AMQP=1` /
//! `POLYBUS_SKIP_KAFKA=1` opt out, and each test then says so.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use polybus::consumer::{Consumer, HandlerError};
use polybus::{Bus, DeliveryStream, Message, RetryPolicy, Subscription};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/polybus-test";
const HINT: &str =
    "start RabbitMQ with `scripts/brokers/rabbitmq.sh start`, or set POLYBUS_SKIP_AMQP=1";

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

fn polybus(url: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_polybus"));
    c.env("POLYBUS_URL", url)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

async fn run(url: &str, args: &[&str]) -> Ran {
    run_with(url, args, None).await
}

async fn run_with(url: &str, args: &[&str], stdin: Option<&str>) -> Ran {
    let mut c = polybus(url, args);
    if stdin.is_some() {
        c.stdin(Stdio::piped());
    }
    let mut child = c.spawn().expect("the polybus binary runs");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(input.as_bytes()).await.expect("write stdin");
    }
    finish(child).await
}

async fn finish(child: Child) -> Ran {
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("polybus finished within 60 s")
        .expect("polybus ran");
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", &Message::new("").id().replace('-', "")[..20])
}

/// RabbitMQ, or `None` (said) when opted out; fails with how to start it.
async fn rabbitmq() -> Option<Bus> {
    if std::env::var_os("POLYBUS_SKIP_AMQP").is_some() {
        eprintln!("SKIPPED: POLYBUS_SKIP_AMQP is set");
        return None;
    }
    Some(
        polybus::connect(AMQP)
            .await
            .unwrap_or_else(|e| panic!("cannot reach RabbitMQ: {e}; {HINT}")),
    )
}

/// A group whose consumer failed `n` messages (`m0`, `m1`, …) at their first
/// attempt, so they are its dead letters (counted); the group's stream and
/// the messages' ids.
async fn dead_lettered(bus: &Bus, n: usize) -> (String, DeliveryStream, BTreeSet<String>) {
    let (topic, group) = (unique("cli.dead."), unique("cli-g-"));
    let sub = Subscription::new(&topic)
        .group(&group)
        .retry(RetryPolicy::fixed(Duration::from_millis(100)).max_attempts(1));
    let mut s = bus.subscribe(sub).await.expect("subscribe");
    for i in 0..n {
        bus.publish(&topic, Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let mut ids = BTreeSet::new();
    for _ in 0..n {
        let d = next(&mut s).await;
        ids.insert(d.message().id().to_owned());
        d.nack_because("card declined").await.expect("nack");
    }
    until_count(AMQP, &group, n as u64).await;
    (group, s, ids)
}

async fn next(s: &mut DeliveryStream) -> polybus::Delivery {
    tokio::time::timeout(Duration::from_secs(20), s.next())
        .await
        .expect("a delivery within 20 s")
        .expect("a live stream")
        .expect("a delivery")
}

async fn count(url: &str, group: &str) -> u64 {
    let ran = run(url, &["dlq", "count", group]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    ran.stdout.trim().parse().expect("a number")
}

async fn until_count(url: &str, group: &str, n: u64) {
    for _ in 0..200 {
        if count(url, group).await == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("group `{group}` never counted {n} dead letters");
}

#[tokio::test]
async fn help_reads_well_and_every_subcommand_has_its_own() {
    let ran = run("memory://", &["--help"]).await;
    assert_eq!(ran.code, 0);
    for word in [
        "check",
        "publish",
        "tail",
        "dlq",
        "bench",
        "Exit codes",
        "POLYBUS_URL",
    ] {
        assert!(ran.stdout.contains(word), "{word} in:\n{}", ran.stdout);
    }
    for sub in [
        &["check", "--help"][..],
        &["publish", "--help"],
        &["tail", "--help"],
        &["dlq", "--help"],
        &["dlq", "count", "--help"],
        &["dlq", "list", "--help"],
        &["dlq", "show", "--help"],
        &["dlq", "redrive", "--help"],
        &["dlq", "purge", "--help"],
        &["bench", "--help"],
    ] {
        let ran = run("memory://", sub).await;
        assert_eq!(ran.code, 0, "{sub:?}: {}", ran.stderr);
        assert!(
            ran.stdout.contains("Usage: polybus"),
            "{sub:?}:\n{}",
            ran.stdout
        );
    }
    let ran = run("memory://", &["no-such-command"]).await;
    assert_eq!(ran.code, 2, "clap's usage error");
}

#[tokio::test]
async fn check_prints_the_backend_and_fails_with_a_typed_exit_code() {
    let ran = run("memory://", &["check"]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert!(ran.stdout.contains("backend: memory"), "{}", ran.stdout);
    let ran = run("memory://", &["check", "--json"]).await;
    let v = &json_lines(&ran.stdout)[0];
    assert_eq!(v["backend"], "memory");
    assert!(
        v["capabilities"].as_array().is_some_and(|c| !c.is_empty()),
        "{v}"
    );

    let ran = run("nope://x", &["check"]).await;
    assert_eq!(ran.code, 2, "invalid input: {}", ran.stderr);
    let mut c = polybus("memory://", &["check"]);
    c.env_remove("POLYBUS_URL");
    let ran = finish(c.spawn().unwrap()).await;
    assert_eq!(ran.code, 2, "no url: {}", ran.stderr);
    assert!(ran.stderr.contains("--url"), "{}", ran.stderr);

    let ran = run(
        "amqp://guest:guest@127.0.0.1:1/x?connect_timeout_ms=3000",
        &["check"],
    )
    .await;
    assert_eq!(ran.code, 3, "unreachable: {}", ran.stderr);

    if rabbitmq().await.is_none() {
        return;
    }
    let ran = run(AMQP, &["check"]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert!(ran.stdout.contains("backend: amqp"), "{}", ran.stdout);
    let ran = run(
        "amqp://guest:not-the-password@127.0.0.1:5672/polybus-test",
        &["check", "--json"],
    )
    .await;
    assert_eq!(ran.code, 4, "bad credentials: {}", ran.stderr);
    assert_eq!(json_lines(&ran.stdout)[0]["kind"], "authentication");
    assert!(!format!("{}{}", ran.stdout, ran.stderr).contains("not-the-password"));
}

#[tokio::test]
async fn check_on_kafka() {
    if std::env::var_os("POLYBUS_SKIP_KAFKA").is_some() {
        eprintln!("SKIPPED: POLYBUS_SKIP_KAFKA is set");
        return;
    }
    let url =
        std::env::var("POLYBUS_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into());
    let ran = run(&url, &["check"]).await;
    assert_eq!(
        ran.code, 0,
        "{}; start tansu with `scripts/brokers/tansu.sh start`, or set POLYBUS_SKIP_KAFKA=1",
        ran.stderr
    );
    assert!(ran.stdout.contains("backend: kafka"), "{}", ran.stdout);
}

#[tokio::test]
async fn publish_from_stdin_and_a_file_is_printed_by_tail() {
    if rabbitmq().await.is_none() {
        return;
    }
    let base = unique("cli.");
    let pattern = format!("{base}.#");
    let mut tail = polybus(AMQP, &["tail", &pattern, "-n", "4", "--json"])
        .spawn()
        .expect("tail runs");
    let mut err = BufReader::new(tail.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), err.next_line())
        .await
        .expect("tail starts")
        .unwrap()
        .unwrap_or_default();
    assert!(first.starts_with("tailing"), "{first}");

    let topic = format!("{base}.orders");
    let ran = run_with(
        AMQP,
        &[
            "publish",
            &topic,
            "-k",
            "c1",
            "-H",
            "tenant=acme",
            "--content-type",
            "text/plain",
        ],
        Some("one\ntwo\n\nthree\n"),
    )
    .await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert!(ran.stdout.contains("3 published"), "{}", ran.stdout);
    let file = std::env::temp_dir().join(format!("{}.json", unique("polybus-cli-")));
    std::fs::write(&file, "{\"a\": 1,\n \"b\": 2}\n").unwrap();
    let ran = run(
        AMQP,
        &[
            "publish",
            &topic,
            "--whole",
            "--file",
            file.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    std::fs::remove_file(&file).ok();
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert_eq!(json_lines(&ran.stdout)[0]["published"], 1);

    let ran = finish(tail).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let lines = json_lines(&ran.stdout);
    let payloads: Vec<&str> = lines
        .iter()
        .map(|v| v["payload"].as_str().unwrap())
        .collect();
    assert_eq!(
        payloads,
        ["one", "two", "three", "{\"a\": 1,\n \"b\": 2}\n"]
    );
    assert_eq!(lines[0]["key"], "c1");
    assert_eq!(lines[0]["headers"]["tenant"], "acme");
    assert_eq!(lines[0]["content_type"], "text/plain");
    assert_eq!(lines[0]["topic"], topic.as_str());

    let ran = run_with(AMQP, &["publish", &topic, "--delay", "-1"], Some("x")).await;
    assert_eq!(ran.code, 2, "{}", ran.stderr);
    let ran = run_with(
        AMQP,
        &["publish", &topic, "--delay", "999999999"],
        Some("x"),
    )
    .await;
    assert_eq!(ran.code, 2, "beyond seven days: {}", ran.stderr);
    let ran = run(AMQP, &["publish", "polybus.reserved"]).await;
    assert_eq!(
        ran.code, 2,
        "a reserved topic is invalid input: {}",
        ran.stderr
    );
    let ran = run_with(AMQP, &["publish", &topic, "-H", "no-equals"], Some("x")).await;
    assert_eq!(ran.code, 2, "{}", ran.stderr);
}

#[tokio::test]
async fn publish_with_a_delay_is_delivered_no_earlier() {
    let Some(bus) = rabbitmq().await else { return };
    let topic = unique("cli.later.");
    let mut s = bus
        .subscribe(Subscription::new(&topic).group(unique("cli-g-")))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let ran = run_with(AMQP, &["publish", &topic, "--delay", "1"], Some("later")).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let d = next(&mut s).await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(d.message().payload().as_ref(), b"later");
    d.ack().await.unwrap();
}

/// The on-call story: a failing handler (the handler runtime, its attempts
/// used up) dead-letters a message; the CLI lists it, shows it, redrives it,
/// and the handler, fixed meanwhile, handles it.
#[tokio::test]
async fn a_dead_letter_is_listed_shown_and_redriven_then_handled() {
    let Some(bus) = rabbitmq().await else { return };
    let (topic, group) = (unique("cli.dlq."), unique("cli-g-"));
    let fixed = Arc::new(AtomicBool::new(false));
    let mut running = Consumer::new(bus.clone(), Subscription::new(&topic).group(&group))
        .retry(RetryPolicy::fixed(Duration::from_millis(100)).max_attempts(2))
        .start_with(
            fixed.clone(),
            |fixed: Arc<AtomicBool>, m: Message| async move {
                if fixed.load(Ordering::SeqCst) {
                    assert_eq!(m.payload().as_ref(), b"order 42");
                    Ok(())
                } else {
                    Err(HandlerError::retry("card declined"))
                }
            },
        )
        .await
        .unwrap();
    let m = Message::new("order 42").with_header("tenant", "acme");
    let id = m.id().to_owned();
    bus.publish(&topic, m).await.unwrap();
    // Two failed attempts: the second nack dead-letters it.
    tokio::time::timeout(Duration::from_secs(30), running.wait_for(|s| s.nacked == 2))
        .await
        .expect("the handler failed twice within 30 s");
    until_count(AMQP, &group, 1).await;

    let ran = run(AMQP, &["dlq", "list", &group]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert!(ran.stdout.contains(&id), "{}", ran.stdout);
    assert!(ran.stdout.contains("card declined"), "{}", ran.stdout);
    let listed = json_lines(&run(AMQP, &["dlq", "list", &group, "--json"]).await.stdout);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["original_topic"], topic.as_str());
    assert_eq!(listed[0]["attempts"], 2);
    assert!(
        listed[0]["dead_lettered_at_ms"].as_u64().is_some(),
        "{}",
        listed[0]
    );

    until_count(AMQP, &group, 1).await;
    let ran = run(AMQP, &["dlq", "show", &group, &id[..13]]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert!(ran.stdout.contains("order 42"), "{}", ran.stdout);
    assert!(ran.stdout.contains("tenant: acme"), "{}", ran.stdout);
    let ran = run(AMQP, &["dlq", "show", &group, "no-such-id"]).await;
    assert_eq!(ran.code, 2, "{}", ran.stderr);

    fixed.store(true, Ordering::SeqCst);
    until_count(AMQP, &group, 1).await;
    let ran = run(AMQP, &["dlq", "redrive", &group]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert!(ran.stdout.contains("1 redriven"), "{}", ran.stdout);
    let stats = tokio::time::timeout(Duration::from_secs(30), running.wait_for(|s| s.acked == 1))
        .await
        .expect("the redriven message was handled within 30 s");
    assert_eq!((stats.acked, stats.nacked), (1, 2), "{stats:?}");
    running.stop().await.unwrap();
    until_count(AMQP, &group, 0).await;
}

#[tokio::test]
async fn a_redrive_interrupted_by_ctrl_c_loses_nothing() {
    let Some(bus) = rabbitmq().await else { return };
    let (group, mut s, ids) = dead_lettered(&bus, 6).await;

    let redrive = polybus(AMQP, &["dlq", "redrive", &group, "--rate", "2"])
        .spawn()
        .expect("redrive runs");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let pid = redrive.id().expect("running").to_string();
    let killed = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let ran = finish(redrive).await;
    assert_eq!(ran.code, 130, "{}", ran.stderr);
    assert!(ran.stderr.contains("interrupted"), "{}", ran.stderr);

    let mut got = BTreeSet::new();
    let drain = async |s: &mut DeliveryStream, got: &mut BTreeSet<String>| {
        while let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(2), s.next()).await {
            let d = d.unwrap();
            got.insert(d.message().id().to_owned());
            d.ack().await.unwrap();
        }
    };
    drain(&mut s, &mut got).await;
    assert!(
        !got.is_empty() && got.len() < 6,
        "interrupted midway: {got:?}"
    );
    let ran = run(AMQP, &["dlq", "redrive", &group]).await;
    assert_eq!(ran.code, 0, "{}{}", ran.stdout, ran.stderr);
    drain(&mut s, &mut got).await;
    assert_eq!(got, ids, "every dead letter came back");
    until_count(AMQP, &group, 0).await;
}

#[tokio::test]
async fn purge_asks_unless_yes_and_a_dry_run_takes_nothing() {
    let Some(bus) = rabbitmq().await else { return };
    let (group, _consumer, _) = dead_lettered(&bus, 3).await;

    let ran = run(AMQP, &["dlq", "purge", &group]).await;
    assert_eq!(ran.code, 2, "no terminal, no --yes: {}", ran.stderr);
    assert!(ran.stderr.contains("--yes"), "{}", ran.stderr);
    let ran = run(AMQP, &["dlq", "purge", &group, "--dry-run", "-n", "2"]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert_eq!(
        ran.stdout.matches("would purge").count(),
        2,
        "{}",
        ran.stdout
    );
    until_count(AMQP, &group, 3).await;
    let ran = run(AMQP, &["dlq", "purge", &group, "--yes", "--json"]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert_eq!(json_lines(&ran.stdout)[0]["done"], 3);
    until_count(AMQP, &group, 0).await;
    let ran = run(AMQP, &["dlq", "list", &group]).await;
    assert!(ran.stdout.contains("no dead letters"), "{}", ran.stdout);
}

#[tokio::test]
async fn bench_prints_rates_and_latency_percentiles() {
    let ran = run("memory://", &["bench", "-z", "1", "--json"]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let v = &json_lines(&ran.stdout)[0];
    let sent = v["sent"].as_u64().unwrap();
    assert!(sent > 0, "{v}");
    assert_eq!(v["received"].as_u64(), Some(sent), "{v}");
    assert!(v["latency_ms"]["p99"].as_f64().is_some(), "{v}");

    let ran = run("memory://", &["bench", "-s", "4"]).await;
    assert_eq!(ran.code, 2, "{}", ran.stderr);

    if rabbitmq().await.is_none() {
        return;
    }
    let ran = run(
        AMQP,
        &["bench", "-z", "2", "-r", "200", "-x", "2", "-y", "2"],
    )
    .await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert!(
        ran.stderr.contains("msg/s"),
        "the live rate line: {}",
        ran.stderr
    );
    assert!(
        ran.stdout.contains("latency (publish to delivery): p50"),
        "{}",
        ran.stdout
    );
}

/// The README shows `polybus --help` and every subcommand's help as they are.
#[tokio::test]
async fn the_readme_shows_every_help_as_it_is() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    for sub in [
        &[][..],
        &["check"],
        &["publish"],
        &["tail"],
        &["dlq"],
        &["dlq", "count"],
        &["dlq", "list"],
        &["dlq", "show"],
        &["dlq", "redrive"],
        &["dlq", "purge"],
        &["bench"],
    ] {
        let mut args = sub.to_vec();
        args.push("--help");
        let mut c = polybus("memory://", &args);
        c.env_remove("POLYBUS_URL");
        let ran = finish(c.spawn().unwrap()).await;
        let shown = format!("$ polybus {}\n{}", args.join(" "), ran.stdout.trim_end());
        assert!(
            readme.contains(&shown),
            "README.md lacks (or has another version of) this help; regenerate it:\n{shown}"
        );
    }
}
