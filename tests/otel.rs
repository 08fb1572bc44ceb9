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
    assert_eq!(continued.parent_span_id.to_string(), span, "a child of the foreign span");
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
/// second. And a record polybus publishes carries `traceparent` to it.
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
    let script = r#"
import sys
from confluent_kafka import Producer
brokers, topic, traceparent = sys.argv[1:4]
p = Producer({"bootstrap.servers": brokers})
p.produce(topic, value=b"traced", headers=[("traceparent", traceparent.encode())])
p.flush(30)
p.produce(topic, value=b"untraced")
assert p.flush(30) == 0
"#;
    let brokers = url.trim_start_matches("kafka://").split('?').next().unwrap();
    let out = tokio::process::Command::new("python3")
        .args(["-c", script, brokers, &topic, &format!("00-{trace}-{span}-01")])
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
    assert_eq!(own.parent_span_id, process.span_id(), "the handler's span is process's child");
}
