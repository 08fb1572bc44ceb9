//! The cases of **C7 Settlement**: "`ack`: never delivered to that group again.
//! `nack`: delivered again with `attempt` + 1 and `redelivered = true`, after the
//! retry policy's delay. `dead_letter(reason)`: moved to the group's dead-letter
//! topic with the original topic, reason and attempts in headers. Dropping an
//! unsettled delivery counts as `nack`. Attempts are carried in a header, so they
//! survive restarts and are the same on every backend."

use std::time::Duration;

use crate::names::PRIVATE_DEAD_LETTERS;
use crate::testkit::{CaseResult, Ctx};
use crate::{Message, RetryPolicy, Subscription, header};

/// C7: an acked message is never delivered to that group again.
pub async fn c7_ack_is_final(ctx: Ctx) -> CaseResult {
    let sub = || {
        Subscription::new(ctx.topic("x"))
            .group(ctx.group("g"))
            .retry(ctx.fast_retry())
    };
    let mut s = ctx.bus().subscribe(sub()).await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("once"))
        .await?;
    ctx.recv(&mut s).await.ack().await?;
    ctx.expect_quiet(&mut s).await;
    // Not on a new member or after a reconnect either.
    drop(s);
    let mut s = ctx.connect().await?.subscribe(sub()).await?;
    ctx.expect_quiet(&mut s).await;
    Ok(())
}

/// C7: a nacked message comes back with `attempt + 1` and `redelivered`.
pub async fn c7_nack_redelivers_with_attempt_plus_one(ctx: Ctx) -> CaseResult {
    let mut s = ctx
        .bus()
        .subscribe(
            Subscription::new(ctx.topic("x"))
                .group(ctx.group("g"))
                .retry(ctx.fast_retry()),
        )
        .await?;
    let m = Message::new("retry me").with_key("k");
    ctx.bus().publish(&ctx.topic("x"), m.clone()).await?;
    let first = ctx.recv(&mut s).await;
    assert_eq!((first.attempt(), first.redelivered()), (1, false));
    first.nack().await?;
    let second = ctx.recv(&mut s).await;
    assert_eq!((second.attempt(), second.redelivered()), (2, true));
    assert_eq!(second.message().id(), m.id());
    second.nack().await?;
    let third = ctx.recv(&mut s).await;
    assert_eq!((third.attempt(), third.redelivered()), (3, true));
    third.ack().await?;
    ctx.expect_quiet(&mut s).await;
    Ok(())
}

/// C7/C8: redelivery waits for the retry policy's delay; it never spins.
pub async fn c7_nack_waits_for_the_retry_delay(ctx: Ctx) -> CaseResult {
    let delay = Duration::from_millis(600);
    let mut s = ctx
        .bus()
        .subscribe(
            Subscription::new(ctx.topic("x"))
                .group(ctx.group("g"))
                .retry(RetryPolicy::fixed(delay)),
        )
        .await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("slow"))
        .await?;
    let d = ctx.recv(&mut s).await;
    let nacked_at = tokio::time::Instant::now();
    d.nack().await?;
    // Well inside the delay, nothing may come back.
    ctx.expect_quiet_for(&mut s, delay / 2).await;
    let again = ctx.recv(&mut s).await;
    let waited = nacked_at.elapsed();
    assert!(
        waited >= delay,
        "redelivered after {waited:?}, the delay is {delay:?}"
    );
    again.ack().await?;
    Ok(())
}

/// C7: `dead_letter` moves the message to the group's dead-letter topic with the
/// reason, original topic and attempts in headers.
pub async fn c7_dead_letter_moves_to_the_dead_letter_topic_with_headers(ctx: Ctx) -> CaseResult {
    let group = ctx.group("billing");
    let mut s = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("user.*")).group(group.clone()))
        .await?;
    let m = Message::new("poison")
        .with_key("u1")
        .with_header("trace", "t-1");
    ctx.bus()
        .publish(&ctx.topic("user.created"), m.clone())
        .await?;
    ctx.recv(&mut s).await.dead_letter("card declined").await?;
    ctx.expect_quiet(&mut s).await;
    let mut dlq = ctx
        .bus()
        .subscribe(Subscription::dead_letters_of(&group))
        .await?;
    let d = ctx.recv(&mut dlq).await;
    let dm = d.message();
    assert_eq!(dm.id(), m.id());
    assert_eq!(dm.payload(), m.payload());
    assert_eq!(dm.key(), Some("u1"));
    assert_eq!(dm.header("trace"), Some("t-1"));
    assert_eq!(dm.header(header::DEAD_LETTER_REASON), Some("card declined"));
    assert_eq!(
        dm.header(header::ORIGINAL_TOPIC),
        Some(ctx.topic("user.created").as_str())
    );
    assert_eq!(dm.header(header::ATTEMPTS), Some("1"));
    d.ack().await?;
    Ok(())
}

/// C7: dropping an unsettled delivery counts as a nack.
pub async fn c7_dropping_a_delivery_counts_as_nack(ctx: Ctx) -> CaseResult {
    let mut s = ctx
        .bus()
        .subscribe(
            Subscription::new(ctx.topic("x"))
                .group(ctx.group("g"))
                .retry(ctx.fast_retry()),
        )
        .await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("dropped"))
        .await?;
    drop(ctx.recv(&mut s).await);
    let again = ctx.recv(&mut s).await;
    assert_eq!((again.attempt(), again.redelivered()), (2, true));
    again.ack().await?;
    Ok(())
}

/// C7: a private subscription's dead letters are kept too, in the store shared
/// by private subscriptions, marked with the group they came from.
pub async fn c7_private_subscription_dead_letters_are_kept(ctx: Ctx) -> CaseResult {
    let mut s = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("x")))
        .await?;
    let m = Message::new("private poison");
    ctx.bus().publish(&ctx.topic("x"), m.clone()).await?;
    ctx.recv(&mut s).await.dead_letter("bad").await?;
    let mut store = ctx
        .bus()
        .subscribe(Subscription::dead_letters_of(PRIVATE_DEAD_LETTERS))
        .await?;
    // The store is shared by every private subscription on the broker.
    loop {
        let d = ctx.recv(&mut store).await;
        let ours = d.message().id() == m.id();
        if ours {
            let h = |name| d.message().header(name).map(str::to_owned);
            assert_eq!(h(header::DEAD_LETTER_REASON).as_deref(), Some("bad"));
            assert_eq!(h(header::ORIGINAL_TOPIC), Some(ctx.topic("x")));
            assert!(h(header::GROUP).is_some());
        }
        d.ack().await?;
        if ours {
            return Ok(());
        }
    }
}

/// C7: a dead letter dead-lettered again keeps the topic it was first published to.
pub async fn c7_dead_letter_of_a_dead_letter_keeps_the_original_topic(ctx: Ctx) -> CaseResult {
    let group = ctx.group("g");
    let mut s = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("x")).group(group.clone()))
        .await?;
    let mut dlq = ctx
        .bus()
        .subscribe(Subscription::dead_letters_of(&group))
        .await?;
    let dl_group = format!("{}.{group}", crate::names::DEAD_LETTER_PREFIX);
    let mut dlq2 = ctx
        .bus()
        .subscribe(Subscription::dead_letters_of(&dl_group))
        .await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("twice"))
        .await?;
    ctx.recv(&mut s).await.dead_letter("first").await?;
    ctx.recv(&mut dlq).await.dead_letter("second").await?;
    let d = ctx.recv(&mut dlq2).await;
    let topic = ctx.topic("x");
    assert_eq!(
        d.message().header(header::ORIGINAL_TOPIC),
        Some(topic.as_str())
    );
    assert_eq!(
        d.message().header(header::DEAD_LETTER_REASON),
        Some("second")
    );
    d.ack().await?;
    Ok(())
}
