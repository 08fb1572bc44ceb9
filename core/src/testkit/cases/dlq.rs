//! The cases of the **dead-letter operations** ([`DeadLetters`]): counting,
//! listing without settling, redriving and purging a group's dead letters,
//! and an interrupted redrive that loses nothing.
//!
//! Every case stores its dead letters with one key, so on Kafka they sit in
//! one partition in the order they were dead-lettered.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use super::support::{payloads, sorted};
use crate::dead_letters::{DeadLetterRecord, DeadLetters, Take};
use crate::testkit::{CaseResult, Ctx};
use crate::{Capability, DeliveryStream, Kind, Message, Subscription, header};

/// A group on the case's topic `x` that dead-lettered one message per reason,
/// in order (payload `m{i}`, key `k`, header `tenant: acme`); its dead letters
/// (counted: all stored) and its live stream.
async fn dead_lettered(
    ctx: &Ctx,
    reasons: &[&str],
) -> crate::Result<(DeadLetters, DeliveryStream)> {
    let group = ctx.group("g");
    let mut s = ctx
        .bus()
        .subscribe(Subscription::new(ctx.topic("x")).group(group.clone()))
        .await?;
    for i in 0..reasons.len() {
        let m = Message::new(format!("m{i}"))
            .with_key("k")
            .with_header("tenant", "acme");
        ctx.bus().publish(&ctx.topic("x"), m).await?;
    }
    for reason in reasons {
        ctx.recv(&mut s).await.dead_letter(*reason).await?;
    }
    let dead = ctx.bus().dead_letters(&group)?;
    until_count(ctx, &dead, reasons.len() as u64).await?;
    Ok((dead, s))
}

/// Wait until the broker counts `n` dead letters (a delivery given back by a
/// closed reader is requeued by the broker a moment later).
async fn until_count(ctx: &Ctx, dead: &DeadLetters, n: u64) -> crate::Result<()> {
    let deadline = tokio::time::Instant::now() + ctx.target().patience();
    loop {
        let counted = dead.count().await?;
        if counted == n {
            return Ok(());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker counts {counted} dead letters of `{}`, expected {n}",
            dead.group()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn record_payloads(records: &[DeadLetterRecord]) -> Vec<String> {
    payloads(
        &records
            .iter()
            .map(|r| r.message.clone())
            .collect::<Vec<_>>(),
    )
}

/// Listing shows every field of each dead letter, settles nothing (a second
/// listing shows the same), and the count stays.
pub async fn dlq_list_shows_dead_letters_without_settling_them(ctx: Ctx) -> CaseResult {
    let before = SystemTime::now() - Duration::from_secs(60);
    let (dead, _s) = dead_lettered(&ctx, &["no such customer", "card declined"]).await?;
    let listed = dead.list(10).await?;
    assert_eq!(record_payloads(&listed), ["m0", "m1"]);
    let first = &listed[0];
    assert_eq!(first.reason, "no such customer");
    assert_eq!(first.original_topic, ctx.topic("x"));
    assert_eq!(first.group, dead.group());
    assert_eq!(first.attempts, 1);
    assert_eq!(first.last_error, None);
    assert_eq!(first.payload_size, 2);
    assert_eq!(first.message.key(), Some("k"));
    assert_eq!(
        first.headers.get("tenant").map(String::as_str),
        Some("acme")
    );
    assert!(
        first.headers.keys().all(|k| !header::is_reserved(k)),
        "{:?}",
        first.headers
    );
    let at = first.dead_lettered_at.expect("a dead-lettered time");
    assert!(
        at > before && at < SystemTime::now() + Duration::from_secs(60),
        "{at:?}"
    );
    assert_eq!(first.redriven_at, None);
    until_count(&ctx, &dead, 2).await?;
    let again = dead.list(10).await?;
    let ids = |r: &[DeadLetterRecord]| r.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
    assert_eq!(sorted(ids(&again)), sorted(ids(&listed)), "nothing settled");
    assert_eq!(dead.list(1).await?.len(), 1, "the limit holds");
    until_count(&ctx, &dead, 2).await?;
    Ok(())
}

/// A redrive publishes each dead letter to its original topic with its id,
/// key and headers, attempts reset and `polybus-redriven-at` set; the group
/// gets it again, and the store is empty.
pub async fn dlq_redrive_sends_dead_letters_back_with_attempts_reset(ctx: Ctx) -> CaseResult {
    let (dead, mut s) = dead_lettered(&ctx, &["bug 1", "bug 2"]).await?;
    let ids: Vec<String> = dead.list(10).await?.into_iter().map(|r| r.id).collect();
    until_count(&ctx, &dead, 2).await?;
    let report = dead.redrive(Take::all()).await?;
    assert_eq!((report.counted, report.done, report.kept), (2, 2, 0));
    assert!(report.stopped_by.is_none(), "{:?}", report.stopped_by);
    let mut again = Vec::new();
    for _ in 0..2 {
        let d = ctx.recv(&mut s).await;
        assert_eq!(d.attempt(), 1, "attempts start again");
        let m = d.message();
        assert_eq!(m.key(), Some("k"));
        assert_eq!(m.header("tenant"), Some("acme"));
        assert!(m.header(header::REDRIVEN_AT).is_some(), "{m:?}");
        assert_eq!(m.header(header::DEAD_LETTER_REASON), None);
        again.push(m.clone());
        d.ack().await?;
    }
    let got: BTreeSet<String> = again.iter().map(|m| m.id().to_owned()).collect();
    assert_eq!(got, ids.into_iter().collect(), "the same messages, by id");
    until_count(&ctx, &dead, 0).await?;
    assert!(dead.list(10).await?.is_empty());
    Ok(())
}

/// A filter and a limit take only what they select; the rest stay listed.
pub async fn dlq_redrive_takes_what_the_filter_selects_up_to_the_limit(ctx: Ctx) -> CaseResult {
    let (dead, mut s) = dead_lettered(&ctx, &["timeout", "timeout", "timeout", "bad"]).await?;
    let take = Take::all().matching(|r| r.reason == "timeout").limit(2);
    let report = dead.redrive(take).await?;
    assert_eq!((report.done, report.kept), (2, 0), "{report:?}");
    let got = ctx.recv_acked(&mut s, 2).await;
    assert_eq!(payloads(&got), ["m0", "m1"]);
    ctx.expect_quiet(&mut s).await;
    until_count(&ctx, &dead, 2).await?;
    assert_eq!(record_payloads(&dead.list(10).await?), ["m2", "m3"]);
    Ok(())
}

/// Purging drops what it takes; a filter keeps the others (on a log, records
/// after a kept one may stay too: see the module docs of `dead_letters`).
pub async fn dlq_purge_drops_what_it_takes(ctx: Ctx) -> CaseResult {
    let (dead, mut s) = dead_lettered(&ctx, &["timeout", "bad", "timeout"]).await?;
    let report = dead
        .purge(Take::all().matching(|r| r.reason == "timeout"))
        .await?;
    assert_eq!(
        (report.counted, report.done, report.kept),
        (3, 2, 1),
        "{report:?}"
    );
    let left = record_payloads(&dead.list(10).await?);
    if ctx.bus().capabilities().has(Capability::MessageBalancing) {
        assert_eq!(left, ["m1"]);
    } else {
        assert!(left.contains(&"m1".to_owned()), "{left:?}");
    }
    let report = dead.purge(Take::all()).await?;
    assert_eq!(report.done, left.len() as u64, "{report:?}");
    until_count(&ctx, &dead, 0).await?;
    ctx.expect_quiet(&mut s).await;
    Ok(())
}

/// A redrive dropped midway (as Ctrl-C does) loses nothing: what it did not
/// finish is redriven by the next one; a message may come twice, never not.
pub async fn dlq_interrupted_redrive_loses_nothing(ctx: Ctx) -> CaseResult {
    let reasons = ["bug"; 6];
    let (dead, mut s) = dead_lettered(&ctx, &reasons).await?;
    let slow = dead.redrive(Take::all().rate(4));
    // Four a second: about three are done when it is dropped.
    let interrupted = tokio::time::timeout(Duration::from_millis(700), slow).await;
    assert!(
        interrupted.is_err(),
        "the redrive finished: {interrupted:?}"
    );
    let mut got = BTreeSet::new();
    let first = ctx.recv(&mut s).await;
    got.insert(String::from_utf8_lossy(first.message().payload()).into_owned());
    first.ack().await?;
    // The rest: whatever the interrupted one left, redriven again (a given-back
    // delivery may wait for its retry delay before it is counted again).
    let deadline = tokio::time::Instant::now() + ctx.target().patience() * 2;
    while got.len() < reasons.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "lost: only {got:?} came back"
        );
        let report = dead.redrive(Take::all()).await?;
        // The count may include what the interrupted reader still held and
        // had not yet given back (on Kafka, until its member left): the wait
        // for those runs out, and the next round takes them.
        assert!(
            report
                .stopped_by
                .as_ref()
                .is_none_or(|e| e.kind() == Kind::Timeout),
            "{report:?}"
        );
        while let Ok(Some(d)) =
            tokio::time::timeout(Duration::from_millis(500), futures::StreamExt::next(&mut s)).await
        {
            let d = d?;
            got.insert(String::from_utf8_lossy(d.message().payload()).into_owned());
            d.ack().await?;
        }
    }
    let want: BTreeSet<String> = (0..6).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want);
    Ok(())
}

/// Bad input: an invalid group is refused before any I/O; a group that never
/// dead-lettered anything has none.
pub async fn dlq_invalid_group_is_refused_and_an_unknown_one_is_empty(ctx: Ctx) -> CaseResult {
    let err = ctx.bus().dead_letters("").unwrap_err();
    assert_eq!(err.kind(), Kind::InvalidInput, "{err}");
    let err = ctx.bus().dead_letters(&"g".repeat(300)).unwrap_err();
    assert_eq!(err.kind(), Kind::InvalidInput, "{err}");
    let dead = ctx.bus().dead_letters(&ctx.group("never"))?;
    assert_eq!(dead.count().await?, 0);
    assert!(dead.list(10).await?.is_empty());
    let report = dead.redrive(Take::all()).await?;
    assert_eq!((report.counted, report.done), (0, 0));
    Ok(())
}
