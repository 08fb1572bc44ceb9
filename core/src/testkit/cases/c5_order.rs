//! The cases of **C5 Order**: "Messages with the same key, published in sequence,
//! reach a group in that order, unless they are redelivered."
//!
//! That is the only order the contract promises: not across keys, topics,
//! partitions or groups, nor of redeliveries; other cases compare such messages as
//! sets. The handler runtime's per-key lanes are proven here too.

use std::collections::BTreeMap;
use std::time::Duration;

use super::support::{payloads, until_consuming};
use crate::testkit::{CaseResult, Ctx};
use crate::{Message, Subscription};

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
