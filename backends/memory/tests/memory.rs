//! What only the in-memory backend promises: virtual time, named brokers, queue
//! depths, and that it holds up under a multi-threaded runtime.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use polybus_core::testkit::unique_name;
use polybus_core::{Message, RetryPolicy, Subscription};
use polybus_memory::{GroupDepth, MemoryBus, MemoryOptions};

#[tokio::test(start_paused = true)]
async fn a_one_minute_retry_takes_no_real_time() {
    let bus = polybus_memory::connect("memory://").unwrap();
    let mut sub = bus
        .subscribe(
            Subscription::new("job")
                .group("g")
                .retry(RetryPolicy::fixed(Duration::from_secs(60))),
        )
        .await
        .unwrap();
    bus.publish("job", Message::new("x")).await.unwrap();
    let real = std::time::Instant::now();
    let virtual_start = tokio::time::Instant::now();
    sub.next().await.unwrap().unwrap().nack().await.unwrap();
    let again = sub.next().await.unwrap().unwrap();
    assert_eq!(again.attempt(), 2);
    let waited = virtual_start.elapsed();
    assert!(
        waited >= Duration::from_secs(60) && waited <= Duration::from_millis(60_001),
        "{waited:?}"
    );
    assert!(real.elapsed() < Duration::from_secs(5));
    again.ack().await.unwrap();
}

#[tokio::test]
async fn crash_redelivery_is_marked_and_counted() {
    let name = unique_name();
    let bus = polybus_memory::connect(&format!("memory://{name}")).unwrap();
    let sub = || Subscription::new("x").group("g");
    let mut a = bus.subscribe(sub()).await.unwrap();
    bus.publish("x", Message::new("m")).await.unwrap();
    let held = a.next().await.unwrap().unwrap();
    drop(a);
    // The stream is gone, so the delivery can no longer be settled.
    assert!(held.ack().await.unwrap_err().is_closed());
    let mut b = bus.subscribe(sub()).await.unwrap();
    let again = b.next().await.unwrap().unwrap();
    assert!(again.redelivered());
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
}

#[tokio::test]
async fn named_brokers_are_shared_and_die_with_their_last_connection() {
    let name = unique_name();
    let url = format!("memory://{name}");
    let first = polybus_memory::connect(&url).unwrap();
    let inspector = MemoryBus::open(MemoryOptions::named(&name));
    first
        .subscribe(Subscription::new("x").group("g"))
        .await
        .unwrap()
        .close(Duration::ZERO)
        .await
        .unwrap();
    first.publish("x", Message::new("kept")).await.unwrap();
    let depth = inspector.group_depth("g").unwrap();
    assert_eq!(
        depth,
        GroupDepth {
            ready: 1,
            delayed: 0,
            unsettled: 0
        }
    );
    drop(first);
    drop(inspector);
    let fresh = MemoryBus::open(MemoryOptions::named(&name));
    assert_eq!(
        fresh.group_depth("g"),
        None,
        "a new broker, not the old one"
    );
}

#[tokio::test]
async fn private_groups_vanish_with_their_subscriber() {
    let name = unique_name();
    let bus = polybus_memory::connect(&format!("memory://{name}")).unwrap();
    let inspector = MemoryBus::open(MemoryOptions::named(&name));
    let sub = bus.subscribe(Subscription::new("x")).await.unwrap();
    let groups = inspector.groups();
    assert_eq!(
        groups.len(),
        2,
        "the private group and the dead-letter store: {groups:?}"
    );
    assert_eq!(groups[0], "polybus.dead-letter.polybus-private");
    assert!(groups[1].starts_with("polybus.private."), "{groups:?}");
    bus.publish("x", Message::new("m")).await.unwrap();
    drop(sub);
    assert_eq!(inspector.groups(), ["polybus.dead-letter.polybus-private"]);
}

#[tokio::test]
async fn delayed_and_unsettled_are_visible_in_depth() {
    let name = unique_name();
    let bus = polybus_memory::connect(&format!("memory://{name}")).unwrap();
    let inspector = MemoryBus::open(MemoryOptions::named(&name));
    let mut sub = bus
        .subscribe(
            Subscription::new("x")
                .group("g")
                .retry(RetryPolicy::fixed(Duration::from_secs(3600))),
        )
        .await
        .unwrap();
    bus.publish("x", Message::new("a")).await.unwrap();
    bus.publish("x", Message::new("b")).await.unwrap();
    let a = sub.next().await.unwrap().unwrap();
    let b = sub.next().await.unwrap().unwrap();
    a.nack().await.unwrap();
    let depth = inspector.group_depth("g").unwrap();
    assert_eq!((depth.ready, depth.delayed, depth.unsettled), (0, 1, 1));
    b.ack().await.unwrap();
}

/// Two members on a multi-threaded runtime race for 20 000 messages: each is
/// delivered exactly once, and a member at its prefetch is never given more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_racing_on_threads_keep_exactly_once_and_prefetch() {
    use futures::FutureExt;

    let bus = polybus_memory::connect("memory://").unwrap();
    let prefetch = 8;
    let n = 20_000;
    let sub = || {
        Subscription::new("job.*")
            .group("workers")
            .prefetch(prefetch)
    };
    let seen = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n)));
    let mut workers = Vec::new();
    for w in 0..2 {
        let mut stream = bus.subscribe(sub()).await.unwrap();
        let seen = seen.clone();
        workers.push(tokio::spawn(async move {
            let mut pending = Vec::new();
            let mut times_full = 0;
            let mut bursts = 0usize;
            loop {
                let next = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
                let Ok(Some(d)) = next else { break };
                let d = d.unwrap();
                seen.lock().unwrap().push(d.message().id().to_owned());
                pending.push(d);
                // Settle in bursts of varying size, so members sit at their prefetch.
                if pending.len() == prefetch as usize {
                    times_full += 1;
                    assert!(
                        stream.next().now_or_never().is_none(),
                        "a member holding {prefetch} unsettled was given another"
                    );
                }
                let burst = if bursts.is_multiple_of(2) {
                    prefetch as usize
                } else {
                    3 + w
                };
                if pending.len() == burst {
                    bursts += 1;
                    for d in pending.drain(..) {
                        d.ack().await.unwrap();
                    }
                }
            }
            for d in pending.drain(..) {
                d.ack().await.unwrap();
            }
            times_full
        }));
    }
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for i in 0..n {
                bus.publish("job.run", Message::new(i.to_string()))
                    .await
                    .unwrap();
            }
        })
    };
    publisher.await.unwrap();
    let mut times_full = 0;
    for w in workers {
        times_full += w.await.unwrap();
    }
    assert!(
        times_full > 0,
        "the prefetch limit was never reached, so never tested"
    );
    let seen = seen.lock().unwrap();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), n, "deliveries");
    assert_eq!(unique.len(), n, "distinct messages");
}

/// A member fetches ready messages in batches, within its prefetch; those it
/// never handed out go back unmarked when it closes or crashes: only a
/// delivery a consumer saw counts as an attempt.
#[tokio::test]
async fn fetched_but_unseen_messages_go_back_as_they_were() {
    let name = unique_name();
    let bus = polybus_memory::connect(&format!("memory://{name}")).unwrap();
    let inspector = MemoryBus::open(MemoryOptions::named(&name));
    let sub = || Subscription::new("x").group("g").prefetch(10);
    let publish = |n: usize| {
        let bus = bus.clone();
        async move {
            for i in 0..n {
                bus.publish("x", Message::new(format!("m{i}")).with_key("k"))
                    .await
                    .unwrap();
            }
        }
    };
    // Closed: the unseen four come back as first deliveries.
    let mut a = bus.subscribe(sub()).await.unwrap();
    publish(5).await;
    let first = a.next().await.unwrap().unwrap();
    let depth = inspector.group_depth("g").unwrap();
    assert_eq!(
        (depth.ready, depth.unsettled),
        (0, 5),
        "fetched as one batch"
    );
    first.ack().await.unwrap();
    a.close(Duration::ZERO).await.unwrap();
    let mut b = bus.subscribe(sub()).await.unwrap();
    let m1 = b.next().await.unwrap().unwrap();
    assert_eq!(m1.message().payload().as_ref(), b"m1");
    assert_eq!((m1.attempt(), m1.redelivered()), (1, false));
    // Crash holding m1 unsettled, with m2..m4 fetched and unseen.
    drop(b);
    std::mem::forget(m1);
    let mut c = bus.subscribe(sub()).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let d = c.next().await.unwrap().unwrap();
        seen.push((
            String::from_utf8(d.message().payload().to_vec()).unwrap(),
            d.attempt(),
            d.redelivered(),
        ));
        d.ack().await.unwrap();
    }
    assert_eq!(
        seen,
        [
            ("m1".to_owned(), 2, true),
            ("m2".to_owned(), 1, false),
            ("m3".to_owned(), 1, false),
            ("m4".to_owned(), 1, false),
        ]
    );
}
