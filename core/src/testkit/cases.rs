//! The cases, named after the clause they prove. Each takes a fresh [`Ctx`].

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, UNIX_EPOCH};

use futures::StreamExt;

use super::{CaseError, CaseResult, Ctx};
use crate::subscription::PRIVATE_DEAD_LETTERS;
use crate::{Capability, Kind, Message, RetryPolicy, StartFrom, Subscription, Topic, header};

fn ids(messages: &[Message]) -> Vec<String> {
    messages.iter().map(|m| m.id().to_owned()).collect()
}

fn payloads(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
        .collect()
}

/// `items` in order, for comparing as a set where the contract promises no order.
fn sorted(mut items: Vec<String>) -> Vec<String> {
    items.sort();
    items
}

/// Wait for `consuming` (a sign that a runtime, which subscribes inside its own
/// task, has started to consume) and return its output; fails the case if the
/// runtime `run` ends first. No deadline of its own: subscribing takes as long as
/// the backend needs (on Kafka, a group's partition assignment) and is bounded by
/// the backend's own subscribe time-out, after which `run` ends with the error
/// reported here. A case's patience for what it expects starts after this.
async fn until_consuming<R: std::fmt::Debug, T>(
    run: &mut tokio::task::JoinHandle<R>,
    consuming: impl std::future::Future<Output = T>,
) -> T {
    tokio::select! {
        out = consuming => out,
        ended = run => panic!("the runtime ended before it consumed: {ended:?}"),
    }
}

// ---- C1 topics ---------------------------------------------------------------

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

// ---- C2 groups ---------------------------------------------------------------

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

// ---- C3 readiness ------------------------------------------------------------

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

// ---- C4 publish --------------------------------------------------------------

/// C4: `Ok` means the broker has the message: it survives the publisher's
/// connection going away at once.
pub async fn c4_publish_ok_survives_the_publishers_disconnect(ctx: Ctx) -> CaseResult {
    let sub = || Subscription::new(ctx.topic("x")).group(ctx.group("g"));
    ctx.bus()
        .subscribe(sub())
        .await?
        .close(Duration::ZERO)
        .await?;
    let publisher = ctx.connect().await?;
    for i in 0..20 {
        publisher
            .publish(&ctx.topic("x"), Message::new(format!("m{i}")).with_key("k"))
            .await?;
    }
    drop(publisher);
    let mut s = ctx.bus().subscribe(sub()).await?;
    let got = ctx.recv_acked(&mut s, 20).await;
    assert_eq!(
        payloads(&got),
        (0..20).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    Ok(())
}

/// C4/C10: publishing on a closed bus fails with `Closed` and hands the message back.
pub async fn c4_publish_on_closed_bus_fails_and_returns_the_message(ctx: Ctx) -> CaseResult {
    let bus = ctx.connect().await?;
    bus.publish(&ctx.topic("x"), Message::new("before")).await?;
    bus.close().await?;
    let m = Message::new("after").with_key("k");
    let err = bus.publish(&ctx.topic("x"), m.clone()).await.unwrap_err();
    assert_eq!(err.kind(), Kind::Closed, "{err}");
    assert!(!err.may_have_been_delivered());
    assert_eq!(err.into_message(), m);
    Ok(())
}

/// C4: a batch publish is pipelined and gives one result per message, in order.
pub async fn c4_batch_publish_gives_one_result_per_message_in_order(ctx: Ctx) -> CaseResult {
    let mut sub = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("b")))
        .await?;
    let batch: Vec<Message> = (0..10)
        .map(|i| Message::new(format!("m{i}")).with_key("k"))
        .collect();
    let sent = ids(&batch);
    let results = ctx.bus().publish_batch(&ctx.topic("b"), batch).await;
    assert_eq!(results.len(), 10);
    for r in results {
        r?;
    }
    assert_eq!(ids(&ctx.recv_acked(&mut sub, 10).await), sent);
    Ok(())
}

// ---- C5 order ----------------------------------------------------------------

/// C5: messages with one key, published in sequence, arrive in that order.
pub async fn c5_same_key_arrives_in_order(ctx: Ctx) -> CaseResult {
    let mut sub = ctx
        .bus()
        .subscribe(
            Subscription::new(ctx.topic("user.*"))
                .group(ctx.group("audit"))
                .prefetch(16),
        )
        .await?;
    let n = 50;
    for i in 0..n {
        ctx.bus()
            .publish(
                &ctx.topic("user.updated"),
                Message::new(i.to_string()).with_key("user-7"),
            )
            .await?;
    }
    let got = ctx.recv_acked(&mut sub, n).await;
    assert_eq!(
        payloads(&got),
        (0..n).map(|i| i.to_string()).collect::<Vec<_>>()
    );
    Ok(())
}

/// C5: with several keys interleaved, each key's messages keep their order.
pub async fn c5_order_holds_for_each_of_several_keys(ctx: Ctx) -> CaseResult {
    let mut sub = ctx
        .bus()
        .subscribe(
            Subscription::new(ctx.topic("user.*"))
                .group(ctx.group("audit"))
                .prefetch(8),
        )
        .await?;
    let keys = ["alice", "bob", "carol"];
    let per_key = 12;
    let msgs: Vec<Message> = (0..per_key)
        .flat_map(|i| {
            keys.iter()
                .map(move |k| Message::new(format!("{k}:{i}")).with_key(*k))
        })
        .collect();
    for r in ctx
        .bus()
        .publish_batch(&ctx.topic("user.updated"), msgs)
        .await
    {
        r?;
    }
    let got = ctx.recv_acked(&mut sub, keys.len() * per_key).await;
    let mut by_key: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for p in payloads(&got) {
        let (k, i) = p.split_once(':').expect("key:index");
        by_key
            .entry(k.into())
            .or_default()
            .push(i.parse().expect("index"));
    }
    for k in keys {
        assert_eq!(
            by_key[k],
            (0..per_key).collect::<Vec<_>>(),
            "order of key {k}"
        );
    }
    Ok(())
}

// ---- C6 prefetch -------------------------------------------------------------

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

// ---- C7 settlement -----------------------------------------------------------

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

// ---- C8 poison messages ------------------------------------------------------

/// C8: after `max_attempts` nacks the message is dead-lettered, not requeued.
pub async fn c8_dead_lettered_after_max_attempts(ctx: Ctx) -> CaseResult {
    let group = ctx.group("g");
    let mut s = ctx
        .bus()
        .subscribe(
            Subscription::new(ctx.topic("x"))
                .group(group.clone())
                .retry(ctx.fast_retry().max_attempts(3)),
        )
        .await?;
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

// ---- C9 crashes --------------------------------------------------------------

/// C9: what a consumer held when it died goes to another member.
pub async fn c9_unsettled_delivery_of_a_dead_consumer_is_redelivered(ctx: Ctx) -> CaseResult {
    let group = ctx.group("g");
    let sub = || {
        Subscription::new(ctx.topic("x"))
            .group(group.clone())
            .prefetch(10)
    };
    let conn = ctx.connect().await?;
    let mut doomed = conn.subscribe(sub()).await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("held").with_key("k"))
        .await?;
    let d = ctx.recv(&mut doomed).await;
    let id = d.message().id().to_owned();
    let mut survivor = ctx.bus().subscribe(sub()).await?;
    drop(doomed);
    drop(conn);
    drop(d);
    let again = ctx.recv(&mut survivor).await;
    assert_eq!(again.message().id(), id);
    again.ack().await?;
    Ok(())
}

/// C9: acking out of order and then dying never loses the message in the gap.
pub async fn c9_out_of_order_ack_skips_nothing(ctx: Ctx) -> CaseResult {
    let group = ctx.group("g");
    let sub = || {
        Subscription::new(ctx.topic("x"))
            .group(group.clone())
            .prefetch(10)
    };
    ctx.bus()
        .subscribe(sub())
        .await?
        .close(Duration::ZERO)
        .await?;
    for p in ["m1", "m2", "m3"] {
        ctx.bus()
            .publish(&ctx.topic("x"), Message::new(p).with_key("k"))
            .await?;
    }
    let conn = ctx.connect().await?;
    let mut s = conn.subscribe(sub()).await?;
    let m1 = ctx.recv(&mut s).await;
    let m2 = ctx.recv(&mut s).await;
    let m3 = ctx.recv(&mut s).await;
    assert_eq!(m2.message().payload().as_ref(), b"m2");
    m3.ack().await?;
    m1.ack().await?;
    drop(s);
    drop(conn);
    drop(m2);
    let mut next = ctx.bus().subscribe(sub()).await?;
    // m2 comes back. m3 may come again too (at-least-once), before or after it:
    // redeliveries keep no order (C5). m1 never: it was acked before the gap.
    loop {
        let d = ctx.recv(&mut next).await;
        let p = d.message().payload().clone();
        assert!(
            p.as_ref() == b"m2" || p.as_ref() == b"m3",
            "only m2 (and perhaps m3) may come back, got {:?}",
            String::from_utf8_lossy(&p)
        );
        d.ack().await?;
        if p.as_ref() == b"m2" {
            break;
        }
    }
    while let Ok(Some(d)) = tokio::time::timeout(ctx.target().quiet(), next.next()).await {
        let d = d?;
        assert_eq!(
            d.message().payload().as_ref(),
            b"m3",
            "m1 and m2 were acked"
        );
        d.ack().await?;
    }
    Ok(())
}

// ---- C10 shutdown ------------------------------------------------------------

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

// ---- C12 bad input -----------------------------------------------------------

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
    assert_eq!(ctx.recv_acked(&mut s, 1).await[0], m);
    Ok(())
}

/// C12: invalid group names and prefetch values are typed errors.
pub async fn c12_invalid_subscription_options_are_rejected(ctx: Ctx) -> CaseResult {
    let t = ctx.topic("x");
    for sub in [
        Subscription::new(t.clone()).group("has space"),
        Subscription::new(t.clone()).group(""),
        Subscription::new(t.clone()).group("a/b"),
        Subscription::new(t.clone()).prefetch(0),
        Subscription::new(t.clone()).prefetch(1_000_000),
        Subscription::new(t.clone()).dead_letter_topic("dead.*"),
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
    assert_eq!(got[0], m);
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

// ---- C13 metadata ------------------------------------------------------------

fn rich_message() -> Message {
    Message::new(vec![0u8, 1, 2, 0, 255, b'\n', b'\r'])
        .with_id("order-42/α")
        .with_key("customer-7")
        .with_header("trace-id", "00-abc-01")
        .with_header("X-Mixed-Case", "Value With Spaces")
        .with_header("empty", "")
        .with_header("unicode", "ünïcödé ✓ 日本")
        .with_header("k=v;x", "a=b; c=d")
        .with_content_type("application/vnd.polybus+octet")
        .with_timestamp(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123))
}

/// C13: id, key, headers, content type, timestamp and payload round-trip unchanged.
pub async fn c13_metadata_round_trips(ctx: Ctx) -> CaseResult {
    let mut s = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("meta")))
        .await?;
    let m = rich_message();
    ctx.bus().publish(&ctx.topic("meta"), m.clone()).await?;
    let d = ctx.recv(&mut s).await;
    assert_eq!(d.message(), &m);
    assert_eq!(d.topic().as_str(), ctx.topic("meta"));
    d.ack().await?;
    Ok(())
}

/// C13: headers under `polybus-` are the library's; a caller's are dropped.
pub async fn c13_library_headers_are_stripped_on_publish(ctx: Ctx) -> CaseResult {
    let mut s = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("meta")))
        .await?;
    let m = Message::new("x")
        .with_header(header::ATTEMPT, "99")
        .with_header(header::DEAD_LETTER_REASON, "forged")
        .with_header("mine", "kept");
    ctx.bus().publish(&ctx.topic("meta"), m).await?;
    let d = ctx.recv(&mut s).await;
    assert_eq!(d.attempt(), 1);
    let h = d.message().headers();
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(d.message().header("mine"), Some("kept"));
    d.ack().await?;
    Ok(())
}

/// C13: a redelivered message carries the same metadata, and nothing more.
pub async fn c13_metadata_survives_redelivery(ctx: Ctx) -> CaseResult {
    let mut s = ctx
        .bus()
        .subscribe(
            Subscription::new(ctx.topic("meta"))
                .group(ctx.group("g"))
                .retry(ctx.fast_retry()),
        )
        .await?;
    let m = rich_message();
    ctx.bus().publish(&ctx.topic("meta"), m.clone()).await?;
    ctx.recv(&mut s).await.nack().await?;
    let d = ctx.recv(&mut s).await;
    assert_eq!(d.attempt(), 2);
    assert_eq!(d.message(), &m);
    d.ack().await?;
    Ok(())
}

// ---- library namespace and private dead letters ---------------------------------

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
    let dl_group = format!("{}.{group}", crate::subscription::DEAD_LETTER_PREFIX);
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

// ---- handler runtime ----------------------------------------------------------

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

/// C5 (runtime): with per-key lanes, one key's messages are handled one at a
/// time and in order, while the runtime runs several keys at once.
pub async fn c5_runtime_lanes_keep_each_key_in_order(ctx: Ctx) -> CaseResult {
    use crate::consumer::Consumer;
    use std::sync::{Arc, Mutex};

    let group = ctx.group("lanes");
    ctx.bus()
        .subscribe(Subscription::new(ctx.topic("e")).group(group.clone()))
        .await?
        .close(Duration::ZERO)
        .await?;
    let keys = ["k1", "k2", "k3"];
    let per_key = 5;
    let msgs: Vec<Message> = (0..per_key)
        .flat_map(|i| {
            keys.iter()
                .map(move |k| Message::new(format!("{k}:{i}")).with_key(*k))
        })
        .collect();
    for r in ctx.bus().publish_batch(&ctx.topic("e"), msgs).await {
        r?;
    }
    // (key, index, start, end) of every handling.
    type Span = (String, usize, tokio::time::Instant, tokio::time::Instant);
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let consuming = Arc::new(tokio::sync::Notify::new());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (record, called) = (spans.clone(), consuming.clone());
    let mut run = tokio::spawn(
        Consumer::new(
            ctx.bus().clone(),
            Subscription::new(ctx.topic("e")).group(group).prefetch(16),
        )
        .concurrency(4)
        .lanes_by_key(true)
        .shutdown_on(async move {
            let _ = stopped.await;
        })
        .run(move |m: Message| {
            called.notify_one();
            let record = record.clone();
            async move {
                let text = String::from_utf8_lossy(m.payload()).into_owned();
                let (key, index) = text.split_once(':').expect("key:index");
                let start = tokio::time::Instant::now();
                tokio::time::sleep(Duration::from_millis(20)).await;
                let end = tokio::time::Instant::now();
                record
                    .lock()
                    .unwrap()
                    .push((key.to_owned(), index.parse().unwrap(), start, end));
                Ok(())
            }
        }),
    );
    // The runtime subscribes inside run(); patience starts once it handles one.
    until_consuming(&mut run, consuming.notified()).await;
    let deadline = tokio::time::Instant::now() + ctx.target().patience();
    while spans.lock().unwrap().len() < keys.len() * per_key {
        assert!(tokio::time::Instant::now() < deadline, "not all handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    run.await.expect("runtime")?;
    let spans = spans.lock().unwrap();
    for key in keys {
        let mine: Vec<&Span> = spans.iter().filter(|s| s.0 == key).collect();
        let order: Vec<usize> = mine.iter().map(|s| s.1).collect();
        assert_eq!(order, (0..per_key).collect::<Vec<_>>(), "order of {key}");
        for pair in mine.windows(2) {
            assert!(pair[1].2 >= pair[0].3, "{key}: two handlings overlapped");
        }
    }
    Ok(())
}

/// C4 (request-reply): a request gets its own reply, correlated, through a
/// responder; a request nobody answers is a typed time-out.
pub async fn c4_request_reply_round_trips_and_times_out(ctx: Ctx) -> CaseResult {
    use crate::rpc::{CORRELATION_ID, Requester, respond};

    let topic = ctx.topic("price.quote");
    let asked = std::sync::Arc::new(tokio::sync::Notify::new());
    let called = asked.clone();
    let mut responder = tokio::spawn(respond(
        ctx.bus().clone(),
        Subscription::new(topic.clone()).group(ctx.group("pricing")),
        move |request: Message| {
            called.notify_one();
            async move {
                let item = String::from_utf8_lossy(request.payload()).into_owned();
                Ok(Message::new(format!("{item}: 42")))
            }
        },
    ));
    let requester = Requester::new(ctx.bus().clone()).await?;
    // The responder subscribes inside its task, and a new group starts at "now":
    // probe until it has seen a request, however long its subscribe takes.
    // A probe's reply may come after the probe's own short time-out; the
    // requests that count are asked after this, with the full patience.
    let probing = async {
        loop {
            tokio::select! {
                () = asked.notified() => return CaseResult::Ok(()),
                r = requester.request(&topic, Message::new("probe"), Duration::from_millis(500)) => {
                    match r {
                        Ok(_) => return Ok(()),
                        Err(e) if e.is_timeout() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
    };
    until_consuming(&mut responder, probing).await?;
    let patience = ctx.target().patience();
    let first = requester
        .request(&topic, Message::new("widget"), patience)
        .await?;
    assert_eq!(first.payload().as_ref(), b"widget: 42");
    // Several at once, each matched to its own reply.
    let (requester, topic_ref) = (&requester, &topic);
    let asks = ["a", "b", "c", "d"].map(|item| {
        let m = Message::new(item);
        let id = m.id().to_owned();
        async move {
            let reply = requester.request(topic_ref, m, patience).await;
            (item, id, reply)
        }
    });
    for (item, _id, reply) in futures::future::join_all(asks).await {
        let reply = reply?;
        assert_eq!(reply.payload().as_ref(), format!("{item}: 42").as_bytes());
        assert!(reply.header(CORRELATION_ID).is_some_and(|c| !c.is_empty()));
    }
    // Two requests with one message id still get their own replies.
    let twin = Message::new("twin");
    let (r1, r2) = tokio::join!(
        requester.request(&topic, twin.clone(), patience),
        requester.request(&topic, twin.clone(), patience)
    );
    assert_eq!(r1?.payload().as_ref(), b"twin: 42");
    assert_eq!(r2?.payload().as_ref(), b"twin: 42");
    // Nobody answers this topic: a typed time-out, within the time-out.
    let started = tokio::time::Instant::now();
    let err = requester
        .request(
            &ctx.topic("nobody.home"),
            Message::new("?"),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Kind::Timeout, "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    responder.abort();
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
