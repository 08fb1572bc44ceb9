//! The cases of **C6 Prefetch**: "A subscription never holds more than `prefetch`
//! unsettled deliveries."

use std::time::Duration;

use super::support::payloads;
use crate::testkit::{CaseResult, Ctx};
use crate::{Message, RetryPolicy, Subscription};

/// C6: a subscription never holds more than `prefetch` unsettled deliveries.
pub async fn c6_never_more_than_prefetch_unsettled(ctx: Ctx) -> CaseResult {
    let mut sub = ctx
        .bus()
        .subscribe(
            Subscription::new(ctx.topic("p"))
                .group(ctx.group("g"))
                .prefetch(3),
        )
        .await?;
    for i in 0..10 {
        ctx.bus()
            .publish(&ctx.topic("p"), Message::new(format!("m{i}")).with_key("k"))
            .await?;
    }
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(ctx.recv(&mut sub).await);
    }
    ctx.expect_quiet(&mut sub).await;
    held.remove(0).ack().await?;
    held.push(ctx.recv(&mut sub).await);
    ctx.expect_quiet(&mut sub).await;
    for d in held {
        d.ack().await?;
    }
    let rest = ctx.recv_acked(&mut sub, 6).await;
    assert_eq!(payloads(&rest), ["m4", "m5", "m6", "m7", "m8", "m9"]);
    Ok(())
}

/// C6: a nack or a dead letter frees a slot just as an ack does.
pub async fn c6_any_settlement_frees_a_slot(ctx: Ctx) -> CaseResult {
    let mut sub = ctx
        .bus()
        .subscribe(
            Subscription::new(ctx.topic("p"))
                .group(ctx.group("g"))
                .prefetch(1)
                .retry(RetryPolicy::fixed(Duration::from_secs(30))),
        )
        .await?;
    for p in ["a", "b", "c"] {
        ctx.bus()
            .publish(&ctx.topic("p"), Message::new(p).with_key("k"))
            .await?;
    }
    let a = ctx.recv(&mut sub).await;
    ctx.expect_quiet(&mut sub).await;
    a.dead_letter("not wanted").await?;
    let b = ctx.recv(&mut sub).await;
    assert_eq!(b.message().payload().as_ref(), b"b");
    b.nack().await?;
    let c = ctx.recv(&mut sub).await;
    assert_eq!(c.message().payload().as_ref(), b"c");
    c.ack().await?;
    Ok(())
}

/// C6 (batches): `next_batch` returns up to `max`, within its time-out, and never
/// more than the prefetch allows unsettled.
pub async fn c6_next_batch_gathers_up_to_max_within_the_prefetch(ctx: Ctx) -> CaseResult {
    let mut s = ctx
        .bus()
        .subscribe(
            Subscription::new(ctx.topic("b"))
                .group(ctx.group("g"))
                .prefetch(4),
        )
        .await?;
    let batch: Vec<Message> = (0..10)
        .map(|i| Message::new(format!("m{i}")).with_key("k"))
        .collect();
    for r in ctx.bus().publish_batch(&ctx.topic("b"), batch).await {
        r?;
    }
    let wait = ctx.target().patience();
    // Gather for a while: the prefetch (4) caps the first batch, however large `max`.
    let mut first = Vec::new();
    while first.len() < 4 {
        first.extend(s.next_batch(10, ctx.target().quiet()).await?);
    }
    assert_eq!(first.len(), 4, "more unsettled than the prefetch");
    assert!(s.next_batch(10, ctx.target().quiet()).await?.is_empty());
    let mut seen: Vec<String> = Vec::new();
    for d in first {
        seen.push(String::from_utf8_lossy(d.message().payload()).into_owned());
        d.ack().await?;
    }
    while seen.len() < 10 {
        let batch = s.next_batch(3, wait).await?;
        assert!(
            !batch.is_empty() && batch.len() <= 3,
            "batch of {}",
            batch.len()
        );
        for d in batch {
            seen.push(String::from_utf8_lossy(d.message().payload()).into_owned());
            d.ack().await?;
        }
    }
    let expected: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(seen, expected);
    // Nothing left: an empty batch once the time-out passes.
    let started = tokio::time::Instant::now();
    assert!(s.next_batch(5, ctx.target().quiet()).await?.is_empty());
    assert!(started.elapsed() >= ctx.target().quiet());
    Ok(())
}
