//! Telemetry beyond the shared suite's `otel` cases: trace context that
//! crosses to and from other OpenTelemetry-instrumented clients (Python's pika
//! on RabbitMQ, confluent-kafka on Kafka, as the W3C `traceparent` header),
//! foreign messages without context, and handlers running inside their
//! delivery's `process` span.
//!
//! Needs the brokers of `scripts/brokers/rabbitmq.sh start` and
//! `scripts/brokers/tansu.sh start` (which install pika and confluent-kafka);
//! `POLYBUS_SKIP_AMQP=1` / `POLYBUS_SKIP_KAFKA=1` opt out.
#![cfg(feature = "otel-testkit")]

use std::time::Duration;

use futures::StreamExt;
use opentelemetry::trace::{SpanId, SpanKind};
use polybus::{Bus, Message, Subscription};
use polybus_core::testkit::otel::{SpanView, recorder};

mod common;

/// A W3C trace id and parent span id, fresh for each test.
fn ids() -> (String, String) {
    let trace = uuid::Uuid::now_v7().simple().to_string();
    let span = trace[16..].to_owned();
    (trace, span)
}

/// Receive `n` deliveries and ack them.
async fn take(sub: &mut polybus::DeliveryStream, n: usize) -> Vec<Message> {
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("a delivery within 20 s")
            .expect("stream open")
            .expect("delivery");
        out.push(d.message().clone());
        d.ack().await.unwrap();
    }
    out
}

/// The `process` spans of `topic`: the one continuing the foreign trace
/// `trace`/`span` is its child; the one for the message without context is a
/// root with no link.
fn check_continued(topic: &str, system: &str, trace: &str, span: &str) {
    let processes: Vec<_> = recorder()
        .spans_of(topic)
        .into_iter()
        .filter(|s| s.is(SpanKind::Consumer))
        .collect();
    assert_eq!(processes.len(), 2, "{processes:#?}");
    for p in &processes {
        assert_eq!(p.attr("messaging.system").as_deref(), Some(system));
    }
    let continued = processes
        .iter()
        .find(|p| p.trace_id().to_string() == trace)
        .unwrap_or_else(|| panic!("no process span in trace {trace}: {processes:#?}"));
    assert_eq!(
        continued.parent_span_id.to_string(),
        span,
        "a child of the foreign span"
    );
    assert!(continued.parent_span_is_remote);
    let foreign = processes
        .iter()
        .find(|p| p.trace_id().to_string() != trace)
        .unwrap();
    assert_eq!(foreign.parent_span_id, SpanId::INVALID, "a root span");
    assert!(foreign.linked().is_empty(), "nothing to link to");
}

/// pika publishes one message with a `traceparent` header and one without:
/// polybus's `process` span continues the first trace and roots the second.
#[cfg(feature = "amqp")]
#[tokio::test]
async fn otel_a_traceparent_from_pika_is_continued_on_rabbitmq() {
    use common::{HOST, VHOST, unique, url};
    let Some(url) = url() else { return };
    recorder();
    let bus: Bus = common::bus(&url).await;
    let topic = unique("otel.pika.");
    let mut sub = bus
        .subscribe(Subscription::new(topic.clone()).group(unique("otel-")))
        .await
        .unwrap();
    let (trace, span) = ids();
    let script = format!(
        r#"
import pika
c = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@{HOST}/{VHOST}"))
ch = c.channel()
ch.basic_publish(exchange="polybus", routing_key="{topic}", body=b"traced",
    properties=pika.BasicProperties(headers={{"traceparent": "00-{trace}-{span}-01"}}))
ch.basic_publish(exchange="polybus", routing_key="{topic}", body=b"untraced")
c.close()
"#
    );
    let out = tokio::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .await
        .expect("python3");
    assert!(
        out.status.success(),
        "pika failed (scripts/brokers/rabbitmq.sh start installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = take(&mut sub, 2).await;
    assert_eq!(got[0].payload().as_ref(), b"traced");
    check_continued(&topic, "rabbitmq", &trace, &span);
}

/// confluent-kafka produces one record with a `traceparent` header and one
/// without: polybus's `process` span continues the first trace and roots the
/// second. And a record polybus publishes carries its `send` span's
/// `traceparent` to confluent-kafka.
#[cfg(feature = "kafka")]
#[tokio::test]
async fn otel_a_traceparent_from_confluent_kafka_is_continued_on_kafka() {
    use common::{kafka_bus, kafka_url, unique};
    let Some(url) = kafka_url() else { return };
    recorder();
    let bus = kafka_bus(&url).await;
    let topic = unique("otel.py.");
    let mut sub = bus
        .subscribe(Subscription::new(topic.clone()).group(unique("otel-")))
        .await
        .unwrap();
    let (trace, span) = ids();
    let outgoing = unique("otel.out.");
    bus.publish(&outgoing, Message::new("to python"))
        .await
        .unwrap();
    let script = r#"
import sys
from confluent_kafka import Consumer, Producer
brokers, topic, traceparent, outgoing = sys.argv[1:5]
p = Producer({"bootstrap.servers": brokers})
p.produce(topic, value=b"traced", headers=[("traceparent", traceparent.encode())])
p.flush(30)
p.produce(topic, value=b"untraced")
assert p.flush(30) == 0
c = Consumer({"bootstrap.servers": brokers, "group.id": "otel-" + outgoing,
              "auto.offset.reset": "earliest"})
c.subscribe([outgoing])
m = None
for _ in range(60):
    m = c.poll(1.0)
    if m is not None and m.error() is None:
        break
assert m is not None and m.error() is None, m and m.error()
print("traceparent=" + dict(m.headers() or [])["traceparent"].decode())
c.close()
"#;
    let brokers = url
        .trim_start_matches("kafka://")
        .split('?')
        .next()
        .unwrap();
    let out = tokio::process::Command::new("python3")
        .args([
            "-c",
            script,
            brokers,
            &topic,
            &format!("00-{trace}-{span}-01"),
            &outgoing,
        ])
        .output()
        .await
        .expect("python3");
    assert!(
        out.status.success(),
        "confluent-kafka failed (scripts/brokers/tansu.sh start installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = take(&mut sub, 2).await;
    assert_eq!(got[0].payload().as_ref(), b"traced");
    check_continued(&topic, "kafka", &trace, &span);
    let send = recorder()
        .spans_of(&outgoing)
        .into_iter()
        .find(|s| s.is(SpanKind::Producer))
        .expect("the send span of the record for python");
    let expected = format!("traceparent=00-{}-{}-01", send.trace_id(), send.span_id());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().any(|l| l == expected),
        "{expected} not in {stdout}"
    );
}

/// A request-reply topic (`reply.<id>`, one per requester) is a temporary
/// destination: span names say `(temporary)`, and neither spans nor metrics
/// carry its name.
#[cfg(feature = "memory")]
#[tokio::test]
async fn otel_a_reply_topic_is_a_temporary_destination() {
    recorder();
    let bus = polybus::connect("memory://").await.unwrap();
    let topic = format!("reply.{}", polybus_core::testkit::unique_name());
    let mut sub = bus
        .subscribe(Subscription::new(topic.clone()))
        .await
        .unwrap();
    let m = Message::new("answer");
    let id = m.id().to_owned();
    bus.publish(&topic, m).await.unwrap();
    take(&mut sub, 1).await;
    let spans = recorder().spans_of(&id);
    let send = spans
        .iter()
        .find(|s| s.is(SpanKind::Producer))
        .expect("send span");
    assert_eq!(send.name, "send (temporary)");
    assert_eq!(
        send.attr("messaging.destination.temporary").as_deref(),
        Some("true")
    );
    assert_eq!(send.attr("messaging.destination.name"), None);
    let process = spans
        .iter()
        .find(|s| s.is(SpanKind::Consumer))
        .expect("process span");
    assert_eq!(process.name, "process (temporary)");
    let named = recorder()
        .metrics()
        .into_iter()
        .filter(|p| {
            p.attribute("messaging.destination.name")
                .is_some_and(|d| d.contains(&topic))
        })
        .count();
    assert_eq!(named, 0, "no metric names the reply topic");
}

/// The handler runtime runs each handler inside its delivery's `process`
/// span: a span the handler starts is the process span's child, in the trace
/// of the publish.
#[cfg(feature = "memory")]
#[tokio::test]
async fn otel_a_handler_runs_inside_its_process_span() {
    use opentelemetry::trace::{TraceContextExt, Tracer};
    recorder();
    let bus = polybus::connect("memory://").await.unwrap();
    let topic = common::unique("otel.handler.");
    let (seen, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let charge = format!("charge {topic}");
    let subscription = Subscription::new(topic.clone()).group("handlers");
    let running = polybus::consumer::Consumer::new(bus.clone(), subscription)
        .start(move |_: Message| {
            let (seen, charge) = (seen.clone(), charge.clone());
            async move {
                let tracer = opentelemetry::global::tracer("the-service");
                tracer.in_span(charge, |cx| {
                    cx.span()
                        .set_attribute(opentelemetry::KeyValue::new("service.step", "charge"));
                });
                seen.send(()).unwrap();
                Ok(())
            }
        })
        .await
        .unwrap();
    bus.publish(&topic, Message::new("order")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), seen_rx.recv())
        .await
        .unwrap();
    running.stop().await.unwrap();
    let spans = recorder().spans_of(&topic);
    let by_op = |op: &str| {
        spans
            .iter()
            .find(|s| s.attr("messaging.operation.name").as_deref() == Some(op))
            .unwrap_or_else(|| panic!("a `{op}` span in {spans:#?}"))
    };
    let (send, process) = (by_op("send"), by_op("process"));
    let own = recorder()
        .spans_of("charge")
        .into_iter()
        .find(|s| s.name == format!("charge {topic}"))
        .expect("the handler's span");
    assert_eq!(own.trace_id(), send.trace_id(), "one trace");
    assert_eq!(
        own.parent_span_id,
        process.span_id(),
        "the handler's span is process's child"
    );
}

/// `cargo run --example observability` prints one message's spans as a tree
/// and serves the metrics: scraped here over HTTP and parsed as Prometheus's
/// text format. Runs the example binary that `cargo test` builds beside the
/// tests (`cargo build --example observability --features otel` makes it).
#[cfg(feature = "memory")]
#[tokio::test]
async fn otel_the_observability_example_prints_a_tree_and_serves_metrics() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    let exe = std::env::current_exe().unwrap();
    let example = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("examples").join("observability"))
        .unwrap();
    assert!(
        example.exists(),
        "{} is missing: build it with `cargo build --example observability --features otel`",
        example.display()
    );
    let mut child = tokio::process::Command::new(&example)
        .env("POLYBUS_METRICS_ADDR", "127.0.0.1:0")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut tree, mut in_tree) = (Vec::new(), false);
    let addr = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the example prints within 30 s")
            .unwrap()
            .expect("the example prints its metrics address");
        if line.starts_with("the spans of message") {
            in_tree = true;
        } else if let Some(rest) = line.strip_prefix("metrics: http://") {
            break rest.split('/').next().unwrap().to_owned();
        } else if in_tree && !line.trim().is_empty() {
            tree.push(line);
        }
    };
    // The tree: send at the root, the retries linked, the dead letter's process.
    assert!(
        tree[0]
            .trim_start()
            .starts_with("send user.created [Producer]"),
        "{tree:#?}"
    );
    assert_eq!(
        tree.iter()
            .filter(|l| l.contains("linked: process"))
            .count(),
        2,
        "{tree:#?}"
    );
    assert!(
        tree.iter()
            .any(|l| l.contains("dead_letter user.created [Client]")),
        "{tree:#?}"
    );
    assert!(
        tree.iter()
            .any(|l| l.contains("process polybus.dead-letter.welcome-email")),
        "{tree:#?}"
    );

    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Prometheus's text format: `# TYPE name kind`, then `series value` lines.
    let mut types = std::collections::HashMap::new();
    let mut samples = Vec::new();
    for line in body.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let (name, kind) = t.split_once(' ').unwrap();
            types.insert(name.to_owned(), kind.to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("a number: {line}"));
            samples.push((series.to_owned(), value));
        }
    }
    let sum = |name: &str, having: &str| -> f64 {
        samples
            .iter()
            .filter(|(s, _)| s.starts_with(&format!("{name}{{")) && s.contains(having))
            .map(|(_, v)| v)
            .sum()
    };
    for (name, kind) in [
        ("messaging_client_sent_messages_total", "counter"),
        ("messaging_client_consumed_messages_total", "counter"),
        ("messaging_client_operation_duration_seconds", "histogram"),
        ("messaging_process_duration_seconds", "histogram"),
        ("polybus_dead_letters_total", "counter"),
        ("polybus_redeliveries_total", "counter"),
    ] {
        assert_eq!(
            types.get(name).map(String::as_str),
            Some(kind),
            "{name} in {body}"
        );
    }
    assert_eq!(
        sum(
            "messaging_client_sent_messages_total",
            "messaging_system=\"polybus_memory\""
        ),
        2.0
    );
    let welcome = "messaging_consumer_group_name=\"welcome-email\"";
    assert_eq!(
        sum("messaging_client_consumed_messages_total", welcome),
        4.0,
        "2 + 2 retries"
    );
    assert_eq!(sum("polybus_redeliveries_total", welcome), 2.0);
    assert_eq!(sum("polybus_dead_letters_total", welcome), 1.0);
    assert_eq!(
        sum("messaging_process_duration_seconds_count", welcome),
        4.0
    );
    child.kill().await.unwrap();
}

/// The value of the counter `metric` summed over the points whose attributes
/// include every `(key, value)` of `having`.
fn counted(metric: &str, having: &[(&str, &str)]) -> f64 {
    recorder()
        .metrics()
        .into_iter()
        .filter(|p| p.metric == metric)
        .filter(|p| {
            having
                .iter()
                .all(|(k, v)| p.attribute(k).as_deref() == Some(*v))
        })
        .map(|p| p.value)
        .sum()
}

/// A circuit breaker's state changes are counted by the state entered.
#[tokio::test(start_paused = true)]
async fn otel_circuit_breaker_transitions_are_counted() {
    use polybus::middleware::CircuitBreaker;
    recorder();
    let state = |s: &str| {
        counted(
            "polybus.circuit_breaker.transitions",
            &[("polybus.circuit_breaker.state", s)],
        )
    };
    let before = (state("open"), state("half_open"), state("closed"));
    let breaker = CircuitBreaker::new()
        .failure_threshold(2)
        .recovery_timeout(Duration::from_secs(1));
    for _ in 0..2 {
        breaker.acquire().unwrap().failure();
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    breaker.acquire().unwrap().success(); // the half-open trial
    let after = (state("open"), state("half_open"), state("closed"));
    // Other tests of this binary may move breakers too: at least ours.
    assert!(after.0 >= before.0 + 1.0, "{before:?} -> {after:?}");
    assert!(after.1 >= before.1 + 1.0, "{before:?} -> {after:?}");
    assert!(after.2 >= before.2 + 1.0, "{before:?} -> {after:?}");
}

/// A relay on a loopback port that can drop every connection it carries and
/// goes on accepting new ones: a connection lost, not a broker gone.
#[cfg(feature = "amqp")]
struct Relay {
    port: u16,
    drop_all: tokio::sync::watch::Sender<u64>,
}

#[cfg(feature = "amqp")]
impl Relay {
    async fn start(upstream: &'static str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (drop_all, watch) = tokio::sync::watch::channel(0u64);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut watch = watch.clone();
                watch.mark_unchanged();
                tokio::spawn(async move {
                    let mut server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = watch.changed() => {}
                    }
                });
            }
        });
        Relay { port, drop_all }
    }

    fn drop_connections(&self) {
        self.drop_all.send_modify(|n| *n += 1);
    }
}

/// A RabbitMQ connection lost and made again is counted in `polybus.reconnects`,
/// with the broker it reached.
#[cfg(feature = "amqp")]
#[tokio::test]
async fn otel_a_rabbitmq_reconnect_is_counted() {
    use common::{HOST, VHOST, url};
    if url().is_none() {
        return;
    }
    recorder();
    let relay = Relay::start(HOST).await;
    let port = relay.port.to_string();
    let bus = common::bus(&format!("amqp://guest:guest@127.0.0.1:{port}/{VHOST}")).await;
    let topic = common::unique("otel.reconnect.");
    bus.publish(&topic, Message::new("before")).await.unwrap();
    let having = [
        ("messaging.system", "rabbitmq"),
        ("server.port", port.as_str()),
    ];
    assert_eq!(counted("polybus.reconnects", &having), 0.0);
    relay.drop_connections();
    // The next publish finds the connection gone and makes another.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if bus.publish(&topic, Message::new("after")).await.is_ok()
            && counted("polybus.reconnects", &having) >= 1.0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reconnect counted within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counted("polybus.reconnects", &having), 1.0, "one reconnect");
}

/// A dead letter whose future is dropped before RabbitMQ answers (a caller's
/// time-out) still ends its span, as cancelled, and the `process` span with
/// it: nothing stays counted in flight. (A dead letter, since RabbitMQ acks
/// are coalesced and answer at once.)
#[cfg(feature = "amqp")]
#[tokio::test]
async fn otel_a_settlement_dropped_before_its_answer_ends_its_spans() {
    use common::{unique, url};
    let Some(url) = url() else { return };
    recorder();
    let bus = common::bus(&url).await;
    let topic = unique("otel.cancel.");
    let group = unique("otel-");
    let mut sub = bus
        .subscribe(Subscription::new(topic.clone()).group(group.clone()))
        .await
        .unwrap();
    bus.publish(&topic, Message::new("x")).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // Polled exactly once (the settlement starts), then dropped unanswered.
    // (Not with a zero time-out: tokio's timer rounds it up to the next
    // millisecond, long enough for RabbitMQ to answer on loopback; CI saw it.)
    let first_poll = futures::FutureExt::now_or_never(d.dead_letter("hopeless"));
    assert!(
        first_poll.is_none(),
        "RabbitMQ answered a dead letter within one poll: {first_poll:?}"
    );
    let spans = recorder().spans_of(&topic);
    let dead_letter = spans
        .iter()
        .find(|s| s.attr("messaging.operation.name").as_deref() == Some("dead_letter"))
        .expect("the dead_letter span ended");
    assert_eq!(dead_letter.attr("error.type").as_deref(), Some("cancelled"));
    assert!(
        spans.iter().any(|s| s.is(SpanKind::Consumer)),
        "the process span ended"
    );
    let group_points = recorder()
        .metrics()
        .into_iter()
        .filter(|p| p.metric == "polybus.deliveries.in_flight")
        .filter(|p| p.attribute("messaging.consumer.group.name").as_deref() == Some(group.as_str()))
        .map(|p| p.value)
        .collect::<Vec<_>>();
    assert_eq!(group_points, [0.0], "recorded, and back to zero");
}
