//! The cases of **C13 Metadata**: "Message id, key, headers, content type and
//! timestamp round-trip unchanged on every backend; headers under the `polybus-`
//! prefix are the library's."

use std::time::{Duration, UNIX_EPOCH};

use crate::testkit::{CaseResult, Ctx, untraced};
use crate::{Message, Subscription, header};

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
    assert_eq!(untraced(d.message()), m);
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
    let untraced = untraced(d.message());
    let h = untraced.headers();
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
    assert_eq!(untraced(d.message()), m);
    d.ack().await?;
    Ok(())
}
