//! The cases of **C14 Scheduled delivery**: "A message published with a
//! delivery time (`Message::deliver_at`, `deliver_after`) reaches every
//! matching group no earlier than that time, is never lost meanwhile, and a
//! time more than `MAX_SCHEDULE` ahead is refused before sending."
//!
//! Short real delays on every backend: the schedule is a wall-clock time.

use std::time::{Duration, SystemTime};

use crate::message::MAX_SCHEDULE;
use crate::testkit::{CaseResult, Ctx};
use crate::{Kind, Message, Subscription, header};

const DELAY: Duration = Duration::from_millis(1500);

/// Fail the case if `at` is before the message's schedule.
fn assert_not_early(m: &Message, at: SystemTime) {
    let due = m
        .scheduled_for()
        .expect("a scheduled message keeps its time");
    assert!(
        at >= due,
        "delivered {:?} before its time",
        due.duration_since(at).unwrap_or_default()
    );
}

/// C14: a scheduled message waits for its time while others pass it; it is
/// handed out as its first attempt, with its time in `polybus-deliver-at`.
pub async fn c14_scheduled_message_waits_for_its_time(ctx: Ctx) -> CaseResult {
    let sub = Subscription::new(ctx.topic("x")).group(ctx.group("g"));
    let mut s = ctx.bus().subscribe(sub).await?;
    let later = Message::new("later").deliver_after(DELAY);
    ctx.bus().publish(&ctx.topic("x"), later).await?;
    ctx.bus()
        .publish(&ctx.topic("x"), Message::new("now"))
        .await?;
    let d = ctx.recv(&mut s).await;
    assert_eq!(d.message().payload().as_ref(), b"now");
    d.ack().await?;
    let d = ctx.recv(&mut s).await;
    assert_eq!(d.message().payload().as_ref(), b"later");
    assert_not_early(d.message(), SystemTime::now());
    assert_eq!(d.attempt(), 1, "waiting is not an attempt");
    assert!(d.message().header(header::DELIVER_AT).is_some());
    d.ack().await?;
    ctx.expect_quiet(&mut s).await;
    Ok(())
}

/// C14: every matching group gets its copy, none before the time.
pub async fn c14_every_matching_group_gets_it_no_earlier(ctx: Ctx) -> CaseResult {
    let sub = |g: &str| Subscription::new(ctx.topic("x")).group(ctx.group(g));
    let mut a = ctx.bus().subscribe(sub("a")).await?;
    let mut b = ctx.bus().subscribe(sub("b")).await?;
    let m = Message::new("report").deliver_after(DELAY);
    ctx.bus().publish(&ctx.topic("x"), m).await?;
    for s in [&mut a, &mut b] {
        let d = ctx.recv(s).await;
        assert_not_early(d.message(), SystemTime::now());
        d.ack().await?;
    }
    Ok(())
}

/// C14: a time already past delivers at once.
pub async fn c14_a_time_in_the_past_delivers_at_once(ctx: Ctx) -> CaseResult {
    let sub = Subscription::new(ctx.topic("x")).group(ctx.group("g"));
    let mut s = ctx.bus().subscribe(sub).await?;
    let m = Message::new("overdue").deliver_at(SystemTime::now() - Duration::from_secs(3600));
    ctx.bus().publish(&ctx.topic("x"), m).await?;
    let d = ctx.recv(&mut s).await;
    assert_eq!(d.message().payload().as_ref(), b"overdue");
    d.ack().await?;
    Ok(())
}

/// C14, C12: a time beyond the maximum is refused before sending, and the
/// message comes back; in a batch, only its own slot fails.
pub async fn c14_beyond_the_maximum_is_refused_and_handed_back(ctx: Ctx) -> CaseResult {
    let far = || Message::new("far").deliver_after(MAX_SCHEDULE + Duration::from_secs(3600));
    let err = ctx.bus().publish(&ctx.topic("x"), far()).await.unwrap_err();
    assert_eq!(err.kind(), Kind::InvalidInput, "{err}");
    assert_eq!(err.message().payload().as_ref(), b"far");
    let results = ctx
        .bus()
        .publish_batch(&ctx.topic("x"), vec![Message::new("near"), far()])
        .await;
    assert!(results[0].is_ok(), "{:?}", results[0]);
    let err = results[1].as_ref().unwrap_err();
    assert_eq!(err.kind(), Kind::InvalidInput, "{err}");
    Ok(())
}

/// C14, C9: a scheduled message that came early to a consumer that then
/// crashed still comes, on time, to the group's next member.
pub async fn c14_scheduled_message_survives_its_consumers_crash(ctx: Ctx) -> CaseResult {
    let sub = || Subscription::new(ctx.topic("x")).group(ctx.group("g"));
    let mut s = ctx.bus().subscribe(sub()).await?;
    let m = Message::new("later").deliver_after(DELAY);
    ctx.bus().publish(&ctx.topic("x"), m).await?;
    ctx.expect_quiet_for(&mut s, DELAY / 3).await;
    drop(s);
    let mut s = ctx.bus().subscribe(sub()).await?;
    let d = ctx.recv(&mut s).await;
    assert_eq!(d.message().payload().as_ref(), b"later");
    assert_not_early(d.message(), SystemTime::now());
    d.ack().await?;
    ctx.expect_quiet(&mut s).await;
    Ok(())
}
