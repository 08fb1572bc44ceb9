//! Make dead letters to operate: a `billing` group whose handler fails on
//! every order dead-letters them at the first failure. Then inspect and send
//! them back with the `polybus` tool (README, "Operating"):
//!
//! ```text
//! cargo run --example dead_letters -- amqp://guest:guest@127.0.0.1:5672/polybus-test
//! polybus --url amqp://guest:guest@127.0.0.1:5672/polybus-test dlq list billing
//! ```

use std::time::Duration;

use futures::StreamExt;
use polybus::{Message, RetryPolicy, Subscription};

#[tokio::main]
async fn main() -> polybus::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let bus = polybus::connect(&url).await?;
    let mut billing = bus
        .subscribe(
            Subscription::new("orders.created")
                .group("billing")
                .retry(RetryPolicy::fixed(Duration::from_millis(100)).max_attempts(1)),
        )
        .await?;
    for order in ["order 41", "order 42"] {
        let m = Message::new(order)
            .with_key("customer-7")
            .with_header("tenant", "acme");
        bus.publish("orders.created", m).await?;
    }
    for _ in 0..2 {
        let Some(delivery) = billing.next().await else {
            break;
        };
        let delivery = delivery?;
        println!("billing failed on {}", delivery.message().id());
        delivery.nack_because("card declined").await?;
    }
    billing.close(Duration::from_secs(1)).await?;
    bus.close().await
}
