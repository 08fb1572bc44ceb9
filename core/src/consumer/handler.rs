//! What handlers receive ([`FromDelivery`]) and how they fail ([`HandlerError`]).

use std::fmt;

use serde::de::DeserializeOwned;

use crate::{Codec, Delivery, Kind, Message, Result};

/// What a handler receives, made from a delivery. A failure to make it (an
/// undecodable payload) dead-letters the delivery with the error as reason.
pub trait FromDelivery: Sized + Send + 'static {
    /// Build the handler's argument.
    fn from_delivery(delivery: &Delivery) -> Result<Self>;
}

/// A payload decoded as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned + Send + 'static> FromDelivery for Json<T> {
    fn from_delivery(delivery: &Delivery) -> Result<Self> {
        delivery.json().map(Json)
    }
}

/// A payload decoded with any [`Codec`].
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded<C, T>(pub T, std::marker::PhantomData<C>);

impl<C: Codec + Send + 'static, T: DeserializeOwned + Send + 'static> FromDelivery
    for Decoded<C, T>
{
    fn from_delivery(delivery: &Delivery) -> Result<Self> {
        delivery
            .decode::<C, T>()
            .map(|v| Decoded(v, std::marker::PhantomData))
    }
}

/// The whole message, undecoded.
impl FromDelivery for Message {
    fn from_delivery(delivery: &Delivery) -> Result<Self> {
        Ok(delivery.message().clone())
    }
}

/// Why a handler failed, and so how its delivery is settled.
pub struct HandlerError {
    permanent: bool,
    reason: String,
}

impl HandlerError {
    /// Worth another try: nack, redelivered after the retry policy's delay.
    pub fn retry(reason: impl fmt::Display) -> Self {
        HandlerError {
            permanent: false,
            reason: reason.to_string(),
        }
    }

    /// Hopeless: dead-letter with `reason`.
    pub fn permanent(reason: impl fmt::Display) -> Self {
        HandlerError {
            permanent: true,
            reason: reason.to_string(),
        }
    }

    pub(super) fn into_reason(self) -> String {
        self.reason
    }

    /// Whether the delivery is dead-lettered rather than retried.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }
}

/// `?` on an error means "try again" ([`HandlerError::retry`]), with one
/// exception: polybus's own errors ([`Error`](crate::Error),
/// [`PublishError`](crate::PublishError)) that can never succeed on a retry of
/// the same message become [`HandlerError::permanent`], so the message is
/// dead-lettered at once instead of burning its attempts: invalid input, an
/// oversize payload, a payload that does not decode or encode. Every other
/// polybus error (a lost connection, a time-out, a refusal, a closed bus, an open
/// circuit) and every foreign error retries, since the handler cannot know it
/// will fail again.
impl<E: std::error::Error + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        if never_succeeds_on_retry(&e) {
            HandlerError::permanent(e)
        } else {
            HandlerError::retry(e)
        }
    }
}

fn never_succeeds_on_retry(e: &(dyn std::error::Error + 'static)) -> bool {
    let kind = if let Some(e) = e.downcast_ref::<crate::Error>() {
        e.kind()
    } else if let Some(e) = e.downcast_ref::<crate::PublishError>() {
        e.kind()
    } else {
        return false;
    };
    matches!(
        kind,
        Kind::InvalidInput | Kind::PayloadTooLarge | Kind::Decode | Kind::Encode
    )
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("permanent", &self.permanent)
            .field("reason", &self.reason)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Error, PublishError};

    fn question_mark(e: impl std::error::Error + 'static) -> HandlerError {
        let r: std::result::Result<(), _> = Err(e);
        let converted = || -> std::result::Result<(), HandlerError> { Ok(r?) };
        converted().unwrap_err()
    }

    #[test]
    fn question_mark_keeps_what_polybus_errors_say_about_retrying() {
        assert!(question_mark(Error::invalid_input("bad topic")).is_permanent());
        assert!(question_mark(Error::new(Kind::Decode, "not json")).is_permanent());
        let too_big = Error::new(Kind::PayloadTooLarge, "too big");
        assert!(
            question_mark(PublishError::not_delivered(too_big, Message::new("x"))).is_permanent()
        );
        assert!(!question_mark(Error::new(Kind::Connection, "lost")).is_permanent());
        assert!(!question_mark(Error::closed("shutting down")).is_permanent());
        let lost = Error::new(Kind::Timeout, "no confirm");
        assert!(
            !question_mark(PublishError::maybe_delivered(lost, Message::new("x"))).is_permanent()
        );
    }

    #[test]
    fn question_mark_retries_foreign_errors() {
        let io = std::io::Error::other("downstream is down");
        let e = question_mark(io);
        assert!(!e.is_permanent());
        assert_eq!(e.to_string(), "downstream is down");
    }
}
