//! Every name the library reserves, in one place: topic and group prefixes,
//! headers, and the names of retry, dead-letter and reply traffic.
//!
//! Callers cannot publish under [`RESERVED_WORD`], cannot name a group after it,
//! and cannot set a header under [`header::PREFIX`]. Backends keep only their
//! wire-specific names (an AMQP header that carries the key, a Kafka header that
//! carries the id) and build everything else from here.

/// The first word of the library's own topics (dead letters, retries, private
/// groups). Callers cannot publish under it, and wildcards never match it: only a
/// pattern whose first word is literally `polybus` does, so `#` never sees
/// library traffic.
pub const RESERVED_WORD: &str = "polybus";

/// The prefix of every dead-letter topic: `polybus.dead-letter.<group>`.
pub const DEAD_LETTER_PREFIX: &str = "polybus.dead-letter";

/// The pseudo-group under which private subscriptions (those without a group)
/// keep their dead letters, together: read them with
/// `Subscription::dead_letters_of(PRIVATE_DEAD_LETTERS)`.
pub const PRIVATE_DEAD_LETTERS: &str = "polybus-private";

/// The prefix of a private subscription's group: `polybus.private.<uuid>`.
pub const PRIVATE_GROUP_PREFIX: &str = "polybus.private";

/// The prefix of the broker-side retry store of a group (`polybus.retry.<group>`
/// on Kafka, `polybus.retry.<group>.<delay>ms` queues on RabbitMQ).
pub const RETRY_PREFIX: &str = "polybus.retry";

/// The first word of every reply topic. A responder only publishes replies
/// under it, so a request cannot make it publish onto a business topic.
pub const REPLY_PREFIX: &str = "reply";

/// The header naming the topic a reply goes to (request-reply).
pub const REPLY_TO: &str = "reply-to";

/// The header carrying the request's correlation id back on its reply.
pub const CORRELATION_ID: &str = "correlation-id";

/// The dead-letter topic of `group`.
pub fn dead_letter_topic(group: &str) -> String {
    format!("{DEAD_LETTER_PREFIX}.{group}")
}

/// The retry store of `group`: `polybus.retry.<group>` (a Kafka topic; the
/// prefix of RabbitMQ's per-delay retry queues).
pub fn retry_store(group: &str) -> String {
    format!("{RETRY_PREFIX}.{group}")
}

/// A new private group name, unique in time and space.
pub fn private_group() -> String {
    format!("{PRIVATE_GROUP_PREFIX}.{}", uuid::Uuid::now_v7().simple())
}

/// Names of the headers the library owns. Everything under the `polybus-` prefix is
/// the library's: [`publish`](crate::Publisher::publish) drops such headers from the
/// caller's message, so a message re-published from a dead-letter topic starts again
/// at attempt 1.
pub mod header {
    /// The prefix of every library header.
    pub const PREFIX: &str = "polybus-";
    /// The delivery attempt, 1-based, carried across redeliveries.
    pub const ATTEMPT: &str = "polybus-attempt";
    /// On a dead letter: why it was dead-lettered.
    pub const DEAD_LETTER_REASON: &str = "polybus-dead-letter-reason";
    /// On a dead letter: the topic it was first published to.
    pub const ORIGINAL_TOPIC: &str = "polybus-original-topic";
    /// On a dead letter: how many times it was delivered before it was dead-lettered.
    pub const ATTEMPTS: &str = "polybus-attempts";
    /// On a dead letter: the group that dead-lettered it.
    pub const GROUP: &str = "polybus-group";
    /// On a dead letter whose attempts ran out: the error of the last attempt
    /// (the reason reads `gave up after N attempts: <this>`).
    pub const LAST_ERROR: &str = "polybus-last-error";
    /// On a copy in a retry store: the topic the message was published to.
    pub const TOPIC: &str = "polybus-topic";
    /// On a scheduled message (C14): deliver no earlier than this, in
    /// milliseconds since the Unix epoch. Set from
    /// [`Message::deliver_at`](crate::Message::deliver_at) when it is published.
    pub const DELIVER_AT: &str = "polybus-deliver-at";
    /// On a dead letter: when it was dead-lettered, in milliseconds since the
    /// Unix epoch.
    pub const DEAD_LETTERED_AT: &str = "polybus-dead-lettered-at";
    /// On a message redriven from a dead-letter store
    /// ([`DeadLetters::redrive`](crate::DeadLetters::redrive)): when, in
    /// milliseconds since the Unix epoch. Only the library sets it.
    pub const REDRIVEN_AT: &str = "polybus-redriven-at";

    /// Whether `name` is in the library's namespace.
    pub fn is_reserved(name: &str) -> bool {
        name.starts_with(PREFIX)
    }
}
