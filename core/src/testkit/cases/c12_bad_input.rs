//! The cases of **C12 Bad input**: "Oversize payloads, invalid names, undecodable
//! payloads (dead-lettered with the decode error as reason), refused connections,
//! bad credentials and unreachable brokers each give a clear, typed error within a
//! bounded time; nothing already accepted is lost."
//!
//! The handler runtime's dead letters for undecodable payloads and permanent errors
//! are proven here too.

use std::time::Duration;

use super::support::{payloads, until_consuming};
use crate::testkit::{CaseError, CaseResult, Ctx, untraced};
use crate::{Kind, Message, Subscription, header};

/// C12: an oversize payload is refused before sending, and comes back.
pub async fn c12_oversize_payload_is_rejected_before_sending(ctx: Ctx) -> CaseResult {
    let Some(max) = ctx.bus().capabilities().max_payload() else {
        return Err(CaseError::Skip(
            "the backend states no payload limit".into(),
        ));
    };
    let mut s = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("big")))
        .await?;
    let big = Message::new(vec![7u8; max + 1]);
    let err = ctx
        .bus()
        .publish(&ctx.topic("big"), big.clone())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Kind::PayloadTooLarge, "{err}");
    assert!(
        err.to_string().contains(&(max + 1).to_string()),
        "says the size: {err}"
    );
    assert!(!err.may_have_been_delivered());
    assert_eq!(err.into_message(), big);
    ctx.bus()
        .publish(&ctx.topic("big"), Message::new("small"))
        .await?;
    assert_eq!(payloads(&ctx.recv_acked(&mut s, 1).await), ["small"]);
    Ok(())
}

/// C12: metadata no backend can carry (an empty or over-long id, an over-long
/// content type or header name) is refused before sending, the same everywhere.
pub async fn c12_invalid_metadata_is_rejected_before_sending(ctx: Ctx) -> CaseResult {
    let long = "x".repeat(256);
    for m in [
        Message::new("a").with_id(""),
        Message::new("a").with_id(long.clone()),
        Message::new("a").with_content_type(long.clone()),
        Message::new("a").with_header(long.clone(), "v"),
        Message::new("a").with_header("", "v"),
    ] {
        let err = ctx
            .bus()
            .publish(&ctx.topic("m"), m.clone())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), Kind::InvalidInput, "{m:?}: {err}");
        assert_eq!(err.into_message(), m);
    }
    let at_limit = "y".repeat(255);
    let mut s = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("m")))
        .await?;
    let m = Message::new("b")
        .with_id(at_limit.clone())
        .with_content_type(at_limit.clone())
        .with_header(at_limit, "v");
    ctx.bus().publish(&ctx.topic("m"), m.clone()).await?;
    assert_eq!(untraced(&ctx.recv_acked(&mut s, 1).await[0]), m);
    Ok(())
}

/// C12: invalid group names, prefetch values and bounds are typed errors.
pub async fn c12_invalid_subscription_options_are_rejected(ctx: Ctx) -> CaseResult {
    let t = ctx.topic("x");
    for sub in [
        Subscription::new(t.clone()).group("has space"),
        Subscription::new(t.clone()).group(""),
        Subscription::new(t.clone()).group("a/b"),
        Subscription::new(t.clone()).prefetch(0),
        Subscription::new(t.clone()).prefetch(1_000_000),
        Subscription::new(t.clone()).dead_letter_topic("dead.*"),
        // On every backend, bounded or not: these are wrong before any bound.
        Subscription::new(t.clone()).max_depth(0),
        Subscription::new(t.clone()).overflow(crate::Overflow::RejectPublish),
    ] {
        let err = ctx.bus().subscribe(sub.clone()).await.unwrap_err();
        assert_eq!(err.kind(), Kind::InvalidInput, "{sub:?}: {err}");
    }
    Ok(())
}

/// C12: an undecodable payload gives a typed decode error, and dead-letters with
/// the error as its reason.
pub async fn c12_undecodable_payload_is_a_decode_error_and_dead_letters(ctx: Ctx) -> CaseResult {
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct User {
        id: String,
    }
    let group = ctx.group("g");
    let mut s = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("user.*")).group(group.clone()))
        .await?;
    ctx.bus()
        .publish(
            &ctx.topic("user.created"),
            Message::new("{not json").with_content_type("application/json"),
        )
        .await?;
    let d = ctx.recv(&mut s).await;
    let err = d.json::<User>().unwrap_err();
    assert_eq!(err.kind(), Kind::Decode);
    let reason = err.to_string();
    d.dead_letter(reason.clone()).await?;
    let mut dlq = ctx
        .bus()
        .subscribe(Subscription::dead_letters_of(&group))
        .await?;
    let dead = ctx.recv(&mut dlq).await;
    assert_eq!(dead.message().payload().as_ref(), b"{not json");
    assert_eq!(
        dead.message().header(header::DEAD_LETTER_REASON),
        Some(reason.as_str())
    );
    dead.ack().await?;
    Ok(())
}

/// C12: a publish refused for bad input loses nothing: the returned message,
/// published again correctly, arrives intact.
pub async fn c12_rejected_publish_loses_nothing(ctx: Ctx) -> CaseResult {
    let mut s = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("ok")))
        .await?;
    let m = Message::new(vec![0u8, 1, 2, 255])
        .with_key("k")
        .with_header("h", "v")
        .with_content_type("application/octet-stream");
    let err = ctx
        .bus()
        .publish("not..valid", m.clone())
        .await
        .unwrap_err();
    let back = err.into_message();
    assert_eq!(back, m);
    ctx.bus().publish(&ctx.topic("ok"), back).await?;
    let got = ctx.recv_acked(&mut s, 1).await;
    assert_eq!(untraced(&got[0]), m);
    Ok(())
}

/// C12: an unreachable broker is a typed connection error within a bounded time.
pub async fn c12_unreachable_broker_fails_fast(ctx: Ctx) -> CaseResult {
    let started = tokio::time::Instant::now();
    let Some(result) = ctx.target().connect_unreachable().await else {
        return Err(CaseError::Skip(
            "the backend has no network connection".into(),
        ));
    };
    let waited = started.elapsed();
    let err = result.expect_err("connected to an unreachable broker");
    assert!(
        matches!(err.kind(), Kind::Connection | Kind::Timeout),
        "kind {:?}: {err}",
        err.kind()
    );
    assert!(waited < Duration::from_secs(30), "took {waited:?}");
    Ok(())
}

/// C12 (runtime): an undecodable payload and a permanent error are dead-lettered
/// with their reasons; a handler that overruns its time-out is retried.
pub async fn c12_runtime_dead_letters_undecodable_and_permanent_and_retries_timeouts(
    ctx: Ctx,
) -> CaseResult {
    use crate::consumer::{Consumer, HandlerError, Json};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(serde::Deserialize)]
    struct Job {
        kind: String,
    }
    let group = ctx.group("jobs");
    let mut dlq = ctx
        .bus()
        .subscribe(Subscription::dead_letters_of(&group))
        .await?;
    // Make the group exist before publishing (new groups start at "now").
    ctx.bus()
        .subscribe(Subscription::new(ctx.topic("job")).group(group.clone()))
        .await?
        .close(Duration::ZERO)
        .await?;
    for body in ["{not json", r#"{"kind":"permanent"}"#, r#"{"kind":"slow"}"#] {
        ctx.bus()
            .publish(&ctx.topic("job"), Message::new(body))
            .await?;
    }
    let slow_calls = Arc::new(AtomicU32::new(0));
    let consuming = Arc::new(tokio::sync::Notify::new());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (counter, called) = (slow_calls.clone(), consuming.clone());
    let mut run = tokio::spawn(
        Consumer::new(
            ctx.bus().clone(),
            Subscription::new(ctx.topic("job")).group(group.clone()),
        )
        .retry(ctx.fast_retry().max_attempts(5))
        .concurrency(2)
        .handler_timeout(Duration::from_millis(300))
        .shutdown_on(async move {
            let _ = stopped.await;
        })
        .run(move |Json(job): Json<Job>| {
            called.notify_one();
            let counter = counter.clone();
            async move {
                match job.kind.as_str() {
                    "permanent" => Err(HandlerError::permanent("no such account")),
                    "slow" => {
                        // Too slow the first time only.
                        if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
        }),
    );
    // The runtime subscribes inside run(); patience starts once it handles a job.
    until_consuming(&mut run, consuming.notified()).await;
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let d = ctx.recv(&mut dlq).await;
        reasons.push(
            d.message()
                .header(header::DEAD_LETTER_REASON)
                .unwrap_or_default()
                .to_owned(),
        );
        d.ack().await?;
    }
    reasons.sort();
    assert!(reasons[0].starts_with("cannot decode json"), "{reasons:?}");
    assert_eq!(reasons[1], "no such account");
    let deadline = tokio::time::Instant::now() + ctx.target().patience();
    while slow_calls.load(Ordering::SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the timed-out job was not retried"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(ctx.target().quiet()).await;
    let _ = stop.send(());
    let stats = run.await.expect("runtime")?;
    assert_eq!(stats.dead_lettered, 2, "{stats:?}");
    assert_eq!(stats.acked, 1, "{stats:?}");
    assert_eq!(stats.nacked, 1, "the timed-out attempt: {stats:?}");
    Ok(())
}
