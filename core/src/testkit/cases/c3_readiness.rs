//! The cases of **C3 Readiness**: "When `subscribe` returns, the subscription is
//! live: a message published after that is delivered to it. (On Kafka this means
//! waiting for the partition assignment.) New groups start at "now"; replaying
//! history is an opt-in capability."

use super::support::payloads;
use crate::consumer::Consumer;
use crate::testkit::{CaseError, CaseResult, Ctx};
use crate::{Capability, Kind, Message, StartFrom, Subscription};

/// C3: when `subscribe` returns, the subscription is live.
pub async fn c3_message_published_right_after_subscribe_is_delivered(ctx: Ctx) -> CaseResult {
    let mut private = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("x")))
        .await?;
    let mut grouped = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("x")).group(ctx.group("g")))
        .await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("now"))
        .await?;
    assert_eq!(payloads(&ctx.recv_acked(&mut private, 1).await), ["now"]);
    assert_eq!(payloads(&ctx.recv_acked(&mut grouped, 1).await), ["now"]);
    Ok(())
}

/// C3: a new group starts at "now": what was published before it existed is not
/// delivered to it.
pub async fn c3_new_group_starts_at_now(ctx: Ctx) -> CaseResult {
    // Another group makes the topic exist on brokers that need that.
    let _keeper = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("x")).group(ctx.group("other")))
        .await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("before"))
        .await?;
    let mut sub = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("x")).group(ctx.group("new")))
        .await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("after"))
        .await?;
    assert_eq!(payloads(&ctx.recv_acked(&mut sub, 1).await), ["after"]);
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// C3 (capability `replay`): a new group may opt in to start at the earliest
/// message the broker holds.
pub async fn c3_replay_from_earliest(ctx: Ctx) -> CaseResult {
    ctx.require(Capability::Replay)?;
    let _keeper = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("x")).group(ctx.group("other")))
        .await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("history"))
        .await?;
    let mut sub = ctx
        .bus()
        .subscribe(
            Subscription::new(ctx.topic("x"))
                .group(ctx.group("replayer"))
                .start_from(StartFrom::Earliest),
        )
        .await?;
    assert_eq!(payloads(&ctx.recv_acked(&mut sub, 1).await), ["history"]);
    Ok(())
}

/// C3: a backend without replay says so with a typed error rather than quietly
/// starting at "now".
pub async fn c3_replay_without_capability_is_unsupported(ctx: Ctx) -> CaseResult {
    if ctx.bus().capabilities().has(Capability::Replay) {
        return Err(CaseError::Skip("the backend claims `replay`".into()));
    }
    let err = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("x")).start_from(StartFrom::Earliest))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Kind::Unsupported, "{err}");
    Ok(())
}

/// C3 for the handler runtime: when `Consumer::start` returns, its group is
/// live, so a message published at once is handled (the race of spawning `run`
/// and publishing straight away loses it).
pub async fn c3_a_started_consumer_handles_a_message_published_at_once(ctx: Ctx) -> CaseResult {
    let topic = ctx.topic("started");
    let mut running = Consumer::new(
        ctx.bus().clone(),
        Subscription::new(&topic).group(ctx.group("g")),
    )
    .start(|_: Message| async { Ok(()) })
    .await?;
    ctx.bus().publish(&topic, Message::new("first")).await?;
    let handled =
        tokio::time::timeout(ctx.target().patience(), running.wait_for(|s| s.acked >= 1)).await;
    let stats = running.stop().await?;
    if handled.is_err() {
        return Err(CaseError::Fail(format!(
            "the message published right after start was not handled: {stats:?}"
        )));
    }
    assert_eq!(stats.acked, 1, "{stats:?}");
    Ok(())
}
