//! How a [`Message`] travels as a Kafka record (C13): an ordinary record that
//! any Kafka client reads, and that round-trips exactly.
//!
//! | Message | Kafka record |
//! |---|---|
//! | payload | value |
//! | key | key (it also picks the partition) |
//! | headers | native headers, UTF-8 values |
//! | timestamp | the record's CreateTime, in milliseconds |
//! | id | header `polybus-id` |
//! | content type | header `polybus-content-type` |
//!
//! Records that another client wrote have no `polybus-id`: their id is then
//! `topic/partition/offset`, which stays the same on every redelivery. Copies on a
//! group's retry topic carry three more library headers: `polybus-attempt`,
//! `polybus-topic` (where the message was first published) and `polybus-due-ms`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use polybus_core::backend::MessageExt;
use polybus_core::{Headers, Message, header};
use rdkafka::Message as _;
use rdkafka::message::{BorrowedMessage, Header, Headers as _, OwnedHeaders};

pub(crate) const ID: &str = "polybus-id";
pub(crate) const CONTENT_TYPE: &str = "polybus-content-type";
pub(crate) const DUE_MS: &str = "polybus-due-ms";

/// The native headers of `message`, plus `extra` library headers.
pub(crate) fn headers(message: &Message, extra: &[(&str, String)]) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(message.headers().len() + 2 + extra.len());
    for (k, v) in message.headers() {
        out = out.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    out = out.insert(Header {
        key: ID,
        value: Some(message.id().as_bytes()),
    });
    if let Some(ct) = message.content_type() {
        out = out.insert(Header {
            key: CONTENT_TYPE,
            value: Some(ct.as_bytes()),
        });
    }
    for (k, v) in extra {
        out = out.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    out
}

/// What a record carries besides the message itself.
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) message: Message,
    /// `polybus-topic`: where a retried copy was first published.
    pub(crate) topic: Option<String>,
    /// `polybus-attempt` (1 if absent).
    pub(crate) attempt: u32,
    /// `polybus-due-ms`: not to be delivered before this (retry copies).
    pub(crate) due_ms: Option<u64>,
}

/// Rebuild the message of a record.
pub(crate) fn receive(record: &BorrowedMessage<'_>) -> Received {
    let payload = record
        .payload()
        .map(Bytes::copy_from_slice)
        .unwrap_or_default();
    let mut message = Message::from_record(payload);
    let mut headers = Headers::new();
    let mut has_id = false;
    let mut topic = None;
    let mut attempt = 1;
    let mut due_ms = None;
    if let Some(native) = record.headers() {
        for h in native.iter() {
            // Borrowed unless it is not UTF-8: parsed values and the id (kept
            // inside the message) then cost no allocation.
            let value = String::from_utf8_lossy(h.value.unwrap_or_default());
            match h.key {
                ID => {
                    message = message.with_id(&*value);
                    has_id = true;
                }
                CONTENT_TYPE => message = message.with_content_type(value),
                header::TOPIC => topic = Some(value.into_owned()),
                DUE_MS => due_ms = value.parse().ok(),
                header::ATTEMPT => attempt = value.parse().unwrap_or(1).max(1),
                _ => {
                    headers.insert(h.key.to_owned(), value.into_owned());
                }
            }
        }
    }
    if !has_id {
        let id = format!(
            "{}/{}/{}",
            record.topic(),
            record.partition(),
            record.offset()
        );
        message = message.with_id(id);
    }
    if let Some(key) = record.key() {
        message = message.with_key(String::from_utf8_lossy(key).into_owned());
    }
    // A record without a timestamp (an old client's) is stamped on receipt.
    let timestamp = match record.timestamp().to_millis().filter(|ms| *ms >= 0) {
        Some(ms) => UNIX_EPOCH + Duration::from_millis(ms as u64),
        None => SystemTime::now(),
    };
    message = message.with_timestamp(timestamp);
    *message.headers_mut() = headers;
    Received {
        message,
        topic,
        attempt,
        due_ms,
    }
}
