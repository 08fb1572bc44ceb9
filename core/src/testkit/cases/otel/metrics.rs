//! The telemetry cases that read metrics.

use std::time::Duration;

use super::traces::{one, spans, traced_bus};
use crate::telemetry::metric;
use crate::testkit::otel::{Point, SpanView, recorder};
use crate::testkit::{CaseResult, Ctx};
use crate::{Message, Subscription};

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
            operation.is_none() || p.attribute("messaging.operation.name").as_deref() == operation
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
