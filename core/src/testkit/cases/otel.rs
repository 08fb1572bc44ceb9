//! The cases of **telemetry** (feature `otel`): spans, trace context and
//! metrics as the OpenTelemetry messaging semantic conventions name them, the
//! same on every backend. They record with the SDK's in-memory exporters
//! ([`crate::testkit::otel`]); where polybus-core is built without feature
//! `otel-testkit` each case is reported skipped, by name.

use crate::testkit::{CaseResult, Ctx};

#[cfg(not(feature = "otel-testkit"))]
fn off(ctx: Ctx) -> CaseResult {
    drop(ctx);
    Err(crate::testkit::CaseError::Skip(
        "polybus-core built without feature `otel-testkit`".into(),
    ))
}

/// A case that needs the SDK: its body with the feature, a skip without.
macro_rules! otel_case {
    ($(#[$doc:meta])* $name:ident, $body:ident) => {
        $(#[$doc])*
        pub async fn $name(ctx: Ctx) -> CaseResult {
            #[cfg(feature = "otel-testkit")]
            return on::$body(ctx).await;
            #[cfg(not(feature = "otel-testkit"))]
            return off(ctx);
        }
    };
}

otel_case!(
    /// One message's `send`, `process` and `ack` spans form one trace: the
    /// process span is the send span's child and links to it, the ack span is
    /// the process span's child; names, kinds and attributes as the conventions
    /// list them; the message carries `traceparent`.
    otel_send_process_ack_are_one_trace,
    send_process_ack_are_one_trace
);

otel_case!(
    /// A batch publish is one `send` span with `messaging.batch.message_count`;
    /// each message of a batch taken with `next_batch` gets a root `process`
    /// span linked to it.
    otel_a_batch_is_one_send_span_and_its_deliveries_link_to_it,
    batch_links
);

otel_case!(
    /// A redelivered message keeps its creation context: the retry's `process`
    /// span (attempt 2) links to the original `send` span; the `nack` span and
    /// the failed first `process` span say so.
    otel_a_redelivery_keeps_the_creation_context,
    redelivery_keeps_context
);

otel_case!(
    /// A dead letter carries its creation context: its `process` span in the
    /// dead-letter group belongs to the original trace; the `dead_letter` span
    /// carries the reason.
    otel_a_dead_letter_carries_the_creation_context,
    dead_letter_keeps_context
);

otel_case!(
    /// A settlement that fails has its `error.type` on the settlement span and
    /// in the operation-duration metric.
    otel_a_failed_settlement_has_its_error_type,
    failed_settlement
);

otel_case!(
    /// The metrics count every message once, with the conventions' names, units
    /// and attributes: sent, consumed, operation and process durations,
    /// redeliveries, dead letters, deliveries in flight back to zero.
    otel_metrics_count_each_message_once,
    metrics_count_once
);

otel_case!(
    /// `polybus.group.depth` reports what waits for a group while it waits
    /// (memory and RabbitMQ: the group's queue; Kafka: each partition's lag
    /// behind the committed offset), and falls to zero once all is acked;
    /// deliveries fetched ahead have no `process` span until handed out.
    otel_group_depth_follows_what_waits,
    group_depth
);

#[cfg(feature = "otel-testkit")]
mod on {
    use std::time::Duration;

    use opentelemetry::trace::{SpanId, SpanKind};
    use opentelemetry_sdk::trace::SpanData;

    use crate::names::CORRELATION_ID;
    use crate::telemetry::metric;
    use crate::testkit::otel::{Point, SpanView, recorder};
    use crate::testkit::{CaseResult, Ctx};
    use crate::{Bus, Message, Subscription};

    /// The case's bus, made after the recorder is installed.
    async fn traced_bus(ctx: &Ctx) -> crate::Result<Bus> {
        recorder();
        ctx.connect().await
    }

    /// The case's spans of `operation` (`messaging.operation.name`).
    fn spans(ctx: &Ctx, operation: &str) -> Vec<SpanData> {
        recorder()
            .spans_of(&ctx.ns)
            .into_iter()
            .filter(|s| s.attr("messaging.operation.name").as_deref() == Some(operation))
            .collect()
    }

    fn one(ctx: &Ctx, operation: &str) -> SpanData {
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

    pub(super) async fn failed_settlement(ctx: Ctx) -> CaseResult {
        let bus = traced_bus(&ctx).await?;
        let topic = ctx.topic("late");
        let mut s = bus
            .subscribe(Subscription::new(topic.clone()).group(ctx.group("g")))
            .await?;
        bus.publish(&topic, Message::new("slow work")).await?;
        let d = ctx.recv(&mut s).await;
        s.close(Duration::from_millis(100)).await?;
        let e = d.ack().await.expect_err("an ack after close fails (C10)");
        assert!(e.is_closed(), "{e}");

        let ack = one(&ctx, "ack");
        assert_eq!(ack.attr("error.type").as_deref(), Some("closed"));
        assert!(matches!(
            ack.status,
            opentelemetry::trace::Status::Error { .. }
        ));
        let failed: Vec<Point> = recorder()
            .metrics()
            .into_iter()
            .filter(|p| p.metric == metric::OPERATION_DURATION && of(&ctx, p))
            .filter(|p| p.attribute("messaging.operation.name").as_deref() == Some("ack"))
            .collect();
        assert_eq!(failed.len(), 1, "{failed:#?}");
        assert_eq!(failed[0].attribute("error.type").as_deref(), Some("closed"));
        Ok(())
    }

    /// Whether a data point is of this case's names.
    fn of(ctx: &Ctx, p: &Point) -> bool {
        p.attribute("messaging.destination.name")
            .is_some_and(|d| d.contains(&ctx.ns))
    }

    /// The sum of this case's points of `metric` whose `operation` matches.
    fn total(ctx: &Ctx, points: &[Point], metric: &str, operation: Option<&str>) -> f64 {
        points
            .iter()
            .filter(|p| p.metric == metric && of(ctx, p))
            .filter(|p| {
                operation.is_none()
                    || p.attribute("messaging.operation.name").as_deref() == operation
            })
            .map(|p| p.value)
            .sum()
    }

    /// The group's depth as last collected: the sum of its points.
    fn depth(group: &str) -> (f64, Vec<Point>) {
        let points: Vec<Point> = recorder()
            .metrics()
            .into_iter()
            .filter(|p| p.metric == metric::GROUP_DEPTH)
            .filter(|p| p.attribute("messaging.consumer.group.name").as_deref() == Some(group))
            .collect();
        (points.iter().map(|p| p.value).sum(), points)
    }

    /// Wait until the group's depth satisfies `wanted`; fail with what was seen.
    async fn depth_until(ctx: &Ctx, group: &str, what: &str, wanted: impl Fn(f64) -> bool) {
        let deadline = tokio::time::Instant::now() + ctx.target().patience();
        loop {
            let (depth, points) = depth(group);
            if !points.is_empty() && wanted(depth) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: the depth of `{group}` never became {what}: {points:#?}",
                ctx.label
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub(super) async fn group_depth(ctx: Ctx) -> CaseResult {
        let bus = traced_bus(&ctx).await?;
        let topic = ctx.topic("deep");
        let group = ctx.group("g");
        let mut s = bus
            .subscribe(Subscription::new(topic.clone()).group(&group).prefetch(1))
            .await?;
        for i in 0..5 {
            bus.publish(&topic, Message::new(format!("m{i}"))).await?;
        }
        // One acked, so Kafka has a committed offset to count the lag from.
        // Four wait; what a backend reports of them is what it last knew (a
        // Kafka member paused at its prefetch knows the high watermark of its
        // last fetch), so the case asks for some, not for four.
        ctx.recv(&mut s).await.ack().await?;
        depth_until(&ctx, &group, "at least 1", |d| d >= 1.0).await;
        // Whatever the backend fetched ahead, only what was handed out has a span.
        assert_eq!(
            spans(&ctx, "process").len(),
            1,
            "{}: prefetched deliveries have no span",
            ctx.label
        );
        let (_, points) = depth(&group);
        for p in &points {
            assert_eq!(p.unit, "{message}");
            let system = p.attribute("messaging.system").expect("messaging.system");
            if system == "kafka" {
                assert!(
                    p.attribute("messaging.destination.partition.id").is_some(),
                    "{p:?}"
                );
            }
        }
        for _ in 0..4 {
            ctx.recv(&mut s).await.ack().await?;
        }
        depth_until(&ctx, &group, "0", |d| d == 0.0).await;
        Ok(())
    }

    pub(super) async fn metrics_count_once(ctx: Ctx) -> CaseResult {
        let bus = traced_bus(&ctx).await?;
        let topic = ctx.topic("counted");
        let group = ctx.group("g");
        let mut s = bus
            .subscribe(
                Subscription::new(topic.clone())
                    .group(&group)
                    .retry(ctx.fast_retry()),
            )
            .await?;
        for payload in ["ack", "nack-once", "dead"] {
            bus.publish(&topic, Message::new(payload)).await?;
        }
        let mut settled = 0;
        while settled < 3 {
            let d = ctx.recv(&mut s).await;
            match (d.message().payload().as_ref(), d.attempt()) {
                (b"nack-once", 1) => d.nack().await?,
                (b"dead", _) => {
                    d.dead_letter("hopeless").await?;
                    settled += 1;
                }
                _ => {
                    d.ack().await?;
                    settled += 1;
                }
            }
        }

        let points = recorder().metrics();
        let total = |metric, operation| total(&ctx, &points, metric, operation);
        assert_eq!(total(metric::SENT, Some("send")), 3.0, "sent");
        assert_eq!(total(metric::CONSUMED, Some("process")), 4.0, "consumed");
        assert_eq!(total(metric::OPERATION_DURATION, Some("send")), 3.0);
        assert_eq!(total(metric::OPERATION_DURATION, Some("ack")), 2.0);
        assert_eq!(total(metric::OPERATION_DURATION, Some("nack")), 1.0);
        assert_eq!(total(metric::OPERATION_DURATION, Some("dead_letter")), 1.0);
        assert_eq!(total(metric::PROCESS_DURATION, Some("process")), 4.0);
        assert_eq!(total(metric::REDELIVERIES, None), 1.0, "redeliveries");
        assert_eq!(total(metric::DEAD_LETTERS, Some("dead_letter")), 1.0);
        assert_eq!(total(metric::DELIVERIES_IN_FLIGHT, None), 0.0, "in flight");
        assert_eq!(total(metric::PUBLISHES_IN_FLIGHT, Some("send")), 0.0);
        for gauge in [metric::DELIVERIES_IN_FLIGHT, metric::PUBLISHES_IN_FLIGHT] {
            assert!(
                points.iter().any(|p| p.metric == gauge && of(&ctx, p)),
                "{}: {gauge} recorded",
                ctx.label
            );
        }

        // The operations' metrics (the depth gauge, checked in its own case,
        // names no operation).
        for p in points
            .iter()
            .filter(|p| of(&ctx, p) && p.metric != metric::GROUP_DEPTH)
        {
            let unit = match p.metric.as_str() {
                metric::OPERATION_DURATION | metric::PROCESS_DURATION => "s",
                _ => "{message}",
            };
            assert_eq!(p.unit, unit, "{}: unit of {}", ctx.label, p.metric);
            let system = p.attribute("messaging.system").expect("messaging.system");
            assert!(p.attribute("messaging.operation.name").is_some(), "{p:?}");
            if system != "polybus_memory" {
                assert!(p.attribute("server.address").is_some(), "{p:?}");
                assert!(p.attribute("server.port").is_some(), "{p:?}");
            }
            if p.metric == metric::CONSUMED || p.metric == metric::PROCESS_DURATION {
                assert_eq!(
                    p.attribute("messaging.consumer.group.name").as_deref(),
                    Some(group.as_str())
                );
            }
        }
        let failed = points
            .iter()
            .filter(|p| p.metric == metric::PROCESS_DURATION && of(&ctx, p))
            .filter_map(|p| p.attribute("error.type").map(|e| (e, p.value)))
            .collect::<Vec<_>>();
        assert!(failed.contains(&("nack".into(), 1.0)), "{failed:?}");
        assert!(failed.contains(&("dead_letter".into(), 1.0)), "{failed:?}");
        Ok(())
    }
}
