//! The test harness as a service's tests use it: the `orders` scenario, on the
//! in-memory broker, under paused time. Copy this file to start your own.
#![cfg(feature = "testing")]

use std::time::Duration;

use polybus::consumer::{Consumer, HandlerError, Meta};
use polybus::testing::{Outcome, TestBus};
use polybus::{Json, Message, RetryPolicy, Subscription};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: String,
    cents: u64,
}

/// The service under test: bills each placed order; the payment gateway is
/// flaky on the first try of order "o2"; an order of nothing is refused.
async fn bill((Json(order), meta): (Json<Order>, Meta)) -> Result<(), HandlerError> {
    if order.cents == 0 {
        return Err(HandlerError::permanent(format!(
            "order {} is empty",
            order.id
        )));
    }
    if order.id == "o2" && meta.attempt == 1 {
        Err(std::io::Error::other("payment gateway timed out"))?;
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn orders_are_billed_retried_and_dead_lettered() -> polybus::Result<()> {
    let t = TestBus::memory();
    let running = Consumer::new(
        t.bus().clone(),
        Subscription::new("order.placed").group("billing"),
    )
    .retry(RetryPolicy::exponential(Duration::from_secs(30)).max_attempts(3))
    .start(bill)
    .await?;
    for (id, cents) in [("o1", 1250), ("o2", 990), ("o3", 0)] {
        let order = Order {
            id: id.into(),
            cents,
        };
        t.bus()
            .publish("order.placed", Message::json(&order)?)
            .await?;
    }
    t.bus()
        .publish("order.placed", Message::new("{not json"))
        .await?;
    t.idle().await?; // the 30 s retry delay passes at once under paused time

    let ids = |ms: Vec<std::sync::Arc<Message>>| -> Vec<String> {
        ms.iter()
            .map(|m| m.json_payload::<Order>().unwrap().id)
            .collect()
    };
    assert_eq!(ids(t.acked("billing")), ["o1", "o2"]);
    let nacked = t.nacked("billing");
    assert_eq!(
        (nacked.len(), nacked[0].1),
        (1, 1),
        "o2 failed its first attempt only"
    );
    let dead = t.dead_lettered("billing");
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].1, "order o3 is empty");
    assert!(dead[1].1.starts_with("cannot decode json"), "{}", dead[1].1);
    assert_eq!(t.published("order.*").len(), 4);

    let stats = running.stop().await?;
    let expected = polybus::consumer::Stats {
        acked: 2,
        nacked: 1,
        dead_lettered: 2,
        ..Default::default()
    };
    assert_eq!(stats, expected);
    Ok(())
}

#[tokio::test]
async fn a_handler_can_be_called_without_a_bus() {
    let order = Order {
        id: "o9".into(),
        cents: 0,
    };
    let (delivery, settled) =
        polybus::testing::delivery("order.placed", Message::json(&order).unwrap());
    let arg =
        <(Json<Order>, Meta) as polybus::consumer::FromDelivery>::from_delivery(&delivery).unwrap();
    let e = bill(arg).await.unwrap_err();
    assert!(e.is_permanent());
    delivery.dead_letter(e.to_string()).await.unwrap();
    assert_eq!(
        settled.outcome(),
        Some(Outcome::DeadLettered("order o9 is empty".into()))
    );
}

#[tokio::test]
async fn a_settlement_the_broker_refused_is_recorded_as_such() {
    use futures::StreamExt;
    let t = TestBus::memory();
    let mut sub = t
        .bus()
        .subscribe(Subscription::new("order.placed").group("billing"))
        .await
        .unwrap();
    t.bus()
        .publish("order.placed", Message::new("o1"))
        .await
        .unwrap();
    let d = sub.next().await.unwrap().unwrap();
    sub.close(Duration::ZERO).await.unwrap();
    assert!(d.ack().await.unwrap_err().is_closed());
    assert!(t.acked("billing").is_empty(), "a refused ack is not an ack");
    assert!(matches!(
        t.handled("billing")[0].outcome,
        Outcome::SettleFailed(_)
    ));
}

/// Dead letters kept in a store of the subscription's own naming are not work
/// left to do: the bus is idle with them there.
#[tokio::test(start_paused = true)]
async fn dead_letters_in_a_custom_store_leave_the_bus_idle() {
    let t = TestBus::memory();
    let sub = Subscription::new("order.placed")
        .group("billing")
        .dead_letter_topic("billing.rejects");
    let running = Consumer::new(t.bus().clone(), sub)
        .start(|_: Message| async { Err(HandlerError::permanent("no")) })
        .await
        .unwrap();
    t.bus()
        .publish("order.placed", Message::new("o1"))
        .await
        .unwrap();
    t.idle().await.unwrap();
    assert_eq!(t.dead_lettered("billing").len(), 1);
    assert_eq!(t.group_depth("billing.rejects").map(|d| d.ready), Some(1));
    running.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn idle_says_what_is_left_when_nothing_consumes() {
    let t = TestBus::memory().limit(Duration::from_secs(5));
    // A group that exists but has no running member keeps what is published.
    t.bus()
        .subscribe(Subscription::new("order.placed").group("billing"))
        .await
        .unwrap()
        .close(Duration::ZERO)
        .await
        .unwrap();
    t.bus()
        .publish("order.placed", Message::new("o1"))
        .await
        .unwrap();
    let e = t.idle().await.unwrap_err();
    assert!(e.is_timeout(), "{e}");
    assert!(e.to_string().contains("billing"), "{e}");
    assert_eq!(t.group_depth("billing").map(|d| d.ready), Some(1));
}

/// The same harness on a real broker, by URL: recorded through the bus, idle
/// once nothing is unsettled and nothing has happened for a quiet moment.
#[cfg(any(feature = "amqp", feature = "kafka"))]
async fn billed_on(url: &str, hint: &str) {
    let t = TestBus::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot reach {url}: {e}; {hint}"));
    let topic = format!("order.placed.{}", polybus_core::testkit::unique_name());
    let group = format!("billing-{}", polybus_core::testkit::unique_name());
    let running = Consumer::new(
        t.bus().clone(),
        Subscription::new(topic.as_str()).group(&group),
    )
    .retry(RetryPolicy::exponential(Duration::from_millis(100)).max_attempts(3))
    .start(bill)
    .await
    .unwrap();
    for (id, cents) in [("o1", 1250), ("o2", 990), ("o3", 0)] {
        let order = Order {
            id: id.into(),
            cents,
        };
        t.bus()
            .publish(&topic, Message::json(&order).unwrap())
            .await
            .unwrap();
    }
    let mut running = running;
    running.wait_for(|s| s.acked + s.dead_lettered == 3).await;
    t.idle().await.unwrap();
    assert_eq!(t.acked(&group).len(), 2);
    assert_eq!(t.nacked(&group).len(), 1);
    assert_eq!(t.dead_lettered(&group)[0].1, "order o3 is empty");
    running.stop().await.unwrap();
}

#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_records_on_rabbitmq() {
    let Some(url) = common::url() else { return };
    billed_on(&url, common::HINT).await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_records_on_kafka() {
    let Some(url) = common::kafka_url() else {
        return;
    };
    billed_on(&url, common::KAFKA_HINT).await;
}

#[cfg(any(feature = "amqp", feature = "kafka"))]
mod common;
