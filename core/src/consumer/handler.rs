//! What handlers receive ([`FromDelivery`]) and how they fail ([`HandlerError`]).

use std::fmt;

use serde::de::DeserializeOwned;

use crate::{Codec, Delivery, Headers, Kind, Message, Result, Topic};

/// What a handler receives, made from a delivery. A failure to make it (an
/// undecodable payload) dead-letters the delivery with the error as reason.
pub trait FromDelivery: Sized + Send + 'static {
    /// Build the handler's argument.
    fn from_delivery(delivery: &Delivery) -> Result<Self>;
}

/// A handler's payload decoded as JSON (through [`JsonCodec`](crate::JsonCodec)).
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

/// Where a delivery came from and which try it is, for a handler that needs
/// more than the payload; combine it with one in a tuple:
/// `|(Json(order), meta): (Json<Order>, Meta)| …`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Meta {
    /// The topic it was published to.
    pub topic: Topic,
    /// The message id.
    pub id: String,
    /// The message key.
    pub key: Option<String>,
    /// Which delivery of the message to this group this is, from 1.
    pub attempt: u32,
    /// Whether it was delivered to this group before.
    pub redelivered: bool,
    /// The message's headers.
    pub headers: Headers,
}

impl FromDelivery for Meta {
    fn from_delivery(delivery: &Delivery) -> Result<Self> {
        let message = delivery.message();
        Ok(Meta {
            topic: delivery.topic().clone(),
            id: message.id().to_owned(),
            key: message.key().map(str::to_owned),
            attempt: delivery.attempt(),
            redelivered: delivery.redelivered(),
            headers: message.headers().clone(),
        })
    }
}

// Extractors combine in tuples; the first that fails decides the dead letter.
macro_rules! tuple_from_delivery {
    ($($name:ident),+) => {
        impl<$($name: FromDelivery),+> FromDelivery for ($($name,)+) {
            fn from_delivery(delivery: &Delivery) -> Result<Self> {
                Ok(($($name::from_delivery(delivery)?,)+))
            }
        }
    };
}
tuple_from_delivery!(A, B);
tuple_from_delivery!(A, B, C);
tuple_from_delivery!(A, B, C, D);

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

/// `?` on an error means "try again" ([`HandlerError::retry`]). Any error that
/// converts into `Box<dyn Error + Send + Sync>` works: every `Send + Sync`
/// error type, `anyhow::Error`, boxed errors, even a `String`. The reason is the
/// whole chain of causes (`charging the card: gateway 503`). To say "never
/// retry this", map it: `.map_err(HandlerError::permanent)?`. One exception,
/// found anywhere in the chain of causes (so through `anyhow`'s `.context(..)`,
/// though not through a plain `anyhow::Error::from`, which hides its inner
/// type): polybus's own errors ([`Error`](crate::Error),
/// [`PublishError`](crate::PublishError)) that can never succeed on a retry of
/// the same message become [`HandlerError::permanent`], so the message is
/// dead-lettered at once instead of burning its attempts: invalid input, an
/// oversize payload, a payload that does not decode or encode. Every other
/// polybus error (a lost connection, a time-out, a refusal, a closed bus, an open
/// circuit) and every foreign error retries, since the handler cannot know it
/// will fail again.
impl<E: Into<BoxError>> From<E> for HandlerError {
    fn from(e: E) -> Self {
        let e: BoxError = e.into();
        let reason = chain(&*e);
        if causes(&*e).any(never_succeeds_on_retry) {
            HandlerError::permanent(reason)
        } else {
            HandlerError::retry(reason)
        }
    }
}

/// `e` and its sources, outermost first.
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// The whole chain as one reason, `outer: inner: …` (what `anyhow`'s `{:#}`
/// shows), leaving out a cause whose text the outer one already contains.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut reason = String::new();
    for cause in causes(e) {
        let text = cause.to_string();
        if !reason.contains(&text) {
            if !reason.is_empty() {
                reason.push_str(": ");
            }
            reason.push_str(&text);
        }
    }
    reason
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

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

    fn question_mark(e: impl std::error::Error + Send + Sync + 'static) -> HandlerError {
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
    fn question_mark_takes_anyhow_boxed_and_string_errors() {
        let anyhow = || -> std::result::Result<(), HandlerError> {
            Err(anyhow::anyhow!("downstream said no"))?;
            Ok(())
        };
        let e = anyhow().unwrap_err();
        assert!(!e.is_permanent());
        assert_eq!(e.to_string(), "downstream said no");
        let boxed = || -> std::result::Result<(), HandlerError> {
            let b: Box<dyn std::error::Error + Send + Sync> = "boxed".into();
            Err(b)?;
            Ok(())
        };
        assert_eq!(boxed().unwrap_err().to_string(), "boxed");
        let permanent = || -> std::result::Result<(), HandlerError> {
            Err(anyhow::anyhow!("no such customer")).map_err(HandlerError::permanent)?;
            Ok(())
        };
        assert!(permanent().unwrap_err().is_permanent());
        let polybus_in_a_box = || -> std::result::Result<(), HandlerError> {
            let b: Box<dyn std::error::Error + Send + Sync> =
                Box::new(Error::invalid_input("bad topic"));
            Err(b)?;
            Ok(())
        };
        assert!(polybus_in_a_box().unwrap_err().is_permanent());
    }

    struct NoAcker(crate::RetryPolicy);

    impl crate::backend::Acker for NoAcker {
        fn retry_policy(&self) -> &crate::RetryPolicy {
            &self.0
        }
        fn settle(self: Box<Self>, _: crate::backend::Settlement) -> crate::backend::SettleFuture {
            crate::backend::SettleFuture::ready(Ok(()))
        }
        fn settle_on_drop(self: Box<Self>, _: crate::backend::Settlement) {}
    }

    #[test]
    fn extractors_combine_with_the_delivery_s_metadata() {
        use crate::backend::DeliveryExt;
        let message = Message::json(&serde_json::json!({"id": "o1"}))
            .unwrap()
            .with_key("c1")
            .with_header("tenant", "acme");
        let delivery = Delivery::new(
            std::sync::Arc::new(message),
            Topic::new("order.placed").unwrap(),
            3,
            true,
            Box::new(NoAcker(crate::RetryPolicy::default())),
        );
        let (Json(order), meta) =
            <(Json<serde_json::Value>, Meta)>::from_delivery(&delivery).unwrap();
        assert_eq!(order["id"], "o1");
        assert_eq!(meta.topic.as_str(), "order.placed");
        assert_eq!((meta.attempt, meta.redelivered), (3, true));
        assert_eq!(meta.key.as_deref(), Some("c1"));
        assert_eq!(meta.headers.get("tenant").map(String::as_str), Some("acme"));
        let e = <(Meta, Json<u32>)>::from_delivery(&delivery).unwrap_err();
        assert!(e.is_decode(), "{e}");
    }

    #[test]
    fn the_reason_is_the_whole_chain_and_context_does_not_hide_a_permanent_error() {
        use anyhow::Context;
        let io = || -> std::result::Result<(), HandlerError> {
            Err(std::io::Error::other("gateway 503")).context("charging the card")?;
            Ok(())
        };
        let e = io().unwrap_err();
        assert!(!e.is_permanent());
        assert_eq!(e.to_string(), "charging the card: gateway 503");
        let decode = || -> std::result::Result<(), HandlerError> {
            Err(Error::new(Kind::Decode, "not an order")).context("reading the order")?;
            Ok(())
        };
        let e = decode().unwrap_err();
        assert!(
            e.is_permanent(),
            "a decode error under context is still permanent"
        );
        assert_eq!(e.to_string(), "reading the order: not an order");
        // An error whose text already includes its source is not repeated.
        let p = PublishError::not_delivered(Error::closed("bus closed"), Message::new("x"));
        let text = p.to_string();
        assert_eq!(question_mark(p).to_string(), text);
    }

    #[test]
    fn question_mark_retries_foreign_errors() {
        let io = std::io::Error::other("downstream is down");
        let e = question_mark(io);
        assert!(!e.is_permanent());
        assert_eq!(e.to_string(), "downstream is down");
    }
}
