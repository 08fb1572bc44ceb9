//! The checks [`Bus`](crate::Bus) makes before any backend sees a publish (C1,
//! C12), and the failure type a backend's publish reports.

use crate::error::{Error, Kind, PublishError, Result};
use crate::message::{MAX_SCHEDULE, Message};
use crate::topic::Topic;

/// The longest id, content type and header name: AMQP carries them as short
/// strings, so every backend keeps the same limit.
pub const MAX_SHORT_STRING: usize = 255;

/// A valid topic (C1) outside the library's namespace, a payload within
/// `max_payload` (C12), metadata every backend can carry, and no caller-set
/// library headers. On failure the message comes back in the error. Allocates
/// nothing when the message is fine.
pub(crate) fn prepare_publish(
    topic: &str,
    mut message: Message,
    max_payload: usize,
) -> Result<Message, PublishError> {
    if let Err(e) = check_publish(topic, &message, max_payload) {
        return Err(PublishError::not_delivered(e, message));
    }
    message.strip_library_headers();
    Ok(message)
}

fn check_publish(topic: &str, message: &Message, max_payload: usize) -> Result<()> {
    Topic::validate(topic)?;
    if Topic::is_reserved(topic) {
        return Err(Error::invalid_input(format!(
            "topic `{topic}` is reserved: topics starting with `polybus.` are the library's"
        )));
    }
    check_metadata(message)?;
    if let Some(ahead) = message.scheduled_ahead()
        && ahead > MAX_SCHEDULE
    {
        return Err(Error::invalid_input(format!(
            "message {} is scheduled {} s ahead, the limit is {} s (seven days)",
            message.id(),
            ahead.as_secs(),
            MAX_SCHEDULE.as_secs()
        )));
    }
    let len = message.payload().len();
    if len > max_payload {
        return Err(Error::new(
            Kind::PayloadTooLarge,
            format!(
                "payload of message {} is {len} bytes, the limit is {max_payload}",
                message.id()
            ),
        ));
    }
    Ok(())
}

fn check_metadata(message: &Message) -> Result<()> {
    let too_long = |what: &str, value: &str| {
        Error::invalid_input(format!(
            "{what} `{}…` of message {} is {} bytes, the limit is {MAX_SHORT_STRING}",
            &value[..value.floor_char_boundary(32)],
            message
                .id()
                .get(..message.id().floor_char_boundary(64))
                .unwrap_or(""),
            value.len()
        ))
    };
    if message.id_len() == 0 {
        return Err(Error::invalid_input("a message id cannot be empty"));
    }
    if message.id_len() > MAX_SHORT_STRING {
        return Err(too_long("id", message.id()));
    }
    if let Some(ct) = message.content_type()
        && ct.len() > MAX_SHORT_STRING
    {
        return Err(too_long("content type", ct));
    }
    for name in message.headers().keys() {
        if name.is_empty() {
            return Err(Error::invalid_input(format!(
                "message {} has a header with an empty name",
                message.id()
            )));
        }
        if name.len() > MAX_SHORT_STRING {
            return Err(too_long("header name", name));
        }
    }
    Ok(())
}

/// Why a backend's publish failed, before the message is handed back (C4): the
/// cause, and whether the broker may have taken the message anyway.
#[derive(Debug)]
pub struct Failure {
    error: Error,
    maybe_delivered: bool,
}

impl Failure {
    /// The broker certainly did not take the message.
    pub fn not_delivered(error: Error) -> Self {
        Failure {
            error,
            maybe_delivered: false,
        }
    }

    /// The broker may have taken the message (the connection dropped after it
    /// was written, a confirm timed out): retrying may duplicate it.
    pub fn maybe_delivered(error: Error) -> Self {
        Failure {
            error,
            maybe_delivered: true,
        }
    }

    /// The cause.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// Whether the broker may have taken the message.
    pub fn may_have_been_delivered(&self) -> bool {
        self.maybe_delivered
    }

    /// The cause alone, for a backend's own republishes (retries, dead letters),
    /// which have no caller to hand the message back to.
    pub fn into_error(self) -> Error {
        self.error
    }

    /// The caller's error, with `message` handed back.
    pub fn hand_back(self, message: Message) -> PublishError {
        if self.maybe_delivered {
            PublishError::maybe_delivered(self.error, message)
        } else {
            PublishError::not_delivered(self.error, message)
        }
    }
}
