//! [`AmqpOptions`]: broker addresses, the exchange, limits and time-outs, parsed
//! from a URL or built with named setters. Credentials never leave this module
//! unredacted except towards lapin.

use std::fmt;
use std::time::Duration;

use polybus_core::backend::url::BrokerUrl;
/// The one redaction, core's: re-exported for the connection's messages.
pub(crate) use polybus_core::backend::url::redact;
use polybus_core::{Error, Result};

/// RabbitMQ 3.10's default `max_message_size`: 128 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 128 * 1024 * 1024;

/// Options of a RabbitMQ connection.
#[derive(Clone)]
pub struct AmqpOptions {
    pub(crate) uris: Vec<String>,
    pub(crate) exchange: String,
    pub(crate) max_payload: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) publish_timeout: Duration,
    pub(crate) tls_ca_pem: Option<String>,
    pub(crate) ack_batch: usize,
    pub(crate) publish_channels: usize,
    pub(crate) ack_flush: Duration,
}

/// How many acks a subscription coalesces into one frame at most, by default.
pub const DEFAULT_ACK_BATCH: usize = 100;
/// How many confirm channels a bus publishes on, by default.
pub const DEFAULT_PUBLISH_CHANNELS: usize = 2;
/// How long an ack waits at most to be coalesced, by default.
pub const DEFAULT_ACK_FLUSH: Duration = Duration::from_millis(10);

impl AmqpOptions {
    /// Parse `amqp://user:pass@host:5672/vhost` or `amqps://…`. Several brokers may
    /// be named in one URL, sharing credentials, vhost and options:
    /// `amqp://user:pass@h1:5672,h2:5672/vhost`; on a connection failure the
    /// client moves to the next.
    ///
    /// The URL is read by [`polybus_core::backend::url`]: the user name, password,
    /// vhost and every query value are percent-decoded (`%2f` is the vhost `/`;
    /// `/`, `?`, `#` and `@` in a password must be written `%2F`, `%3F`, `%23`,
    /// `%40`). Each broker gets a single-host URL of its own, which lapin reads.
    /// polybus's own parameters:
    ///
    /// | parameter | default | meaning |
    /// |---|---|---|
    /// | `exchange` | `polybus` | the topic exchange of this bus |
    /// | `max_payload` | 134217728 | larger payloads are refused before sending |
    /// | `connect_timeout_ms` | 10000 | per broker address |
    /// | `publish_timeout_ms` | 30000 | how long a publish waits for a connection during an outage |
    /// | `tls_ca_file` | none | a PEM file of CA certificates trusted for `amqps://`, beside the system roots |
    /// | `ack_batch` | 100 | acks coalesced into one `basic.ack` at most (capped at half the prefetch); `1` sends each ack when it is made |
    /// | `ack_flush_ms` | 10 | the longest an ack waits to be coalesced |
    /// | `publish_channels` | 2 | confirm channels publishes are spread over (1 to 64); messages with the same key always take the same one |
    ///
    /// Coalesced acks, and what an `ack` returning `Ok` means with them, are
    /// described on [`ack_batch`](Self::ack_batch).
    ///
    /// All other parameters go to lapin (`heartbeat`, `frame_max`, `channel_max`,
    /// `connection_timeout`, `auth_mechanism`).
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = BrokerUrl::parse(url, "amqp", &["amqp", "amqps"])?;
        if parsed.hosts.is_empty() {
            return Err(parsed.invalid("an empty broker address"));
        }
        let mut options = AmqpOptions {
            uris: Vec::new(),
            exchange: "polybus".into(),
            max_payload: DEFAULT_MAX_PAYLOAD,
            connect_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(30),
            tls_ca_pem: None,
            ack_batch: DEFAULT_ACK_BATCH,
            publish_channels: DEFAULT_PUBLISH_CHANNELS,
            ack_flush: DEFAULT_ACK_FLUSH,
        };
        let mut passthrough = Vec::new();
        for (k, v) in &parsed.query {
            if !options.apply(&parsed, k, v)? {
                passthrough.push((k.clone(), v.clone()));
            }
        }
        options.uris = (0..parsed.hosts.len())
            .map(|i| parsed.single_host_url(i, &passthrough))
            .collect();
        Ok(options)
    }

    /// Apply URL parameter `k`: false if it is not one of polybus's own.
    fn apply(&mut self, url: &BrokerUrl, k: &str, v: &str) -> Result<bool> {
        let millis = |v: &str| {
            url.value(k, v, "is not a number of milliseconds")
                .map(Duration::from_millis)
        };
        match k {
            "exchange" => {
                if v.is_empty() || v.len() > 255 {
                    return Err(url.bad_value(k, v, "must be 1 to 255 bytes"));
                }
                self.exchange = v.into();
            }
            "max_payload" => self.max_payload = url.value(k, v, "is not a number of bytes")?,
            "connect_timeout_ms" => self.connect_timeout = millis(v)?,
            "publish_timeout_ms" => self.publish_timeout = millis(v)?,
            "ack_batch" => {
                self.ack_batch = url.value(k, v, "is not a number of acks")?;
                if !(1..=64).contains(&self.publish_channels) {
                    return Err(Error::invalid_input(format!(
                        "invalid publish_channels {}: it must be 1 to 64",
                        self.publish_channels
                    )));
                }
                if self.ack_batch == 0 {
                    return Err(url.bad_value(k, v, "must be at least 1"));
                }
            }
            "ack_flush_ms" => self.ack_flush = millis(v)?,
            "publish_channels" => {
                self.publish_channels = url.value(k, v, "is not a number of channels")?;
                if !(1..=64).contains(&self.publish_channels) {
                    return Err(url.bad_value(k, v, "must be 1 to 64"));
                }
            }
            "tls_ca_file" => {
                let pem = std::fs::read_to_string(v).map_err(|e| {
                    Error::invalid_input(format!("cannot read tls_ca_file `{v}`: {e}"))
                        .with_source(e)
                })?;
                self.tls_ca_pem = Some(pem);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Use `exchange` as this bus's topic exchange.
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// Refuse payloads larger than `bytes` before sending.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// How long to wait for each broker address to accept a connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a publish waits for a connection during an outage before it
    /// fails with a connection error.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Trust the CA certificates in `pem` for `amqps://`, beside the system roots.
    pub fn tls_ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.tls_ca_pem = Some(pem.into());
        self
    }

    /// Coalesce up to `acks` acks of a subscription into one `basic.ack` frame
    /// with `multiple` set; 1 sends every ack on its own when it is made.
    ///
    /// RabbitMQ settles with one frame every outstanding delivery up to the tag
    /// it names, so a run of acks with nothing unsettled before it costs one
    /// frame instead of one per message (RabbitMQ's PerfTest does the same with
    /// `--multi-ack-every`). An ack behind a delivery still being handled is
    /// sent alone, never covering that delivery. The batch is capped at half
    /// the subscription's prefetch, so the broker never waits for acks held
    /// back here.
    ///
    /// With coalescing, `ack` returning `Ok` means the ack is recorded and
    /// reaches the broker at the latest when `acks` acks wait, when the
    /// subscription has nothing more to hand out while half its prefetch is
    /// unsettled at the broker, after the
    /// [`ack_flush`](Self::ack_flush) delay, before a requeue on the same
    /// channel, or when the subscription closes or is dropped. If the
    /// connection is lost before that, the broker delivers the message again
    /// (at-least-once, as for an ack frame lost on the wire).
    pub fn ack_batch(mut self, acks: usize) -> Self {
        self.ack_batch = acks;
        self
    }

    /// Spread publishes over `channels` confirm channels (2 by default, 1 to
    /// 64). RabbitMQ serves each channel in one process of its own, so
    /// concurrent publishers on one channel wait for each other on the broker.
    /// Messages with the same key always take the same channel, so they keep
    /// their order (C5) even when published concurrently; a batch takes one
    /// channel; messages without a key take the channels in turn.
    pub fn publish_channels(mut self, channels: usize) -> Self {
        self.publish_channels = channels;
        self
    }

    /// The longest an ack waits to be coalesced with others (10 ms by default).
    pub fn ack_flush(mut self, delay: Duration) -> Self {
        self.ack_flush = delay;
        self
    }

    /// Check what the setters cannot: called by `connect`.
    pub(crate) fn validate(&self) -> Result<()> {
        if !(1..=64).contains(&self.publish_channels) {
            return Err(Error::invalid_input(format!(
                "invalid publish_channels {}: it must be 1 to 64",
                self.publish_channels
            )));
        }
        if self.ack_batch == 0 {
            return Err(Error::invalid_input(
                "invalid ack_batch 0: it must be at least 1 (1 sends every ack at once)",
            ));
        }
        if self.exchange.is_empty() || self.exchange.len() > 255 {
            return Err(Error::invalid_input(format!(
                "invalid exchange `{}`: it must be 1 to 255 bytes",
                self.exchange
            )));
        }
        if self.uris.is_empty() {
            return Err(Error::invalid_input("no broker address given"));
        }
        Ok(())
    }

    /// The broker addresses, with passwords masked.
    pub fn redacted_uris(&self) -> Vec<String> {
        self.uris.iter().map(|u| redact(u)).collect()
    }
}

impl fmt::Debug for AmqpOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpOptions")
            .field("uris", &self.redacted_uris())
            .field("exchange", &self.exchange)
            .field("max_payload", &self.max_payload)
            .field("connect_timeout", &self.connect_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field("tls_ca_pem", &self.tls_ca_pem.as_ref().map(|_| "…"))
            .field("ack_batch", &self.ack_batch)
            .field("ack_flush", &self.ack_flush)
            .field("publish_channels", &self.publish_channels)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_hosts_share_credentials_vhost_and_lapin_params() {
        let o = AmqpOptions::from_url(
            "amqp://u:secret@h1:5672,h2:5673/vh?heartbeat=10&exchange=events&max_payload=99",
        )
        .unwrap();
        assert_eq!(
            o.uris,
            [
                "amqp://u:secret@h1:5672/vh?heartbeat=10",
                "amqp://u:secret@h2:5673/vh?heartbeat=10"
            ]
        );
        assert_eq!(o.exchange, "events");
        assert_eq!(o.max_payload, 99);
        let debug = format!("{o:?}");
        assert!(!debug.contains("secret"), "{debug}");
        assert!(debug.contains("u:***@h1:5672/vh"), "{debug}");
    }

    #[test]
    fn bad_urls_are_typed_and_redacted() {
        let e = AmqpOptions::from_url("amqp://u:secret@h/?max_payload=lots").unwrap_err();
        assert!(e.is_invalid_input());
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(e.to_string().contains("`lots`"), "{e}");
        assert!(
            AmqpOptions::from_url("http://h")
                .unwrap_err()
                .is_invalid_input()
        );
        assert!(
            AmqpOptions::from_url("amqp://u:p@h1,,h2/")
                .unwrap_err()
                .is_invalid_input()
        );
        let e = AmqpOptions::from_url("amqp://u:pa/ss@h/vh").unwrap_err();
        assert!(!e.to_string().contains("pa/ss"), "{e}");
        let e = AmqpOptions::from_url("amqp://u:p?w@h/vh").unwrap_err();
        assert!(!e.to_string().contains("p?w"), "{e}");
        let long = AmqpOptions::from_url("amqp://h/")
            .unwrap()
            .exchange("x".repeat(256));
        assert!(long.validate().unwrap_err().is_invalid_input());
        let e = AmqpOptions::from_url("amqp://h/?ack_batch=0").unwrap_err();
        assert!(
            e.is_invalid_input() && e.to_string().contains("ack_batch"),
            "{e}"
        );
        let o = AmqpOptions::from_url("amqp://h/?ack_batch=7&ack_flush_ms=250").unwrap();
        assert_eq!((o.ack_batch, o.ack_flush), (7, Duration::from_millis(250)));
        assert!(o.ack_batch(0).validate().unwrap_err().is_invalid_input());
        for bad in ["0", "65", "two"] {
            let e =
                AmqpOptions::from_url(&format!("amqp://h/?publish_channels={bad}")).unwrap_err();
            assert!(
                e.is_invalid_input() && e.to_string().contains("publish_channels"),
                "{e}"
            );
        }
        let o = AmqpOptions::from_url("amqp://h/?publish_channels=4").unwrap();
        assert_eq!(o.publish_channels, 4);
        assert!(
            o.publish_channels(0)
                .validate()
                .unwrap_err()
                .is_invalid_input()
        );
        let e = AmqpOptions::from_url("amqp://h/?tls_ca_file=/nonexistent.pem").unwrap_err();
        assert!(e.to_string().contains("/nonexistent.pem"), "{e}");
    }

    #[test]
    fn percent_encoded_parts_reach_lapin_and_stay_hidden() {
        let o = AmqpOptions::from_url(
            "amqp://u:p%40ss%2Fw@h:5672/%2f?exchange=ev%20x&auth_token=zz9&connect_timeout_ms=%35",
        )
        .unwrap();
        assert_eq!(o.exchange, "ev x");
        assert_eq!(o.connect_timeout, Duration::from_millis(5));
        assert_eq!(o.uris, ["amqp://u:p%40ss%2Fw@h:5672/%2f?auth_token=zz9"]);
        let debug = format!("{o:?}");
        assert!(
            !debug.contains("p%40ss") && !debug.contains("zz9"),
            "{debug}"
        );
        let e = AmqpOptions::from_url("amqp://u:p%40ss@h:port/").unwrap_err();
        assert!(
            e.is_invalid_input() && !e.to_string().contains("p%40ss"),
            "{e}"
        );
    }

    #[test]
    fn redact_masks_only_the_password() {
        assert_eq!(
            redact("amqp://guest:pw@localhost:5672/%2f"),
            "amqp://guest:***@localhost:5672/%2f"
        );
        assert_eq!(redact("amqp://localhost"), "amqp://localhost");
        assert_eq!(redact("amqps://a:b@h/v?x=1@2"), "amqps://a:***@h/v?x=1@2");
    }
}
