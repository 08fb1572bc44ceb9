//! **C11 Reconnect**: "After a lost connection, publishers and subscribers
//! reconnect with backoff, re-declare their topology and resume. A publish during
//! an outage either returns `Ok` after a real confirm or fails with a typed
//! error."
//!
//! No case here yet: proving it means stopping the broker, which a [`Target`]
//! cannot do and which would break every other case running against the same
//! broker. The facade's `tests/amqp_restart.rs` and `tests/kafka_restart.rs` prove
//! it, each in its own test binary. A case added here goes in the list of
//! [`cases`](super) like any other.
//!
//! [`Target`]: crate::testkit::Target
