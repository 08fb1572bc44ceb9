//! Errors: one opaque [`Error`] with a [`Kind`], and [`PublishError`], which hands
//! the unpublished message back.

use std::error::Error as StdError;
use std::fmt;

use crate::Message;

/// What went wrong, broadly. New kinds may be added, so match with a wildcard arm.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A name, option or value the caller gave is not valid; nothing was sent.
    InvalidInput,
    /// The payload is larger than the backend accepts; nothing was sent.
    PayloadTooLarge,
    /// The broker could not be reached, or the connection was lost.
    Connection,
    /// The broker rejected the credentials or the virtual host.
    Authentication,
    /// An operation did not finish within its deadline.
    Timeout,
    /// The broker answered, and refused (a publisher nack, a missing topic, ...).
    Refused,
    /// A payload could not be decoded into the requested type.
    Decode,
    /// A payload could not be encoded.
    Encode,
    /// The bus, publisher, subscription or delivery is closed.
    Closed,
    /// The backend does not offer what was asked for.
    Unsupported,
    /// A circuit breaker is open and fails calls fast.
    CircuitOpen,
    /// Anything else; the source says more.
    Other,
}

impl Kind {
    /// The kind's name in snake case (`invalid_input`, `timeout`, …): stable,
    /// for logs, metrics and a tool's JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Kind::InvalidInput => "invalid_input",
            Kind::PayloadTooLarge => "payload_too_large",
            Kind::Connection => "connection",
            Kind::Authentication => "authentication",
            Kind::Timeout => "timeout",
            Kind::Refused => "refused",
            Kind::Decode => "decode",
            Kind::Encode => "encode",
            Kind::Closed => "closed",
            Kind::Unsupported => "unsupported",
            Kind::CircuitOpen => "circuit_open",
            Kind::Other => "other",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::InvalidInput => "invalid input",
            Kind::PayloadTooLarge => "payload too large",
            Kind::Connection => "connection error",
            Kind::Authentication => "authentication failed",
            Kind::Timeout => "timed out",
            Kind::Refused => "refused by broker",
            Kind::Decode => "decode error",
            Kind::Encode => "encode error",
            Kind::Closed => "closed",
            Kind::Unsupported => "unsupported",
            Kind::CircuitOpen => "circuit open",
            Kind::Other => "error",
        }
    }
}

/// The error of every polybus operation.
///
/// Opaque on purpose: ask it with [`kind`](Error::kind) and the predicates. Its
/// message is lowercase and names the offending value; it never contains
/// credentials.
#[derive(thiserror::Error)]
#[error("{}", describe(.kind, .message))]
pub struct Error {
    kind: Kind,
    message: String,
    #[source]
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

/// An error's text: its message, or its kind's when it has none.
fn describe<'a>(kind: &Kind, message: &'a str) -> &'a str {
    if message.is_empty() {
        kind.describe()
    } else {
        message
    }
}

impl Error {
    /// A new error of `kind` with a lowercase, specific message.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Shorthand for [`Kind::InvalidInput`].
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Error::new(Kind::InvalidInput, message)
    }

    /// Shorthand for [`Kind::Closed`].
    pub fn closed(message: impl Into<String>) -> Self {
        Error::new(Kind::Closed, message)
    }

    /// What went wrong, broadly.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether trying the same operation again later may succeed: lost connections,
    /// time-outs, an open circuit. Invalid input, oversize payloads, bad credentials
    /// and decode errors will fail the same way again.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            Kind::Connection | Kind::Timeout | Kind::CircuitOpen
        )
    }

    /// The caller's input was rejected before any I/O.
    pub fn is_invalid_input(&self) -> bool {
        matches!(self.kind, Kind::InvalidInput | Kind::PayloadTooLarge)
    }

    /// The payload was over the backend's limit.
    pub fn is_payload_too_large(&self) -> bool {
        self.kind == Kind::PayloadTooLarge
    }

    /// The broker refused the credentials or the virtual host.
    pub fn is_authentication(&self) -> bool {
        self.kind == Kind::Authentication
    }

    /// The broker answered and refused.
    pub fn is_refused(&self) -> bool {
        self.kind == Kind::Refused
    }

    /// The backend does not offer what was asked.
    pub fn is_unsupported(&self) -> bool {
        self.kind == Kind::Unsupported
    }

    /// The connection was lost or could not be made.
    pub fn is_connection(&self) -> bool {
        self.kind == Kind::Connection
    }

    /// The operation ran out of time.
    pub fn is_timeout(&self) -> bool {
        self.kind == Kind::Timeout
    }

    /// Something was already closed.
    pub fn is_closed(&self) -> bool {
        self.kind == Kind::Closed
    }

    /// A payload did not decode.
    pub fn is_decode(&self) -> bool {
        self.kind == Kind::Decode
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

/// A publish that failed. It hands the message back, and says whether the broker
/// may have taken it anyway (for example when the connection dropped after the
/// message was written but before its confirm arrived).
#[derive(thiserror::Error)]
#[error(
    "publish of message {} failed: {error}{}",
    .message.id(),
    if *.maybe_delivered { " (it may still have been delivered)" } else { "" }
)]
pub struct PublishError {
    #[source]
    error: Error,
    message: Box<Message>,
    maybe_delivered: bool,
}

impl PublishError {
    /// A failure where the broker certainly did not take the message.
    pub fn not_delivered(error: Error, message: Message) -> Self {
        PublishError {
            error,
            message: Box::new(message),
            maybe_delivered: false,
        }
    }

    /// A failure where the broker may still have taken the message: retrying may
    /// duplicate it.
    pub fn maybe_delivered(error: Error, message: Message) -> Self {
        PublishError {
            error,
            message: Box::new(message),
            maybe_delivered: true,
        }
    }

    /// The cause.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The cause's kind.
    pub fn kind(&self) -> Kind {
        self.error.kind
    }

    /// Whether the broker may have taken the message despite the error.
    pub fn may_have_been_delivered(&self) -> bool {
        self.maybe_delivered
    }

    /// The message that was not (or not certainly) published.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Take the message back, to retry it or store it elsewhere.
    pub fn into_message(self) -> Message {
        *self.message
    }

    /// Split into the cause and the message.
    pub fn into_parts(self) -> (Error, Message) {
        (self.error, *self.message)
    }
}

impl fmt::Debug for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishError")
            .field("error", &self.error)
            .field("message_id", &self.message.id())
            .field("maybe_delivered", &self.maybe_delivered)
            .finish()
    }
}

impl From<PublishError> for Error {
    fn from(e: PublishError) -> Self {
        e.error
    }
}

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_sources_read_as_before() {
        assert_eq!(Error::new(Kind::Timeout, "").to_string(), "timed out");
        let io = std::io::Error::other("refused");
        let e = Error::new(Kind::Connection, "cannot connect to `h:1`").with_source(io);
        assert_eq!(e.to_string(), "cannot connect to `h:1`");
        assert_eq!(e.source().expect("a source").to_string(), "refused");
        let m = Message::new("x").with_id("m1");
        let p = PublishError::maybe_delivered(Error::new(Kind::Timeout, "no confirm"), m);
        assert_eq!(
            p.to_string(),
            "publish of message m1 failed: no confirm (it may still have been delivered)"
        );
        assert_eq!(p.source().expect("the cause").to_string(), "no confirm");
        let m = Message::new("x").with_id("m2");
        let p = PublishError::not_delivered(Error::closed("cannot publish"), m);
        assert_eq!(
            p.to_string(),
            "publish of message m2 failed: cannot publish"
        );
    }
}
