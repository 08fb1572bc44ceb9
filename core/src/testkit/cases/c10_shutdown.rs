//! The cases of **C10 Shutdown**: "Closing a subscription stops fetching, lets in-
//! flight work finish until a deadline, and leaves everything unsettled to be
//! redelivered."
//!
//! The handler runtime's graceful shutdown is proven here too.

use std::time::Duration;

use super::support::{payloads, sorted, until_consuming};
use crate::testkit::{CaseError, CaseResult, Ctx};
use crate::{Kind, Message, Subscription};

/// C10: closing waits for in-flight work to settle.
pub async fn c10_close_waits_for_in_flight_settlement(ctx: Ctx) -> CaseResult {
    let sub = || Subscription::new(ctx.topic("x")).group(ctx.group("g"));
    let mut s = ctx.bus().subscribe(sub()).await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("work"))
        .await?;
    let d = ctx.recv(&mut s).await;
    let acking = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = acking.clone();
    let worker = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        d.ack().await
    });
    s.close(Duration::from_secs(10)).await?;
    // Not `worker.is_finished()`: the ack may wake `close` before its own task
    // has run to its end. The contract is that close waited for the ack to be
    // made, the ack was taken (not refused as closed), and nothing comes back.
    assert!(
        acking.load(std::sync::atomic::Ordering::SeqCst),
        "close returned before the in-flight ack was made"
    );
    worker.await.expect("worker")?;
    let mut s = ctx.bus().subscribe(sub()).await?;
    ctx.expect_quiet(&mut s).await;
    Ok(())
}

/// C10: what is still unsettled at the deadline is redelivered; settling it later
/// is a typed error.
pub async fn c10_close_returns_unsettled_after_grace(ctx: Ctx) -> CaseResult {
    let sub = || Subscription::new(ctx.topic("x")).group(ctx.group("g"));
    let mut s = ctx.bus().subscribe(sub()).await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("slow work"))
        .await?;
    let d = ctx.recv(&mut s).await;
    s.close(Duration::from_millis(100)).await?;
    let err = d.ack().await.unwrap_err();
    assert_eq!(err.kind(), Kind::Closed, "{err}");
    let mut s = ctx.bus().subscribe(sub()).await?;
    let again = ctx.recv(&mut s).await;
    assert_eq!(again.message().payload().as_ref(), b"slow work");
    again.ack().await?;
    Ok(())
}

/// C10: messages fetched ahead but never seen are left for redelivery too.
pub async fn c10_close_returns_prefetched_but_unseen_messages(ctx: Ctx) -> CaseResult {
    let sub = || {
        Subscription::new(ctx.topic("x"))
            .group(ctx.group("g"))
            .prefetch(10)
    };
    let mut s = ctx.bus().subscribe(sub()).await?;
    for i in 0..5 {
        ctx.bus()
            .publish(&ctx.topic("x"), Message::new(format!("m{i}")).with_key("k"))
            .await?;
    }
    let first = ctx.recv(&mut s).await;
    assert_eq!(
        first.message().payload().as_ref(),
        b"m0",
        "one key: in order"
    );
    first.ack().await?;
    s.close(Duration::from_millis(100)).await?;
    let mut s = ctx.bus().subscribe(sub()).await?;
    // Handed back and delivered again: redeliveries keep no order (C5), so as a set.
    let got = ctx.recv_acked(&mut s, 4).await;
    assert_eq!(sorted(payloads(&got)), ["m1", "m2", "m3", "m4"]);
    ctx.expect_quiet(&mut s).await;
    Ok(())
}

/// C10 (runtime): a shutdown stops fetching and lets in-flight handlers finish
/// within the grace (their deliveries are settled); a handler still running
/// when the grace ends is abandoned and its message redelivered later.
pub async fn c10_runtime_shutdown_finishes_in_flight_work_within_the_grace(ctx: Ctx) -> CaseResult {
    use crate::consumer::{Consumer, Stats};

    /// Run a consumer whose handler takes `work`; once it has started on the
    /// one message, shut down with `grace`. Returns the stats and how long the
    /// shutdown took.
    async fn shut_down_mid_handler(
        ctx: &Ctx,
        sub: Subscription,
        work: Duration,
        grace: Duration,
    ) -> std::result::Result<(Stats, Duration), CaseError> {
        let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
        let started_tx = std::sync::Mutex::new(Some(started_tx));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut run = tokio::spawn(
            Consumer::new(ctx.bus().clone(), sub)
                .grace(grace)
                .shutdown_on(async move {
                    let _ = stopped.await;
                })
                .run(move |_: Message| {
                    if let Some(tx) = started_tx.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                    async move {
                        tokio::time::sleep(work).await;
                        Ok(())
                    }
                }),
        );
        // However long the runtime's own subscribe takes.
        until_consuming(&mut run, started)
            .await
            .expect("sender kept");
        let shutdown_at = tokio::time::Instant::now();
        let _ = stop.send(());
        let stats = run.await.expect("runtime")?;
        Ok((stats, shutdown_at.elapsed()))
    }

    let group = ctx.group("graceful");
    let sub = || Subscription::new(ctx.topic("job")).group(group.clone());
    ctx.bus()
        .subscribe(sub())
        .await?
        .close(Duration::ZERO)
        .await?;

    // Within the grace: the handler finishes and its delivery is acked.
    ctx.bus()
        .publish(&ctx.topic("job"), Message::new("quick"))
        .await?;
    let (stats, _) = shut_down_mid_handler(
        &ctx,
        sub(),
        Duration::from_millis(300),
        Duration::from_secs(5),
    )
    .await?;
    assert_eq!(stats.acked, 1, "the in-flight handler finished: {stats:?}");
    let mut check = ctx.bus().subscribe(sub()).await?;
    ctx.expect_quiet(&mut check).await;
    check.close(Duration::ZERO).await?;

    // Past the grace: the handler is abandoned; the message comes back.
    ctx.bus()
        .publish(&ctx.topic("job"), Message::new("slow"))
        .await?;
    let (stats, took) = shut_down_mid_handler(
        &ctx,
        sub(),
        Duration::from_secs(60),
        Duration::from_millis(200),
    )
    .await?;
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    assert_eq!(stats.acked, 0, "{stats:?}");
    let mut again = ctx.bus().subscribe(sub()).await?;
    let d = ctx.recv(&mut again).await;
    assert_eq!(d.message().payload().as_ref(), b"slow");
    d.ack().await?;
    Ok(())
}
