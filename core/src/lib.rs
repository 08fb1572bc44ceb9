//! The core of [polybus](https://docs.rs/polybus): the types, traits and delivery
//! contract that every backend shares.
//!
//! Services normally depend on the `polybus` facade crate, whose API is this
//! crate's root. Backend authors implement [`backend::Backend`] (the
//! service-provider interface, with a guide) and run the conformance suite in
//! `testkit` (feature `testkit`) to prove they keep the contract.
//!
//! | module | what it holds |
//! |---|---|
//! | [`topic`] | [`Topic`] and [`Pattern`]: validation and AMQP-style matching (C1) |
//! | [`message`] | [`Message`], headers, [`Codec`], [`JsonCodec`] (C13) |
//! | [`names`] | every topic, group and header name the library reserves |
//! | [`subscription`] | [`Subscription`] options: patterns, group, prefetch, retry, dead letters |
//! | [`delivery`] | [`Delivery`] and its settlement (C7) |
//! | [`stream`] | [`DeliveryStream`]: a subscription's deliveries, batches, close (C6, C10) |
//! | [`retry`] | [`RetryPolicy`]: backoff and maximum attempts (C8) |
//! | [`publisher`] | the [`Publisher`] and [`Subscriber`] traits, [`Receipt`] |
//! | [`capabilities`] | [`Capabilities`] and [`Capability`]: what a backend offers beyond the contract |
//! | [`bus`] | [`Bus`]: where the contract's checks run, once, for every backend |
//! | [`error`] | [`Error`], [`Kind`], [`PublishError`] |
//! | [`consumer`] | the handler runtime: typed handlers, concurrency, outcomes, graceful shutdown |
//! | [`rpc`] | request-reply: [`rpc::Requester`] and [`rpc::respond`] |
//! | [`middleware`] | publisher middleware: timeout, retry, circuit breaker |
//! | [`backend`] | for backend authors only: the SPI and a guide to writing a backend |
//! | `telemetry` | OpenTelemetry spans, trace context and metrics (feature `otel`) |
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backend;
pub mod bus;
pub mod capabilities;
pub mod consumer;
pub mod dead_letters;
pub mod delivery;
pub mod error;
pub mod message;
pub mod middleware;
pub mod names;
pub mod publisher;
pub mod retry;
pub mod rpc;
pub mod stream;
pub mod subscription;
#[cfg(feature = "otel")]
pub mod telemetry;
pub mod topic;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use bus::Bus;
pub use capabilities::{Capabilities, Capability};
pub use consumer::Json;
pub use dead_letters::{DeadLetterRecord, DeadLetterReport, DeadLetters};
pub use delivery::Delivery;
pub use error::{Error, Kind, PublishError, Result};
#[cfg(feature = "msgpack")]
pub use message::MsgPack;
pub use message::{Codec, Headers, JsonCodec, Message};
pub use names::header;
pub use publisher::{PublishFuture, Publisher, Receipt, Subscriber};
pub use retry::RetryPolicy;
pub use stream::DeliveryStream;
pub use subscription::{Overflow, StartFrom, Subscription};
pub use topic::{Pattern, Topic};

#[doc(hidden)]
pub use async_trait::async_trait;
