//! The cases of **C1 Topics**: "A topic is dot-separated words (`user.created`). A
//! pattern uses `*` for exactly one word and `#` for zero or more (AMQP topic
//! semantics), and it matches the same way on every backend. An invalid topic or
//! pattern is a typed error before any I/O."
//!
//! The `polybus.` namespace is the library's: its cases are here too.

use futures::StreamExt;

use super::support::{payloads, sorted};
use crate::testkit::{CaseResult, Ctx};
use crate::{Kind, Message, Subscription, Topic};

/// C1: an invalid topic is a typed error before any I/O, and the message comes back.
pub async fn c1_invalid_topic_is_rejected_before_io(ctx: Ctx) -> CaseResult {
    for bad in [
        "",
        "user..created",
        ".user",
        "user.",
        "user.*",
        "user.#",
        "user created",
    ] {
        let m = Message::new("x");
        let id = m.id().to_owned();
        let err = ctx.bus().publish(bad, m).await.unwrap_err();
        assert_eq!(err.kind(), Kind::InvalidInput, "topic `{bad}`: {err}");
        assert!(!err.may_have_been_delivered(), "topic `{bad}`");
        assert_eq!(err.message().id(), id, "the message comes back");
        assert!(
            err.to_string().contains(&format!("`{bad}`")),
            "names the topic: {err}"
        );
    }
    Ok(())
}

/// C1: an invalid pattern is a typed error from `subscribe`.
pub async fn c1_invalid_pattern_is_rejected_before_io(ctx: Ctx) -> CaseResult {
    for bad in ["", "user.*x", "us#er", "user..x", "user created"] {
        let err = ctx
            .bus()
            .subscribe(Subscription::new(bad))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), Kind::InvalidInput, "pattern `{bad}`: {err}");
    }
    Ok(())
}

/// C1: the `polybus.` namespace is the library's: callers cannot publish there,
/// and a `#` group never receives library traffic such as dead letters.
pub async fn c1_library_namespace_is_reserved(ctx: Ctx) -> CaseResult {
    let err = ctx
        .bus()
        .publish("polybus.dead-letter.x", Message::new("forged"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Kind::InvalidInput, "{err}");
    let mut everything = ctx
        .bus()
        .subscribe(Subscription::new("#").group(ctx.group("everything")))
        .await?;
    let mut g = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("x")).group(ctx.group("g")))
        .await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("doomed"))
        .await?;
    ctx.recv(&mut g).await.dead_letter("no").await?;
    // On a shared broker `#` also sees other cases' traffic; none of it may be
    // the library's.
    let deadline = tokio::time::Instant::now() + ctx.target().quiet() * 2;
    while let Ok(Some(d)) = tokio::time::timeout_at(deadline, everything.next()).await {
        let d = d?;
        assert!(
            !Topic::is_reserved(d.topic().as_str()),
            "`#` received library traffic on {}",
            d.topic()
        );
        d.ack().await?;
    }
    Ok(())
}

/// C1: `*` matches exactly one word.
pub async fn c1_star_matches_exactly_one_word(ctx: Ctx) -> CaseResult {
    let mut sub = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("user.*")))
        .await?;
    for (t, p) in [
        ("user", "no-0"),
        ("user.created.eu", "no-2"),
        ("user.created", "yes-1"),
    ] {
        ctx.bus().publish(&ctx.topic(t), Message::new(p)).await?;
    }
    let got = ctx.recv_acked(&mut sub, 1).await;
    assert_eq!(payloads(&got), ["yes-1"]);
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// C1: `#` matches zero or more words.
pub async fn c1_hash_matches_zero_or_more_words(ctx: Ctx) -> CaseResult {
    let mut sub = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("user.#")))
        .await?;
    for t in [
        "user",
        "user.created",
        "other",
        "user.created.eu",
        "users.x",
    ] {
        ctx.bus().publish(&ctx.topic(t), Message::new(t)).await?;
    }
    // Three topics: no order among them is promised (C5 is per key), so as a set.
    let got = ctx.recv_acked(&mut sub, 3).await;
    assert_eq!(
        sorted(payloads(&got)),
        ["user", "user.created", "user.created.eu"]
    );
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// C1: a pattern without wildcards matches its own topic only.
pub async fn c1_literal_pattern_matches_only_itself(ctx: Ctx) -> CaseResult {
    let mut sub = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("user.created")))
        .await?;
    for t in ["user.created2", "user", "user.created.x", "user.created"] {
        ctx.bus().publish(&ctx.topic(t), Message::new(t)).await?;
    }
    assert_eq!(
        payloads(&ctx.recv_acked(&mut sub, 1).await),
        ["user.created"]
    );
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// C1/C2: a subscription with several patterns gets a message matching two of
/// them once.
pub async fn c1_message_matching_two_patterns_is_delivered_once(ctx: Ctx) -> CaseResult {
    let sub = Subscription::new(ctx.topic("user.*"))
        .pattern(ctx.topic("#.created"))
        .pattern(ctx.topic("order.#"));
    let mut sub = ctx.bus().subscribe(sub).await?;
    for t in ["user.created", "order.paid", "user.deleted"] {
        ctx.bus().publish(&ctx.topic(t), Message::new(t)).await?;
    }
    let got = ctx.recv_acked(&mut sub, 3).await;
    assert_eq!(
        sorted(payloads(&got)),
        ["order.paid", "user.created", "user.deleted"]
    );
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}
