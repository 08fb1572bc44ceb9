//! The cases of **C4 Publish**: "`publish` returns `Ok` only once the broker has
//! taken responsibility: a publisher confirm on RabbitMQ, a delivery report with
//! `acks=all` and idempotence on Kafka, enqueueing on memory. Persistent delivery
//! is the default (durable exchanges/queues, delivery mode 2). A failure returns
//! the message and says whether it may still have been delivered."
//!
//! Request-reply, built on publish, is proven here too, and so are bounded
//! groups (capability `bounded-groups`): a publish to a full group waits for
//! room or is refused, and hands the message back either way.

use std::time::Duration;

use super::support::{ids, payloads, until_consuming};
use crate::testkit::{CaseError, CaseResult, Ctx};
use crate::{Capability, Kind, Message, Overflow, Subscription};

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

/// A bounded group with one delivery held unsettled (which the bound does not
/// count) and `max_depth` more ready: full.
async fn full_group(
    ctx: &Ctx,
    overflow: Overflow,
) -> Result<(crate::DeliveryStream, crate::Delivery), CaseError> {
    ctx.require(Capability::BoundedGroups)?;
    let mut sub = ctx
        .bus()
        .subscribe(
            Subscription::new(ctx.topic("b"))
                .group(ctx.group("g"))
                .prefetch(1)
                .max_depth(2)
                .overflow(overflow),
        )
        .await?;
    ctx.bus()
        .publish(&ctx.topic("b"), Message::new("m0").with_key("k"))
        .await?;
    let held = ctx.recv(&mut sub).await;
    for p in ["m1", "m2"] {
        ctx.bus()
            .publish(&ctx.topic("b"), Message::new(p).with_key("k"))
            .await?;
    }
    Ok((sub, held))
}

/// C4 (bounded groups): a publish to a full `reject-publish` group fails at
/// once as refused and hands the message back; once the group drains, the same
/// message is taken, and nothing was lost or duplicated.
pub async fn c4_full_group_rejects_publish_and_hands_the_message_back(ctx: Ctx) -> CaseResult {
    let (mut sub, held) = full_group(&ctx, Overflow::RejectPublish).await?;
    let refused = ctx
        .bus()
        .publish(
            &ctx.topic("b"),
            Message::new("m3").with_key("k").with_id("m3-id"),
        )
        .await
        .expect_err("a full reject-publish group refuses");
    assert_eq!(refused.kind(), Kind::Refused, "{refused}");
    assert!(!refused.may_have_been_delivered(), "{refused}");
    let m3 = refused.into_message();
    assert_eq!((m3.id(), m3.payload().as_ref()), ("m3-id", &b"m3"[..]));
    held.ack().await?;
    let m1 = ctx.recv(&mut sub).await;
    // One ready message left: room for the one handed back.
    ctx.bus().publish(&ctx.topic("b"), m3).await?;
    m1.ack().await?;
    let rest = ctx.recv_acked(&mut sub, 2).await;
    assert_eq!(payloads(&rest), ["m2", "m3"]);
    assert_eq!(ids(&rest)[1], "m3-id");
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// C4 (bounded groups): a publish to a full `block` group (the default
/// overflow) waits, as flow control holds a publisher back, and completes once
/// consumers make room; its message then arrives in order.
pub async fn c4_full_group_holds_the_publisher_until_there_is_room(ctx: Ctx) -> CaseResult {
    let (mut sub, held) = full_group(&ctx, Overflow::Block).await?;
    let bus = ctx.bus().clone();
    let topic = ctx.topic("b");
    let blocked =
        tokio::spawn(async move { bus.publish(&topic, Message::new("m3").with_key("k")).await });
    tokio::time::sleep(ctx.target().quiet()).await;
    assert!(
        !blocked.is_finished(),
        "a publish to a full group returned at once"
    );
    held.ack().await?;
    let m1 = ctx.recv(&mut sub).await;
    tokio::time::timeout(ctx.target().patience(), blocked)
        .await
        .expect("the blocked publish completes once there is room")
        .expect("the publishing task")?;
    m1.ack().await?;
    let rest = ctx.recv_acked(&mut sub, 2).await;
    assert_eq!(payloads(&rest), ["m2", "m3"]);
    ctx.expect_quiet(&mut sub).await;
    Ok(())
}

/// C4 (bounded groups): a backend that cannot bound its groups says so with a
/// typed error rather than quietly letting the group grow.
pub async fn c4_bound_without_capability_is_unsupported(ctx: Ctx) -> CaseResult {
    if ctx.bus().capabilities().has(Capability::BoundedGroups) {
        return Err(CaseError::Skip(
            "the backend claims `bounded-groups`".into(),
        ));
    }
    let err = ctx
        .bus()
        .subscribe(
            Subscription::new(ctx.topic("b"))
                .group(ctx.group("g"))
                .max_depth(10),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Kind::Unsupported, "{err}");
    assert!(err.to_string().contains("bounded-groups"), "{err}");
    Ok(())
}
