//! The core of [polybus](https://docs.rs/polybus): the types, traits and delivery
//! contract that every backend shares.
//!
//! Services normally depend on the `polybus` facade crate; backend authors depend on
//! this one, implement [`Publisher`], [`Subscriber`] and [`Backend`], and run the
//! conformance suite in [`testkit`] (feature `testkit`) to prove they keep the
//! contract.
//!
//! | module | what it holds |
//! |---|---|
//! | [`topic`] | [`Topic`] and [`Pattern`]: validation and AMQP-style matching (C1) |
//! | [`message`] | [`Message`], headers, [`Codec`] and [`Json`] (C13) |
//! | [`subscription`] | [`Subscription`] options: patterns, group, prefetch, retry, dead letters |
//! | [`delivery`] | [`Delivery`] and its settlement; [`DeliveryStream`] (C6, C7, C10) |
//! | [`retry`] | [`RetryPolicy`]: backoff and maximum attempts (C8) |
//! | [`backend`] | for backend authors: broker URL parsing and the one redaction of secrets |
//! | [`bus`] | [`Publisher`], [`Subscriber`], [`Backend`], [`Bus`], [`Capabilities`] |
//! | [`error`] | [`Error`], [`Kind`], [`PublishError`] |
//! | [`consumer`] | the handler runtime: typed handlers, concurrency, outcomes, graceful shutdown |
//! | [`rpc`] | request-reply: [`rpc::Requester`] and [`rpc::respond`] |
//! | [`middleware`] | publisher middleware: timeout, retry, circuit breaker |
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backend;
pub mod bus;
pub mod consumer;
pub mod delivery;
pub mod error;
pub mod message;
pub mod middleware;
pub mod retry;
pub mod rpc;
pub mod subscription;
pub mod topic;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use bus::{
    Backend, BackendFuture, Bus, Capabilities, Capability, InFlight, InFlightGuard, PublishFuture,
    Publisher, Receipt, Subscriber, prepare_publish,
};
pub use delivery::{Acker, Delivery, DeliverySource, DeliveryStream, SettleFuture, Settlement};
pub use error::{Error, Kind, PublishError, Result};
#[cfg(feature = "msgpack")]
pub use message::MsgPack;
pub use message::{Codec, Headers, Json, Message, header};
pub use retry::RetryPolicy;
pub use subscription::{StartFrom, Subscription, ValidSubscription};
pub use topic::{Pattern, Topic, TopicCache};

#[doc(hidden)]
pub use async_trait::async_trait;
