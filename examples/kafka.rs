//! The user service on Kafka: typed options, a pipelined batch publish with
//! `acks=all`, two members of the `audit` consumer group sharing the partitions,
//! a retry through the group's retry topic, and a graceful shutdown.
//!
//! ```text
//! scripts/brokers/tansu.sh start
//! cargo run --example kafka --features kafka [-- kafka://127.0.0.1:9092]
//! ```

use std::time::Duration;

use futures::StreamExt;
use polybus::kafka::{Compression, KafkaOptions};
use polybus::{Message, RetryPolicy, Subscription};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "kafka://127.0.0.1:9092".into());
    // Options parse from the URL; named setters refine them, and `native` passes
    // any librdkafka setting through.
    let options = KafkaOptions::from_url(&url)?
        .partitions(4)
        .compression(Compression::Lz4)
        .native("linger.ms", "2");
    println!("connecting with {options:?}");
    let bus = polybus::kafka::connect_with(options).await?;

    // Two members of one consumer group share its partitions.
    let audit = || {
        Subscription::new("user.#")
            .group("audit-example")
            .prefetch(16)
            .retry(RetryPolicy::fixed(Duration::from_millis(200)).max_attempts(3))
    };
    let mut first = bus.subscribe(audit()).await?;
    let mut second = bus.subscribe(audit()).await?;

    // A batch is pipelined: every record is in flight at once, each resolved by
    // its own delivery report, with its partition and offset.
    let batch: Vec<Message> = (0..6)
        .map(|i| {
            Message::new(format!("{{\"id\":\"u{i}\"}}"))
                .with_key(format!("u{i}"))
                .with_content_type("application/json")
        })
        .collect();
    for receipt in bus.publish_batch("user.created", batch).await {
        let receipt = receipt?;
        println!(
            "user.created written to partition {:?} at offset {:?}",
            receipt.partition, receipt.offset
        );
    }

    // Handle them; the first delivery fails once, moves to the group's retry
    // topic, and comes back after 200 ms with attempt 2.
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

    // Graceful shutdown: stop fetching, let in-flight work settle, commit, leave
    // the group; then flush the producer.
    first.close(Duration::from_secs(5)).await?;
    second.close(Duration::from_secs(5)).await?;
    bus.close().await?;
    println!("closed cleanly");
    Ok(())
}
