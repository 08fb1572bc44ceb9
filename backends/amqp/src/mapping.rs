//! How a [`Message`] travels as an AMQP message (C13), so that it round-trips
//! exactly and plain messages from other AMQP clients are readable too.
//!
//! | Message | AMQP |
//! |---|---|
//! | id | `message-id` property |
//! | key | header `polybus-key` (AMQP has no key) |
//! | headers | headers table, values as long strings |
//! | content type | `content-type` property |
//! | timestamp | `timestamp` property (seconds, for other clients) and header `polybus-timestamp-ms` |
//! | payload | body |
//!
//! Every message is persistent (delivery mode 2). Two more library headers ride
//! along on redeliveries: `polybus-attempt`, and `polybus-topic`, the original
//! routing key, which a retry queue's dead-lettering replaces.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use polybus_core::backend::MessageExt;
use polybus_core::{Message, header};

pub(crate) const KEY: &str = "polybus-key";
pub(crate) const TIMESTAMP_MS: &str = "polybus-timestamp-ms";

/// Headers RabbitMQ adds while dead-lettering or counting deliveries: the
/// broker's bookkeeping, not the publisher's metadata.
fn is_broker_header(name: &str) -> bool {
    name == "x-delivery-count"
        || name == "x-death"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
}

fn long(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.as_bytes().to_vec().into())
}

/// Properties for publishing `message`; `extra` are library headers to add.
pub(crate) fn properties(message: &Message, extra: &[(&str, String)]) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (k, v) in message.headers() {
        // The broker's own headers are read as the broker's on receipt: a caller
        // must not be able to forge a delivery count.
        if is_broker_header(k) {
            continue;
        }
        headers.insert(ShortString::from(k.as_str()), long(v));
    }
    if let Some(key) = message.key() {
        headers.insert(KEY.into(), long(key));
    }
    let millis = message.timestamp_millis();
    let millis_text = millis.to_string().into_bytes();
    headers.insert(
        TIMESTAMP_MS.into(),
        AMQPValue::LongString(millis_text.into()),
    );
    for (k, v) in extra {
        headers.insert((*k).into(), long(v));
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(message.id().into())
        .with_timestamp(millis / 1000)
        .with_headers(headers);
    if let Some(ct) = message.content_type() {
        props = props.with_content_type(ct.into());
    }
    props
}

/// A header value as text, whatever type another client gave it; borrowed when
/// it already is text, so values that are only parsed cost no allocation.
fn text(value: &AMQPValue) -> Cow<'_, str> {
    let owned = match value {
        AMQPValue::LongString(s) => return String::from_utf8_lossy(s.as_bytes()),
        AMQPValue::ShortString(s) => return Cow::Borrowed(s.as_str()),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::ByteArray(b) => return String::from_utf8_lossy(b.as_slice()),
        other => format!("{other:?}"),
    };
    Cow::Owned(owned)
}

/// What a delivery carries besides the message itself.
pub(crate) struct Received {
    pub(crate) message: Message,
    /// The topic it was published to.
    pub(crate) topic: Option<String>,
    /// `polybus-attempt`: the attempt this copy was republished for (1 if absent).
    pub(crate) attempt: u32,
    /// Quorum queues' count of deliveries returned without settlement.
    pub(crate) delivery_count: u32,
}

/// Rebuild the message of a delivery.
pub(crate) fn receive(props: &BasicProperties, body: Vec<u8>) -> Received {
    let mut headers = polybus_core::Headers::new();
    let mut key = None;
    let mut millis = None;
    let mut topic = None;
    let mut attempt = 1;
    let mut delivery_count = 0;
    if let Some(table) = props.headers() {
        for (k, v) in table.inner() {
            let name = k.as_str();
            match name {
                KEY => key = Some(text(v).into_owned()),
                TIMESTAMP_MS => millis = text(v).parse::<u64>().ok(),
                header::TOPIC => topic = Some(text(v).into_owned()),
                header::ATTEMPT => attempt = text(v).parse().unwrap_or(1).max(1),
                "x-delivery-count" => delivery_count = text(v).parse().unwrap_or(0),
                _ if is_broker_header(name) => {}
                _ => {
                    headers.insert(name.to_owned(), text(v).into_owned());
                }
            }
        }
    }
    // A message without an id (another client's) gets a fresh one, as if new.
    let mut message = match props.message_id() {
        Some(id) => Message::from_record(Bytes::from(body)).with_id(id.as_str()),
        None => Message::new(Bytes::from(body)),
    };
    if let Some(key) = key {
        message = message.with_key(key);
    }
    if let Some(ct) = props.content_type() {
        message = message.with_content_type(ct.as_str());
    }
    // Plain AMQP clients send seconds, or nothing (then: the time of receipt).
    // (A client that sends nanoseconds would overflow: then keep the receipt time.)
    let millis = millis.or_else(|| props.timestamp().and_then(|s| s.checked_mul(1000)));
    message = message.with_timestamp(match millis {
        Some(ms) => UNIX_EPOCH + Duration::from_millis(ms),
        None => SystemTime::now(),
    });
    *message.headers_mut() = headers;
    Received {
        message,
        topic,
        attempt,
        delivery_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_round_trips_through_properties() {
        let m = Message::new("p")
            .with_id("id-1")
            .with_key("k")
            .with_header("h", "ü")
            .with_content_type("text/plain")
            .with_timestamp(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
        let props = properties(
            &m,
            &[(header::ATTEMPT, "3".into()), (header::TOPIC, "a.b".into())],
        );
        let r = receive(&props, b"p".to_vec());
        assert_eq!(r.message, m);
        assert_eq!(r.attempt, 3);
        assert_eq!(r.topic.as_deref(), Some("a.b"));
    }

    #[test]
    fn plain_messages_from_other_clients_are_readable() {
        let mut h = FieldTable::default();
        h.insert("n".into(), AMQPValue::LongInt(7));
        h.insert("x-death".into(), AMQPValue::LongString("ignored".into()));
        let props = BasicProperties::default()
            .with_timestamp(1_700_000_000)
            .with_headers(h);
        let r = receive(&props, b"hello".to_vec());
        assert_eq!(r.message.header("n"), Some("7"));
        assert_eq!(r.message.headers().len(), 1);
        assert_eq!(r.message.timestamp_millis(), 1_700_000_000_000);
        assert!(
            !r.message.id().is_empty(),
            "an id is made up when none came"
        );
        assert_eq!(r.attempt, 1);
    }
}
