//! Publisher middleware composed over a real bus (memory): messages go through,
//! and a closed bus is neither retried nor counted by the breaker.

use std::time::Duration;

use futures::StreamExt;
use polybus::{Kind, Message, Publisher, RetryPolicy, Subscription};
use polybus_core::middleware::{BreakerState, CircuitBreaker, PublisherExt};

#[tokio::test]
async fn composed_middleware_publishes_through_to_subscribers() {
    let bus = polybus::connect("memory://").await.unwrap();
    let mut sub = bus.subscribe(Subscription::new("user.*")).await.unwrap();
    let publisher = bus
        .as_publisher()
        .with_timeout(Duration::from_secs(5))
        .with_retry(RetryPolicy::exponential(Duration::from_millis(10)).max_attempts(3))
        .with_circuit_breaker(CircuitBreaker::new());
    let m = Message::new("u1").with_key("u1");
    publisher.publish("user.created", m.clone()).await.unwrap();
    let d = sub.next().await.unwrap().unwrap();
    assert_eq!(d.message(), &m);
    d.ack().await.unwrap();

    // A closed bus: a typed error, the message back, no retry, breaker unmoved.
    bus.close().await.unwrap();
    for _ in 0..10 {
        let e = publisher
            .publish("user.created", m.clone())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), Kind::Closed);
        assert_eq!(e.into_message(), m);
    }
    assert_eq!(publisher.breaker().state(), BreakerState::Closed);
}
