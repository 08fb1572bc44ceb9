//! The cases of **C2 Groups**: "A subscription belongs to a group. A message goes
//! to every group whose pattern matches it; within a group, to one member at a time
//! (competing consumers). A subscription without a group gets a private, ephemeral
//! group. A durable group keeps messages published while none of its members is
//! connected."

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;

use super::support::{payloads, sorted};
use crate::testkit::{CaseResult, Ctx};
use crate::{Capability, Message, Subscription};

/// C2: a message goes to every group whose pattern matches, and only those.
pub async fn c2_every_matching_group_gets_a_copy(ctx: Ctx) -> CaseResult {
    let bus = ctx.bus();
    let mut welcome = bus
        .subscribe(Subscription::new(ctx.topic("user.created")).group(ctx.group("welcome")))
        .await?;
    let mut audit = bus
        .subscribe(Subscription::new(ctx.topic("user.#")).group(ctx.group("audit")))
        .await?;
    let mut orders = bus
        .subscribe(Subscription::new(ctx.topic("order.#")).group(ctx.group("orders")))
        .await?;
    bus.publish(&ctx.topic("user.created"), Message::new("u1"))
        .await?;
    bus.publish(&ctx.topic("user.deleted"), Message::new("u2"))
        .await?;
    assert_eq!(payloads(&ctx.recv_acked(&mut welcome, 1).await), ["u1"]);
    // Two topics, no key: no order between them is promised.
    assert_eq!(
        sorted(payloads(&ctx.recv_acked(&mut audit, 2).await)),
        ["u1", "u2"]
    );
    ctx.expect_quiet(&mut welcome).await;
    ctx.expect_quiet(&mut orders).await;
    Ok(())
}

/// C2: the members of one group share its messages: each message reaches exactly
/// one of them.
pub async fn c2_members_of_a_group_share_its_messages(ctx: Ctx) -> CaseResult {
    let group = ctx.group("workers");
    let sub = || {
        Subscription::new(ctx.topic("job.*"))
            .group(group.clone())
            .prefetch(4)
    };
    let mut a = ctx.bus().subscribe(sub()).await?;
    let other = ctx.connect().await?;
    let mut b = other.subscribe(sub()).await?;
    let n = 20;
    let mut sent = HashSet::new();
    for i in 0..n {
        let m = Message::new(format!("job-{i}")).with_key(format!("k{i}"));
        sent.insert(m.id().to_owned());
        ctx.bus().publish(&ctx.topic("job.run"), m).await?;
    }
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + ctx.target().patience();
    while seen.len() < n {
        let next = tokio::select! {
            d = a.next() => d,
            d = b.next() => d,
            _ = tokio::time::sleep_until(deadline) => panic!("only {} of {n} jobs arrived", seen.len()),
        };
        let d = next.expect("stream open")?;
        seen.push(d.message().id().to_owned());
        d.ack().await?;
    }
    let unique: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), n, "a message reached two members");
    assert_eq!(unique, sent);
    ctx.expect_quiet(&mut a).await;
    ctx.expect_quiet(&mut b).await;
    Ok(())
}

/// C2/C6: a member that holds its prefetch of unsettled deliveries does not hold
/// up the group: the next message goes to another member.
pub async fn c2_a_member_at_its_prefetch_leaves_messages_to_others(ctx: Ctx) -> CaseResult {
    ctx.require(Capability::MessageBalancing)?;
    let group = ctx.group("workers");
    let sub = || {
        Subscription::new(ctx.topic("job.*"))
            .group(group.clone())
            .prefetch(1)
    };
    let mut a = ctx.bus().subscribe(sub()).await?;
    ctx.bus()
        .publish(&ctx.topic("job.run"), Message::new("first").with_key("k"))
        .await?;
    let first = ctx.recv(&mut a).await;
    let mut b = ctx.bus().subscribe(sub()).await?;
    ctx.bus()
        .publish(&ctx.topic("job.run"), Message::new("second").with_key("k"))
        .await?;
    let second = ctx.recv(&mut b).await;
    assert_eq!(second.message().payload().as_ref(), b"second");
    first.ack().await?;
    second.ack().await?;
    Ok(())
}

/// C2: subscriptions without a group each get a private group, so each gets a copy.
pub async fn c2_private_subscriptions_each_get_a_copy(ctx: Ctx) -> CaseResult {
    let mut a = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("news")))
        .await?;
    let mut b = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("news")))
        .await?;
    ctx.bus()
        .publish(&ctx.topic("news"), Message::new("hello"))
        .await?;
    assert_eq!(payloads(&ctx.recv_acked(&mut a, 1).await), ["hello"]);
    assert_eq!(payloads(&ctx.recv_acked(&mut b, 1).await), ["hello"]);
    Ok(())
}

/// C2: a durable group keeps what is published while none of its members is
/// connected.
pub async fn c2_durable_group_keeps_messages_while_no_member_is_connected(ctx: Ctx) -> CaseResult {
    let sub = || Subscription::new(ctx.topic("user.*")).group(ctx.group("billing"));
    let first = ctx.bus().subscribe(sub()).await?;
    first.close(Duration::from_secs(1)).await?;
    for i in 0..3 {
        ctx.bus()
            .publish(
                &ctx.topic("user.created"),
                Message::new(format!("m{i}")).with_key("u"),
            )
            .await?;
    }
    let mut again = ctx.bus().subscribe(sub()).await?;
    assert_eq!(
        payloads(&ctx.recv_acked(&mut again, 3).await),
        ["m0", "m1", "m2"]
    );
    Ok(())
}

/// C2/C7: settling in one group does not touch another group's copy.
pub async fn c2_groups_settle_independently(ctx: Ctx) -> CaseResult {
    let retry = ctx.fast_retry();
    let mut a = ctx
        .bus()
        .subscribe(
            Subscription::new(ctx.topic("e"))
                .group(ctx.group("a"))
                .retry(retry.clone()),
        )
        .await?;
    let mut b = ctx
        .bus()
        .subscribe(
            Subscription::new(ctx.topic("e"))
                .group(ctx.group("b"))
                .retry(retry),
        )
        .await?;
    ctx.bus()
        .publish(&ctx.topic("e"), Message::new("x"))
        .await?;
    ctx.recv(&mut a).await.ack().await?;
    ctx.recv(&mut b).await.nack().await?;
    let again = ctx.recv(&mut b).await;
    assert_eq!(again.attempt(), 2);
    again.ack().await?;
    ctx.expect_quiet(&mut a).await;
    Ok(())
}
