//! The telemetry cases that read spans and trace context.

use std::time::Duration;

use opentelemetry::trace::{SpanId, SpanKind};
use opentelemetry_sdk::trace::SpanData;

use crate::names::CORRELATION_ID;
use crate::testkit::otel::{SpanView, recorder};
use crate::testkit::{CaseResult, Ctx};
use crate::{Bus, Message, Subscription};

/// The case's bus, made after the recorder is installed.
pub(super) async fn traced_bus(ctx: &Ctx) -> crate::Result<Bus> {
    recorder();
    ctx.connect().await
}

/// The case's spans of `operation` (`messaging.operation.name`).
pub(super) fn spans(ctx: &Ctx, operation: &str) -> Vec<SpanData> {
    recorder()
        .spans_of(&ctx.ns)
        .into_iter()
        .filter(|s| s.attr("messaging.operation.name").as_deref() == Some(operation))
        .collect()
}

pub(super) fn one(ctx: &Ctx, operation: &str) -> SpanData {
    let mut found = spans(ctx, operation);
    assert_eq!(
        found.len(),
        1,
        "{}: one `{operation}` span: {found:#?}",
        ctx.label
    );
    found.remove(0)
}

/// Checks every span of the case has: its name from operation and
/// destination, its kind, the system, and the server unless in memory.
fn common(ctx: &Ctx, span: &SpanData, kind: SpanKind, operation_type: &str, topic: &str) {
    let operation = span.attr("messaging.operation.name").unwrap();
    let destination = span.attr("messaging.destination.name").unwrap();
    assert!(
        destination == topic || destination.ends_with(&format!(":{topic}")),
        "{}: destination `{destination}` names topic `{topic}`",
        ctx.label
    );
    assert_eq!(
        span.name,
        format!("{operation} {destination}"),
        "{}",
        ctx.label
    );
    assert!(
        span.is(kind.clone()),
        "{}: `{}` is {kind:?}",
        ctx.label,
        span.name
    );
    assert_eq!(
        span.attr("messaging.operation.type").as_deref(),
        Some(operation_type)
    );
    let system = span.attr("messaging.system").expect("messaging.system");
    assert!(
        ["polybus_memory", "rabbitmq", "kafka"].contains(&system.as_str()),
        "{}: messaging.system `{system}`",
        ctx.label
    );
    if system != "polybus_memory" {
        assert!(
            span.attr("server.address").is_some(),
            "{}: server.address",
            ctx.label
        );
        assert!(
            span.attr("server.port").is_some(),
            "{}: server.port",
            ctx.label
        );
    }
    if system == "rabbitmq" {
        assert!(
            destination.ends_with(&format!(":{topic}")),
            "{}: `{{exchange}}:{{routing key}}`, not `{destination}`",
            ctx.label
        );
        assert_eq!(
            span.attr("messaging.rabbitmq.destination.routing_key")
                .as_deref(),
            (operation_type != "settle").then_some(topic),
            "{}: routing key on `{}`",
            ctx.label,
            span.name
        );
    }
}

/// The trace id a message's `traceparent` header names.
fn traceparent_trace(m: &Message) -> String {
    let tp = m
        .header("traceparent")
        .expect("the message carries traceparent");
    tp.split('-')
        .nth(1)
        .expect("traceparent has a trace id")
        .to_owned()
}

pub(super) async fn send_process_ack_are_one_trace(ctx: Ctx) -> CaseResult {
    let bus = traced_bus(&ctx).await?;
    let topic = ctx.topic("user.created");
    let group = ctx.group("audit");
    let mut s = bus
        .subscribe(Subscription::new(topic.clone()).group(&group))
        .await?;
    let m = Message::new("u1")
        .with_key("u1")
        .with_header(CORRELATION_ID, "conversation-1");
    let id = m.id().to_owned();
    bus.publish(&topic, m).await?;
    let d = ctx.recv(&mut s).await;
    let carried = traceparent_trace(d.message());
    d.ack().await?;

    let send = one(&ctx, "send");
    let process = one(&ctx, "process");
    let ack = one(&ctx, "ack");
    common(&ctx, &send, SpanKind::Producer, "send", &topic);
    common(&ctx, &process, SpanKind::Consumer, "process", &topic);
    common(&ctx, &ack, SpanKind::Client, "settle", &topic);

    assert_eq!(
        carried,
        send.trace_id().to_string(),
        "traceparent is the send's"
    );
    assert_eq!(process.trace_id(), send.trace_id(), "one trace");
    assert_eq!(
        process.parent_span_id,
        send.span_id(),
        "process is send's child"
    );
    assert!(
        process
            .linked()
            .contains(&(send.trace_id(), send.span_id()))
    );
    assert_eq!(ack.trace_id(), send.trace_id());
    assert_eq!(
        ack.parent_span_id,
        process.span_id(),
        "ack is process's child"
    );

    for span in [&send, &process] {
        assert_eq!(
            span.attr("messaging.message.id").as_deref(),
            Some(id.as_str())
        );
        assert_eq!(
            span.attr("messaging.message.conversation_id").as_deref(),
            Some("conversation-1")
        );
        assert_eq!(
            span.attr("messaging.message.body.size").as_deref(),
            Some("2")
        );
    }
    for span in [&process, &ack] {
        assert_eq!(
            span.attr("messaging.consumer.group.name").as_deref(),
            Some(group.as_str())
        );
    }
    assert_eq!(process.attr("polybus.attempt").as_deref(), Some("1"));
    match process.attr("messaging.system").as_deref() {
        Some("kafka") => {
            assert!(process.attr("messaging.destination.partition.id").is_some());
            assert!(process.attr("messaging.kafka.offset").is_some());
            assert_eq!(
                process.attr("messaging.kafka.message.key").as_deref(),
                Some("u1")
            );
        }
        Some("rabbitmq") => {
            assert!(
                process
                    .attr("messaging.rabbitmq.message.delivery_tag")
                    .is_some()
            );
        }
        _ => {}
    }
    assert!(
        process.end_time >= ack.end_time,
        "process ends with its settlement"
    );
    Ok(())
}

pub(super) async fn batch_links(ctx: Ctx) -> CaseResult {
    let bus = traced_bus(&ctx).await?;
    let topic = ctx.topic("batch");
    let mut s = bus
        .subscribe(Subscription::new(topic.clone()).group(ctx.group("g")))
        .await?;
    let batch = (0..3).map(|i| Message::new(format!("m{i}"))).collect();
    for r in bus.publish_batch(&topic, batch).await {
        r?;
    }
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + ctx.target().patience();
    while got.len() < 3 && tokio::time::Instant::now() < deadline {
        got.extend(
            s.next_batch(3 - got.len(), Duration::from_millis(500))
                .await?,
        );
    }
    assert_eq!(got.len(), 3, "{}: the batch arrives", ctx.label);
    let carried: Vec<String> = got.iter().map(|d| traceparent_trace(d.message())).collect();
    for d in got {
        d.ack().await?;
    }

    let send = one(&ctx, "send");
    common(&ctx, &send, SpanKind::Producer, "send", &topic);
    assert_eq!(
        send.attr("messaging.batch.message_count").as_deref(),
        Some("3")
    );
    assert_eq!(
        send.attr("messaging.message.id"),
        None,
        "no one message's id on a batch"
    );
    let processes = spans(&ctx, "process");
    assert_eq!(
        processes.len(),
        3,
        "{}: a process span per delivery",
        ctx.label
    );
    for p in &processes {
        common(&ctx, p, SpanKind::Consumer, "process", &topic);
        assert_eq!(
            p.parent_span_id,
            SpanId::INVALID,
            "a batched delivery's span is a root"
        );
        assert!(
            p.linked().contains(&(send.trace_id(), send.span_id())),
            "{}: `{}` links to the send",
            ctx.label,
            p.name
        );
    }
    for c in carried {
        assert_eq!(c, send.trace_id().to_string());
    }
    Ok(())
}

pub(super) async fn redelivery_keeps_context(ctx: Ctx) -> CaseResult {
    let bus = traced_bus(&ctx).await?;
    let topic = ctx.topic("retried");
    let mut s = bus
        .subscribe(
            Subscription::new(topic.clone())
                .group(ctx.group("g"))
                .retry(ctx.fast_retry()),
        )
        .await?;
    bus.publish(&topic, Message::new("again")).await?;
    let first = ctx.recv(&mut s).await;
    let carried = first.message().header("traceparent").map(str::to_owned);
    first.nack().await?;
    let second = ctx.recv(&mut s).await;
    assert_eq!(second.attempt(), 2);
    assert_eq!(
        second.message().header("traceparent").map(str::to_owned),
        carried,
        "{}: the redelivery carries the original context",
        ctx.label
    );
    second.ack().await?;

    let send = one(&ctx, "send");
    let nack = one(&ctx, "nack");
    common(&ctx, &nack, SpanKind::Client, "settle", &topic);
    let mut processes = spans(&ctx, "process");
    processes.sort_by_key(|p| p.attr("polybus.attempt"));
    assert_eq!(processes.len(), 2, "{}: {processes:#?}", ctx.label);
    let (p1, p2) = (&processes[0], &processes[1]);
    assert_eq!(p1.attr("polybus.attempt").as_deref(), Some("1"));
    assert_eq!(p1.parent_span_id, send.span_id());
    assert_eq!(
        p1.attr("error.type").as_deref(),
        Some("nack"),
        "the failed attempt"
    );
    assert_eq!(nack.parent_span_id, p1.span_id());
    assert_eq!(p2.attr("polybus.attempt").as_deref(), Some("2"));
    assert_eq!(
        p2.parent_span_id,
        SpanId::INVALID,
        "a retry's span is a root"
    );
    assert!(p2.linked().contains(&(send.trace_id(), send.span_id())));
    assert_eq!(p2.attr("error.type"), None);
    Ok(())
}

pub(super) async fn dead_letter_keeps_context(ctx: Ctx) -> CaseResult {
    let bus = traced_bus(&ctx).await?;
    let topic = ctx.topic("poison");
    let group = ctx.group("g");
    let mut s = bus
        .subscribe(Subscription::new(topic.clone()).group(&group))
        .await?;
    let mut dlq = bus.subscribe(Subscription::dead_letters_of(&group)).await?;
    bus.publish(&topic, Message::new("bad")).await?;
    let d = ctx.recv(&mut s).await;
    let carried = d.message().header("traceparent").map(str::to_owned);
    d.dead_letter("card declined").await?;
    let dead = ctx.recv(&mut dlq).await;
    assert_eq!(
        dead.message().header("traceparent").map(str::to_owned),
        carried,
        "{}: the dead letter carries the original context",
        ctx.label
    );
    dead.ack().await?;

    let send = one(&ctx, "send");
    let dead_letter = one(&ctx, "dead_letter");
    common(&ctx, &dead_letter, SpanKind::Client, "settle", &topic);
    assert_eq!(
        dead_letter.attr("polybus.dead_letter.reason").as_deref(),
        Some("card declined")
    );
    let processes = spans(&ctx, "process");
    assert_eq!(processes.len(), 2, "{}: {processes:#?}", ctx.label);
    let dead_letter_topic = crate::names::dead_letter_topic(&group);
    let in_dlq = processes
        .iter()
        .find(|p| {
            p.attr("messaging.destination.name")
                .is_some_and(|d| d.ends_with(dead_letter_topic.as_str()))
        })
        .expect("a process span in the dead-letter group");
    assert_eq!(
        in_dlq.trace_id(),
        send.trace_id(),
        "the dead letter's trace"
    );
    assert_eq!(in_dlq.parent_span_id, send.span_id());
    assert_eq!(dead_letter.trace_id(), send.trace_id());
    Ok(())
}
