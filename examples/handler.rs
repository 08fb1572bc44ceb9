//! The handler runtime: a typed handler for `user.created`, a flaky mail server
//! (retries with backoff, then a dead letter), a circuit breaker in front of it,
//! and a graceful shutdown. Runs on memory; pass another URL to run elsewhere.
//!
//! ```text
//! cargo run --example handler
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use polybus::Json;
use polybus::consumer::{Consumer, HandlerError};
use polybus::middleware::CircuitBreaker;
use polybus::{Message, RetryPolicy, Subscription};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct User {
    id: String,
    email: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "memory://".into());
    let bus = polybus::connect(&url).await?;

    // The mail server rejects one address every time.
    let sends = Arc::new(AtomicU32::new(0));
    let breaker = CircuitBreaker::new().failure_threshold(10);
    let welcome = Subscription::new("user.created").group("welcome-email");
    // `start` returns once the group is live: what is published next is handled.
    let running = Consumer::new(bus.clone(), welcome)
        .retry(RetryPolicy::exponential(Duration::from_millis(20)).max_attempts(3))
        .concurrency(4)
        .handler_timeout(Duration::from_secs(2))
        .grace(Duration::from_secs(5))
        // The state every call shares: no clone in the handler.
        .start_with(
            (sends.clone(), breaker.clone()),
            |(sends, breaker): (Arc<AtomicU32>, CircuitBreaker), Json(user): Json<User>| async move {
                // The breaker guards the mail server: fail fast while it is down.
                let permit = breaker.acquire().map_err(HandlerError::retry)?;
                sends.fetch_add(1, Ordering::SeqCst);
                if user.email.starts_with("bounce") {
                    permit.failure();
                    println!("mail to {} failed; it will be retried", user.email);
                    return Err(HandlerError::retry("smtp 451: try again later"));
                }
                permit.success();
                println!("welcome mail sent to {}", user.email);
                Ok(())
            },
        )
        .await?;

    for (id, email) in [("u1", "alice@example.com"), ("u2", "bounce@example.com")] {
        let user = User {
            id: id.into(),
            email: email.into(),
        };
        bus.publish("user.created", Message::json(&user)?.with_key(id))
            .await?;
    }
    bus.publish("user.created", Message::new("{not a user"))
        .await?;

    // Read the dead letters while the runtime works: the bounce after its last
    // attempt, and the payload that is not a user at all.
    let mut dead = bus
        .subscribe(Subscription::dead_letters_of("welcome-email"))
        .await?;
    for _ in 0..2 {
        let batch = dead.next_batch(1, Duration::from_secs(10)).await?;
        for d in batch {
            println!(
                "dead letter after {} attempt(s): {}",
                d.message().header(polybus::header::ATTEMPTS).unwrap_or("?"),
                d.message()
                    .header(polybus::header::DEAD_LETTER_REASON)
                    .unwrap_or("?"),
            );
            d.ack().await?;
        }
    }

    // Graceful shutdown (in a service: `.shutdown_on(polybus::consumer::ctrl_c())`).
    let stats = running.stop().await?;
    println!("{} send attempts; {stats:?}", sends.load(Ordering::SeqCst));
    Ok(())
}
