//! [`AmqpOptions`]: broker addresses, the exchange, limits and time-outs, parsed
//! from a URL or built with named setters. Credentials never leave this module
//! unredacted except towards lapin.

use std::fmt;
use std::time::Duration;

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
}

/// Query parameters polybus reads itself; all others go to lapin (heartbeat,
/// frame_max, channel_max, auth_mechanism, ...).
const OWN_PARAMS: &[&str] = &[
    "exchange",
    "max_payload",
    "connect_timeout_ms",
    "publish_timeout_ms",
    "tls_ca_file",
];

impl AmqpOptions {
    /// Parse `amqp://user:pass@host:5672/vhost` or `amqps://…`. Several brokers may
    /// be named in one URL, sharing credentials, vhost and options:
    /// `amqp://user:pass@h1:5672,h2:5672/vhost`; on a connection failure the
    /// client moves to the next. polybus's own parameters:
    ///
    /// | parameter | default | meaning |
    /// |---|---|---|
    /// | `exchange` | `polybus` | the topic exchange of this bus |
    /// | `max_payload` | 134217728 | larger payloads are refused before sending |
    /// | `connect_timeout_ms` | 10000 | per broker address |
    /// | `publish_timeout_ms` | 30000 | how long a publish waits for a connection during an outage |
    /// | `tls_ca_file` | none | a PEM file of CA certificates trusted for `amqps://`, beside the system roots |
    pub fn from_url(url: &str) -> Result<Self> {
        let (scheme, rest) = match url.split_once("://") {
            Some((s @ ("amqp" | "amqps"), rest)) => (s, rest),
            _ => {
                return Err(Error::invalid_input(format!(
                    "invalid amqp url `{}`: it must start with amqp:// or amqps://",
                    redact(url)
                )));
            }
        };
        // A password with a raw `/` or `?` would be cut in two by the parse below
        // (and then shown unmasked): such characters must be percent-encoded.
        if let Some(at) = rest.rfind('@')
            && rest[..at].contains(['/', '?'])
        {
            return Err(Error::invalid_input(format!(
                "invalid amqp url `{scheme}://***@{}`: percent-encode `/` and `?` in the \
                 user name and password",
                &rest[at + 1..]
            )));
        }
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = match before_query.find('/') {
            Some(i) => before_query.split_at(i),
            None => (before_query, ""),
        };
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let mut options = AmqpOptions {
            uris: Vec::new(),
            exchange: "polybus".into(),
            max_payload: DEFAULT_MAX_PAYLOAD,
            connect_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(30),
            tls_ca_pem: None,
        };
        let mut passthrough = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !OWN_PARAMS.contains(&k) {
                passthrough.push(pair);
                continue;
            }
            let bad = |what: &str| {
                Error::invalid_input(format!(
                    "invalid amqp url `{}`: {k} `{v}` {what}",
                    redact(url)
                ))
            };
            match k {
                "exchange" => {
                    if v.is_empty() || v.len() > 255 {
                        return Err(bad("must be 1 to 255 bytes"));
                    }
                    options.exchange = v.into();
                }
                "max_payload" => {
                    options.max_payload = v.parse().map_err(|_| bad("is not a number of bytes"))?
                }
                "connect_timeout_ms" => {
                    options.connect_timeout = Duration::from_millis(
                        v.parse()
                            .map_err(|_| bad("is not a number of milliseconds"))?,
                    )
                }
                "publish_timeout_ms" => {
                    options.publish_timeout = Duration::from_millis(
                        v.parse()
                            .map_err(|_| bad("is not a number of milliseconds"))?,
                    )
                }
                "tls_ca_file" => {
                    let pem = std::fs::read_to_string(v).map_err(|e| {
                        Error::invalid_input(format!("cannot read tls_ca_file `{v}`: {e}"))
                            .with_source(e)
                    })?;
                    options.tls_ca_pem = Some(pem);
                }
                _ => unreachable!("listed in OWN_PARAMS"),
            }
        }
        let query = if passthrough.is_empty() {
            String::new()
        } else {
            format!("?{}", passthrough.join("&"))
        };
        for host in hosts.split(',') {
            if host.is_empty() {
                return Err(Error::invalid_input(format!(
                    "invalid amqp url `{}`: an empty broker address",
                    redact(url)
                )));
            }
            let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
            options
                .uris
                .push(format!("{scheme}://{auth}{host}{path}{query}"));
        }
        Ok(options)
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

    /// Check what the setters cannot: called by `connect`.
    pub(crate) fn validate(&self) -> Result<()> {
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
            .finish()
    }
}

/// `url` with its password replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{hosts}{tail}")
        }
        None => url.to_owned(),
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
        let e = AmqpOptions::from_url("amqp://h/?tls_ca_file=/nonexistent.pem").unwrap_err();
        assert!(e.to_string().contains("/nonexistent.pem"), "{e}");
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
