//! The user service on RabbitMQ: typed options, a pipelined batch publish with
//! publisher confirms, two competing members of the `audit` group, a retry that
//! waits on the broker, and a graceful shutdown.
//!
//! ```text
//! scripts/brokers/rabbitmq.sh start
//! cargo run --example amqp --features amqp [-- amqp://guest:guest@127.0.0.1:5672/polybus-test]
//! ```

use std::time::Duration;

use futures::StreamExt;
use polybus::amqp::AmqpOptions;
use polybus::{Message, RetryPolicy, Subscription};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/polybus-test".into());
    // Options parse from the URL; named setters refine them. Debug output and
    // errors never show the password.
    let options = AmqpOptions::from_url(&url)?
        .exchange("users")
        .publish_timeout(Duration::from_secs(10));
    println!("connecting with {options:?}");
    let bus = polybus::amqp::connect_with(options).await?;

    // Two members of one durable group compete for its messages.
    let audit = || {
        Subscription::new("user.#")
            .group("audit-example")
            .prefetch(16)
            .retry(RetryPolicy::fixed(Duration::from_millis(200)).max_attempts(3))
    };
    let mut first = bus.subscribe(audit()).await?;
    let mut second = bus.subscribe(audit()).await?;

    // A batch is pipelined: every publish is in flight at once, each resolved by
    // its own confirm.
    let batch: Vec<Message> = (0..6)
        .map(|i| {
            Message::new(format!("{{\"id\":\"u{i}\"}}"))
                .with_key(format!("u{i}"))
                .with_content_type("application/json")
        })
        .collect();
    let confirmed = bus
        .publish_batch("user.created", batch)
        .await
        .into_iter()
        .filter(Result::is_ok)
        .count();
    println!("published 6 user.created events, {confirmed} confirmed by the broker");

    // Handle them; the first delivery fails once, and comes back after the
    // retry queue's 200 ms, with attempt 2.
    let mut handled = 0;
    let mut failed_once = false;
    while handled < 6 {
        let (member, delivery) = tokio::select! {
            Some(d) = first.next() => ("first", d?),
            Some(d) = second.next() => ("second", d?),
        };
        let payload = String::from_utf8_lossy(delivery.message().payload()).into_owned();
        if !failed_once {
            failed_once = true;
            println!(
                "{member}: {payload} failed on attempt {}; nack",
                delivery.attempt()
            );
            delivery.nack().await?;
            continue;
        }
        println!("{member}: {payload} (attempt {})", delivery.attempt());
        delivery.ack().await?;
        handled += 1;
    }

    // Graceful shutdown: stop fetching, let in-flight work settle, close.
    first.close(Duration::from_secs(5)).await?;
    second.close(Duration::from_secs(5)).await?;
    bus.close().await?;
    println!("done");
    Ok(())
}
