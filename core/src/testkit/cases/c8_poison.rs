//! The cases of **C8 Poison messages**: "After `max_attempts` a message is dead-
//! lettered, never requeued forever; redelivery never spins without a delay."
//!
//! The handler runtime's whole story (panic, retry, success) is proven here too.

use std::time::Duration;

use futures::StreamExt;

use super::support::until_consuming;
use crate::testkit::{CaseResult, Ctx};
use crate::{Capability, DeliveryStream, Message, RetryPolicy, Subscription, header};

/// A durable group on the case's topic `x` with fast retries and `attempts`
/// attempts, and its name.
async fn retrying_group(ctx: &Ctx, attempts: u32) -> crate::Result<(String, DeliveryStream)> {
    let group = ctx.group("g");
    let sub = Subscription::new(ctx.topic("x"))
        .group(group.clone())
        .retry(ctx.fast_retry().max_attempts(attempts));
    Ok((group, ctx.bus().subscribe(sub).await?))
}

/// C8: after `max_attempts` nacks the message is dead-lettered, not requeued.
pub async fn c8_dead_lettered_after_max_attempts(ctx: Ctx) -> CaseResult {
    let (group, mut s) = retrying_group(&ctx, 3).await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("poison"))
        .await?;
    for attempt in 1..=3 {
        let d = ctx.recv(&mut s).await;
        assert_eq!(d.attempt(), attempt);
        d.nack().await?;
    }
    ctx.expect_quiet(&mut s).await;
    let mut dlq = ctx
        .bus()
        .subscribe(Subscription::dead_letters_of(&group))
        .await?;
    let d = ctx.recv(&mut dlq).await;
    assert_eq!(d.message().payload().as_ref(), b"poison");
    assert_eq!(d.message().header(header::ATTEMPTS), Some("3"));
    let reason = d
        .message()
        .header(header::DEAD_LETTER_REASON)
        .unwrap_or_default();
    assert!(reason.contains("3 attempts"), "reason: {reason}");
    assert_eq!(
        reason, "gave up after 3 attempts",
        "a plain nack gives no cause"
    );
    d.ack().await?;
    Ok(())
}

/// C8: a message whose attempts ran out after failures with a known error is
/// dead-lettered with that error in the reason and, alone, in
/// `polybus-last-error`; an explicit dead letter carries no last error.
pub async fn c8_the_last_error_is_kept_in_its_own_header(ctx: Ctx) -> CaseResult {
    let (group, mut s) = retrying_group(&ctx, 2).await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("flaky"))
        .await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("hopeless"))
        .await?;
    let mut pending = 3;
    while pending > 0 {
        let d = ctx.recv(&mut s).await;
        pending -= 1;
        if d.message().payload().as_ref() == b"hopeless" {
            d.dead_letter("no such customer").await?;
        } else {
            d.nack_because("smtp 451").await?;
        }
    }
    let mut dlq = ctx
        .bus()
        .subscribe(Subscription::dead_letters_of(&group))
        .await?;
    let mut dead = std::collections::BTreeMap::new();
    for m in ctx.recv_acked(&mut dlq, 2).await {
        let h = |name| m.header(name).map(str::to_owned);
        let payload = String::from_utf8_lossy(m.payload()).into_owned();
        dead.insert(
            payload,
            (h(header::DEAD_LETTER_REASON), h(header::LAST_ERROR)),
        );
    }
    let reason = |r: &str| Some(r.to_owned());
    assert_eq!(
        dead["flaky"],
        (
            reason("gave up after 2 attempts: smtp 451"),
            reason("smtp 451")
        )
    );
    assert_eq!(dead["hopeless"], (reason("no such customer"), None));
    Ok(())
}

/// C8 (capability `virtual-time`): the delays between attempts follow the
/// exponential policy, to tokio's timer granularity of one millisecond.
pub async fn c8_backoff_grows_between_attempts(ctx: Ctx) -> CaseResult {
    ctx.require(Capability::VirtualTime)?;
    tokio::time::pause();
    let policy = RetryPolicy::exponential(Duration::from_secs(1))
        .max_delay(Duration::from_secs(5))
        .max_attempts(5)
        .jitter(false);
    let mut s = ctx
        .bus()
        .subscribe(
            Subscription::new(ctx.topic("x"))
                .group(ctx.group("g"))
                .retry(policy),
        )
        .await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("flaky"))
        .await?;
    let mut last = tokio::time::Instant::now();
    let mut waits = Vec::new();
    for attempt in 1..=5 {
        let d = tokio::time::timeout(Duration::from_secs(60), s.next())
            .await
            .expect("redelivered within a minute of virtual time")
            .expect("open")?;
        assert_eq!(d.attempt(), attempt);
        if attempt > 1 {
            waits.push(last.elapsed().as_millis());
        }
        last = tokio::time::Instant::now();
        d.nack().await?;
    }
    for (wait, expected) in waits.iter().zip([1000, 2000, 4000, 5000]) {
        assert!((expected..=expected + 1).contains(wait), "waits {waits:?}");
    }
    Ok(())
}

/// C8/C9: a message whose consumer dies on it every time is dead-lettered after
/// `max_attempts` deliveries, not redelivered forever.
pub async fn c8_crash_loop_reaches_the_dead_letter_topic(ctx: Ctx) -> CaseResult {
    let group = ctx.group("g");
    let sub = || {
        Subscription::new(ctx.topic("x"))
            .group(group.clone())
            .retry(ctx.fast_retry().max_attempts(2))
    };
    let mut dlq = ctx
        .bus()
        .subscribe(Subscription::dead_letters_of(&group))
        .await?;
    ctx.bus()
        .subscribe(sub())
        .await?
        .close(Duration::ZERO)
        .await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("crasher"))
        .await?;
    for _ in 0..2 {
        let conn = ctx.connect().await?;
        let mut s = conn.subscribe(sub()).await?;
        let d = ctx.recv(&mut s).await;
        // The consumer dies holding it: stream and connection go first.
        drop(s);
        drop(conn);
        drop(d);
    }
    // A live member sees the exhausted message (on RabbitMQ the broker requeues
    // it, and only a consumer can tell it ran out of attempts): keep polling it
    // until the dead letter comes, however long the broker takes to hand the
    // message back; it must never be handed the message.
    let mut s = ctx.bus().subscribe(sub()).await?;
    let patience = ctx.target().patience();
    let deadline = tokio::time::Instant::now() + patience;
    let dead = tokio::select! {
        d = dlq.next() => d.expect("the dead-letter stream is open")?,
        item = s.next() => match item.expect("the live member's stream is open") {
            Ok(d) => panic!(
                "the exhausted message was handed to a consumer (attempt {})",
                d.attempt()
            ),
            Err(e) => return Err(e.into()),
        },
        () = tokio::time::sleep_until(deadline) => panic!("no dead letter within {patience:?}"),
    };
    assert_eq!(dead.message().payload().as_ref(), b"crasher");
    assert_eq!(dead.message().header(header::ATTEMPTS), Some("2"));
    dead.ack().await?;
    ctx.expect_quiet(&mut s).await;
    Ok(())
}

/// C7/C8 (runtime): the whole story. A handler panics on A, fails twice on B and
/// succeeds on C: A is retried, then dead-lettered after its last attempt; B is
/// handled on attempt 3; C is acked once; nothing is lost, and no redelivery
/// comes without the retry delay.
pub async fn c8_runtime_story_panic_retry_success(ctx: Ctx) -> CaseResult {
    use crate::consumer::{Consumer, HandlerError};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    let group = ctx.group("story");
    let delay = Duration::from_millis(200);
    let mut dlq = ctx
        .bus()
        .subscribe(Subscription::dead_letters_of(&group))
        .await?;
    let calls: Arc<Mutex<HashMap<String, Vec<tokio::time::Instant>>>> = Arc::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer = Consumer::new(
        ctx.bus().clone(),
        Subscription::new(ctx.topic("story")).group(group.clone()),
    )
    .retry(RetryPolicy::fixed(delay).max_attempts(3))
    .concurrency(4)
    .grace(Duration::from_secs(5))
    .shutdown_on(async move {
        let _ = stopped.await;
    });
    let seen = calls.clone();
    let mut run = tokio::spawn(consumer.run(move |m: Message| {
        let seen = seen.clone();
        async move {
            let name = String::from_utf8_lossy(m.payload()).into_owned();
            let n = {
                let mut calls = seen.lock().unwrap();
                let times = calls.entry(name.clone()).or_default();
                times.push(tokio::time::Instant::now());
                times.len()
            };
            match name.as_str() {
                "A" => panic!("handler panics on A (expected by the test)"),
                "B" if n < 3 => Err(HandlerError::retry(format!("B fails on call {n}"))),
                _ => Ok(()),
            }
        }
    }));
    // Subscribing happens inside run(), and a new group starts at "now": probe
    // until the runtime has handled one, however long its subscribe takes.
    let probing = async {
        while !calls.lock().unwrap().contains_key("probe") {
            ctx.bus()
                .publish(&ctx.topic("story"), Message::new("probe"))
                .await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        CaseResult::Ok(())
    };
    until_consuming(&mut run, probing).await?;
    for name in ["A", "B", "C"] {
        ctx.bus()
            .publish(&ctx.topic("story"), Message::new(name).with_key(name))
            .await?;
    }
    let dead = ctx.recv(&mut dlq).await;
    assert_eq!(dead.message().payload().as_ref(), b"A");
    assert_eq!(dead.message().header(header::ATTEMPTS), Some("3"));
    dead.ack().await?;
    // B's third call and C's call need not have come by A's dead letter: wait
    // for them (the shutdown lets a running handler settle), then a quiet moment.
    let deadline = tokio::time::Instant::now() + ctx.target().patience();
    let calls_of = |name: &str| calls.lock().unwrap().get(name).map_or(0, Vec::len);
    while calls_of("B") < 3 || calls_of("C") < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B was not retried to its third attempt, or C was not handled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(ctx.target().quiet()).await;
    let _ = stop.send(());
    let stats = run.await.expect("the runtime survives handler panics")?;

    let calls = calls.lock().unwrap();
    assert_eq!(calls["A"].len(), 3, "A: one call per attempt");
    assert_eq!(calls["B"].len(), 3, "B: handled on attempt 3");
    assert_eq!(calls["C"].len(), 1, "C: acked once");
    for name in ["A", "B"] {
        for pair in calls[name].windows(2) {
            let waited = pair[1] - pair[0];
            assert!(
                waited >= delay,
                "{name} came back after {waited:?}, the delay is {delay:?}"
            );
        }
    }
    assert_eq!(stats.panicked, 3, "{stats:?}");
    assert!(stats.acked >= 2, "B and C (and the probes): {stats:?}");
    assert_eq!(stats.nacked, 5, "A three times, B twice: {stats:?}");
    Ok(())
}
