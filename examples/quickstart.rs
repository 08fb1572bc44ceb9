//! The quickstart: a user service publishes events; a `welcome-email` group and an
//! `audit` group consume them; a flaky mail server makes one send fail until its
//! retries run out, so it ends in the dead-letter topic.
//!
//! Runs on the in-memory broker, no broker needed:
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! The same code runs on RabbitMQ or Kafka: change the URL (and enable the feature).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use polybus::{Message, RetryPolicy, Subscription, header};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct User {
    id: String,
    email: String,
    name: String,
    status: String,
    timestamp: u64,
}

fn user(id: &str, name: &str, status: &str) -> User {
    User {
        id: id.into(),
        email: format!("{name}@example.com").to_lowercase(),
        name: name.into(),
        status: status.into(),
        timestamp: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

/// A mail server on which one mailbox is always unavailable.
async fn send_welcome_email(user: &User) -> Result<(), String> {
    if user.name == "Mallory" {
        return Err(format!("smtp: mailbox {} unavailable", user.email));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "memory://".into());
    let bus = polybus::connect(&url).await?;
    println!("connected to {url}");

    // Subscribing first makes the groups exist: new groups start at "now".
    let retry = RetryPolicy::exponential(Duration::from_millis(50))
        .max_attempts(3)
        .jitter(false);
    let mut welcome = bus
        .subscribe(
            Subscription::new("user.created")
                .group("welcome-email")
                .prefetch(8)
                .retry(retry),
        )
        .await?;
    let mut audit = bus
        .subscribe(Subscription::new("user.#").group("audit"))
        .await?;

    // Publish: each user's events share a key, so they stay in order.
    let events = [
        ("user.created", user("u1", "Alice", "active")),
        ("user.created", user("u2", "Mallory", "active")),
        ("user.updated", user("u1", "Alice", "suspended")),
        ("user.deleted", user("u1", "Alice", "deleted")),
    ];
    for (topic, u) in &events {
        let message = Message::json(u)?.with_key(&u.id);
        bus.publish(topic, message).await?;
        println!("published {topic} for {}", u.id);
    }

    // The audit group sees every user event, in order per user.
    for _ in 0..events.len() {
        let delivery = audit.next().await.expect("audit subscription is live")?;
        let u: User = delivery.json()?;
        println!("audit: {} {} ({})", delivery.topic(), u.id, u.status);
        delivery.ack().await?;
    }

    // The welcome-email group: a failure nacks; the retry policy waits 50 ms, then
    // 100 ms; after the third attempt the message is dead-lettered.
    let mut sent = 0;
    let mut dead = 0;
    while sent + dead < 2 {
        let delivery = welcome
            .next()
            .await
            .expect("welcome subscription is live")?;
        let u: User = delivery.json()?;
        match send_welcome_email(&u).await {
            Ok(()) => {
                println!("welcome-email: sent to {}", u.email);
                delivery.ack().await?;
                sent += 1;
            }
            Err(e) => {
                let attempt = delivery.attempt();
                println!(
                    "welcome-email: attempt {attempt} for {} failed: {e}",
                    u.email
                );
                if attempt == 3 {
                    dead += 1;
                }
                delivery.nack().await?;
            }
        }
    }

    // The dead letter, with why and from where.
    let mut dead_letters = bus
        .subscribe(Subscription::dead_letters_of("welcome-email"))
        .await?;
    let d = dead_letters.next().await.expect("dead letters are kept")?;
    let m = d.message();
    println!(
        "dead letter: {} from {} after {} attempts: {}",
        m.json_payload::<User>()?.email,
        m.header(header::ORIGINAL_TOPIC).unwrap_or("?"),
        m.header(header::ATTEMPTS).unwrap_or("?"),
        m.header(header::DEAD_LETTER_REASON).unwrap_or("?"),
    );
    d.ack().await?;

    // Graceful shutdown: stop fetching, let in-flight work settle, close.
    welcome.close(Duration::from_secs(5)).await?;
    audit.close(Duration::from_secs(5)).await?;
    dead_letters.close(Duration::from_secs(5)).await?;
    bus.close().await?;
    println!("done: {sent} welcome email(s) sent, {dead} dead letter(s)");
    Ok(())
}
