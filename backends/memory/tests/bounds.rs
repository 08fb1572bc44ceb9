//! Bounded groups on the in-memory broker: what the conformance cases of
//! `bounded-groups` leave to the backend (the publish timeout, the default
//! bound from the URL, several groups, redeclaration, messages the broker
//! already holds).

use std::time::Duration;

use futures::StreamExt;
use polybus_core::testkit::unique_name;
use polybus_core::{Bus, Kind, Message, Overflow, RetryPolicy, Subscription};
use polybus_memory::{GroupDepth, MemoryBus, MemoryOptions};

/// A bus on a fresh named broker opened with `options`, and a second
/// connection to it for inspecting its groups.
fn bus_and_inspector(options: MemoryOptions) -> (Bus, MemoryBus) {
    let options = options.or_named(unique_name());
    let inspector = MemoryBus::open(options.clone());
    (Bus::new(MemoryBus::open(options)), inspector)
}

fn ready(bus: &MemoryBus, group: &str) -> usize {
    bus.group_depth(group).expect("the group exists").ready
}

#[tokio::test(start_paused = true)]
async fn a_blocked_publish_times_out_and_hands_the_message_back() {
    let options = MemoryOptions::from_url("memory://?max_depth=2&publish_timeout_ms=5000").unwrap();
    let bus = Bus::new(MemoryBus::open(options));
    let _idle = bus
        .subscribe(Subscription::new("t").group("g"))
        .await
        .unwrap();
    for p in ["a", "b"] {
        bus.publish("t", Message::new(p)).await.unwrap();
    }
    let start = tokio::time::Instant::now();
    let e = bus
        .publish("t", Message::new("c").with_id("c-id"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::Timeout, "{e}");
    assert!(e.to_string().contains("group `g` stayed full"), "{e}");
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(e.into_message().id(), "c-id");
}

#[tokio::test]
async fn the_default_bound_and_overflow_come_from_the_url() {
    let bus = polybus_memory::connect("memory://?max_depth=3&overflow=reject-publish").unwrap();
    let _idle = bus
        .subscribe(Subscription::new("t").group("g"))
        .await
        .unwrap();
    for i in 0..3 {
        bus.publish("t", Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let e = bus.publish("t", Message::new("m3")).await.unwrap_err();
    assert_eq!(e.kind(), Kind::Refused, "{e}");
    assert!(e.to_string().contains("max_depth 3"), "{e}");
}

#[tokio::test]
async fn a_message_for_several_groups_goes_to_all_or_none() {
    let (bus, memory) = bus_and_inspector(MemoryOptions::default().unbounded());
    let _a = bus
        .subscribe(
            Subscription::new("t")
                .group("a")
                .max_depth(1)
                .overflow(Overflow::RejectPublish),
        )
        .await
        .unwrap();
    let _b = bus
        .subscribe(Subscription::new("t").group("b"))
        .await
        .unwrap();
    bus.publish("t", Message::new("m0")).await.unwrap();
    let e = bus.publish("t", Message::new("m1")).await.unwrap_err();
    assert!(e.error().is_refused(), "{e}");
    assert!(e.to_string().contains("group `a`"), "{e}");
    // Refused as a whole: the unbounded group did not get it either.
    assert_eq!((ready(&memory, "a"), ready(&memory, "b")), (1, 1));
}

#[tokio::test]
async fn a_group_redeclared_with_another_bound_is_refused() {
    let bus = polybus_memory::connect("memory://").unwrap();
    let bounded = |n| Subscription::new("t").group("g").max_depth(n);
    let _first = bus.subscribe(bounded(5)).await.unwrap();
    let e = bus.subscribe(bounded(6)).await.unwrap_err();
    assert_eq!(e.kind(), Kind::Refused, "{e}");
    assert!(
        e.to_string().contains("exists with max_depth 5") && e.to_string().contains("max_depth 6"),
        "{e}"
    );
    let e = bus
        .subscribe(bounded(5).overflow(Overflow::RejectPublish))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::Refused, "{e}");
    // The same bound, or none, joins the group as it is.
    let _same = bus.subscribe(bounded(5)).await.unwrap();
    let _unset = bus
        .subscribe(Subscription::new("t").group("g"))
        .await
        .unwrap();
    let e = bus
        .subscribe(Subscription::new("t").group("h").max_depth(0))
        .await
        .unwrap_err();
    assert!(e.is_invalid_input(), "{e}");
}

#[tokio::test]
async fn retries_into_a_full_group_are_never_refused() {
    let (bus, memory) = bus_and_inspector(MemoryOptions::default());
    let mut sub = bus
        .subscribe(
            Subscription::new("t")
                .group("g")
                .prefetch(2)
                .max_depth(1)
                .overflow(Overflow::RejectPublish)
                .retry(RetryPolicy::fixed(Duration::ZERO)),
        )
        .await
        .unwrap();
    bus.publish("t", Message::new("m0")).await.unwrap();
    let m0 = sub.next().await.unwrap().unwrap();
    bus.publish("t", Message::new("m1")).await.unwrap();
    assert!(bus.publish("t", Message::new("m2")).await.is_err());
    // The group is full, and the retry still goes back into it.
    m0.nack().await.unwrap();
    let GroupDepth {
        ready,
        delayed,
        unsettled,
    } = memory.group_depth("g").unwrap();
    assert_eq!((ready + delayed, unsettled), (2, 0));
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = sub.next().await.unwrap().unwrap();
        got.push(String::from_utf8(d.message().payload().to_vec()).unwrap());
        d.ack().await.unwrap();
    }
    got.sort();
    assert_eq!(got, ["m0", "m1"]);
}

#[tokio::test]
async fn publishers_waiting_on_a_group_that_goes_away_are_released() {
    let bus = polybus_memory::connect("memory://").unwrap();
    // A private group, deleted when its only subscriber leaves.
    let sub = bus
        .subscribe(Subscription::new("t").max_depth(1))
        .await
        .unwrap();
    bus.publish("t", Message::new("m0")).await.unwrap();
    let b = bus.clone();
    let blocked = tokio::spawn(async move { b.publish("t", Message::new("m1")).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!blocked.is_finished());
    drop(sub);
    // As for any message no group matches: taken, and dropped.
    tokio::time::timeout(Duration::from_secs(10), blocked)
        .await
        .expect("released")
        .unwrap()
        .unwrap();
}
