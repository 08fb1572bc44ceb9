//! [`MemoryOptions`]: which in-process broker to open, its payload limit and
//! its groups' bound, parsed from a URL or built with named setters.

use std::time::Duration;

use polybus_core::backend::url::BrokerUrl;
use polybus_core::{Overflow, Result};

/// The default payload limit: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// The default bound of a group: 10,000 ready messages, a few megabytes of
/// small ones. Generous for the tests and services an in-process broker
/// serves, it keeps a producer that outruns its consumers from eating the
/// process's memory, and a backlog this size stays in the CPU's caches: with
/// 100,000, a producer that outruns its consumer ran a sixth slower (the
/// queue's memory was cold on every hand-out). Raise it with `max_depth`.
pub const DEFAULT_MAX_DEPTH: usize = 10_000;

/// The default time a publish waits for room in a full group: 30 s, as the
/// other backends wait for their broker.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of an in-memory broker.
///
/// | URL query | setter | default | what |
/// |---|---|---|---|
/// | `max_payload=BYTES` | [`max_payload`](Self::max_payload) | 1 MiB | larger payloads are refused |
/// | `max_depth=N` or `unbounded` | [`max_depth`](Self::max_depth), [`unbounded`](Self::unbounded) | 10,000 | ready messages a group holds, unless its subscription sets [`Subscription::max_depth`](polybus_core::Subscription::max_depth) |
/// | `overflow=block` or `reject-publish` | [`overflow`](Self::overflow) | `block` | what a publish to a full group does |
/// | `publish_timeout_ms=MS` | [`publish_timeout`](Self::publish_timeout) | 30000 | how long a blocked publish waits for room |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryOptions {
    pub(crate) name: Option<String>,
    pub(crate) max_payload: usize,
    pub(crate) max_depth: Option<usize>,
    pub(crate) overflow: Overflow,
    pub(crate) publish_timeout: Duration,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        MemoryOptions {
            name: None,
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_depth: Some(DEFAULT_MAX_DEPTH),
            overflow: Overflow::Block,
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
        }
    }
}

impl MemoryOptions {
    /// Join (or create) the broker called `name` in this process.
    pub fn named(name: impl Into<String>) -> Self {
        MemoryOptions {
            name: Some(name.into()),
            ..Self::default()
        }
    }

    /// Refuse payloads larger than `bytes`. A named broker keeps the limit it was
    /// created with.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// Bound each group to `messages` ready messages (at least 1), unless its
    /// subscription sets its own. A named broker keeps the bound it was
    /// created with.
    pub fn max_depth(mut self, messages: usize) -> Self {
        self.max_depth = Some(messages.max(1));
        self
    }

    /// Let groups grow without bound, as the broker did before bounds: a
    /// producer faster than its consumers then grows the process's memory.
    pub fn unbounded(mut self) -> Self {
        self.max_depth = None;
        self
    }

    /// What a publish to a full group does by default; see [`Overflow`].
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// How long a publish waits for room in a full group before it fails with a
    /// [`Timeout`](polybus_core::Kind::Timeout) error handing the message back.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// The broker's name; `None` for a private broker.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Named `name` if it has no name yet: a private broker that can be joined.
    pub fn or_named(mut self, name: impl Into<String>) -> Self {
        self.name.get_or_insert_with(|| name.into());
        self
    }

    /// Parse a `memory://[NAME][?OPTION=VALUE&...]` URL, with the options of the
    /// table above.
    ///
    /// The URL is read by [`polybus_core::backend::url`]: NAME and the query are
    /// percent-decoded (`memory://a%2Fb` names the broker `a/b`). It names one
    /// broker at most, with no port, credentials or path.
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = BrokerUrl::parse(url, "memory", &["memory"])?;
        let mut options = match parsed.hosts.as_slice() {
            [] => MemoryOptions::default(),
            [(name, None)] => MemoryOptions::named(name.as_str()),
            _ => return Err(parsed.invalid("name one broker, without a port")),
        };
        if parsed.user.is_some() || parsed.path.as_ref().is_some_and(|p| !p.is_empty()) {
            return Err(parsed.invalid("a memory url has no credentials or path"));
        }
        for (k, v) in &parsed.query {
            match k.as_str() {
                "max_payload" => {
                    options.max_payload = parsed.value(k, v, "is not a number of bytes")?
                }
                "max_depth" if v == "unbounded" => options.max_depth = None,
                "max_depth" => {
                    let n: usize =
                        parsed.value(k, v, "is not a number of messages or `unbounded`")?;
                    if n == 0 {
                        return Err(parsed.invalid("max_depth must be at least 1 (or `unbounded`)"));
                    }
                    options.max_depth = Some(n);
                }
                "overflow" => {
                    options.overflow = match v.as_str() {
                        "block" => Overflow::Block,
                        "reject-publish" => Overflow::RejectPublish,
                        _ => {
                            return Err(parsed.invalid(format!(
                                "overflow `{v}` is not `block` or `reject-publish`"
                            )));
                        }
                    }
                }
                "publish_timeout_ms" => {
                    let ms: u64 = parsed.value(k, v, "is not a number of milliseconds")?;
                    options.publish_timeout = Duration::from_millis(ms);
                }
                _ => {
                    return Err(parsed.invalid(format!(
                        "unknown option `{k}` (known: max_payload, max_depth, overflow, \
                         publish_timeout_ms)"
                    )));
                }
            }
        }
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_options_parse_and_reject_unknowns() {
        assert_eq!(
            MemoryOptions::from_url("memory://").unwrap(),
            MemoryOptions::default()
        );
        let o = MemoryOptions::from_url("memory://app?max_payload=10").unwrap();
        assert_eq!(o, MemoryOptions::named("app").max_payload(10));
        let o = MemoryOptions::from_url(
            "memory://?max_depth=5&overflow=reject-publish&publish_timeout_ms=250",
        )
        .unwrap();
        assert_eq!(
            o,
            MemoryOptions::default()
                .max_depth(5)
                .overflow(Overflow::RejectPublish)
                .publish_timeout(Duration::from_millis(250))
        );
        assert_eq!(
            MemoryOptions::from_url("memory://?max_depth=unbounded").unwrap(),
            MemoryOptions::default().unbounded()
        );
        for bad in [
            "memory://?max_depth=0",
            "memory://?max_depth=-1",
            "memory://?overflow=drop-head",
            "memory://?publish_timeout_ms=soon",
        ] {
            let e = MemoryOptions::from_url(bad).unwrap_err();
            assert!(e.is_invalid_input(), "{bad}: {e}");
        }
        let e = MemoryOptions::from_url("memory://?max_payload=ten").unwrap_err();
        assert!(
            e.is_invalid_input() && e.to_string().contains("`ten`"),
            "{e}"
        );
        assert!(
            MemoryOptions::from_url("memory://?size=1")
                .unwrap_err()
                .is_invalid_input()
        );
        assert!(
            MemoryOptions::from_url("amqp://x")
                .unwrap_err()
                .is_invalid_input()
        );
    }

    #[test]
    fn names_are_percent_decoded_and_secrets_hidden() {
        let o = MemoryOptions::from_url("memory://a%2Fb%20c?max_payload=%31").unwrap();
        assert_eq!(o, MemoryOptions::named("a/b c").max_payload(1));
        for url in [
            "memory://?token=s3cr3t",
            "memory://u:s3cr3t@app",
            "memory://app/x?api_key=s3cr3t",
            "memory://a,b?max_payload=1&password=s3cr3t",
        ] {
            let e = MemoryOptions::from_url(url).unwrap_err();
            assert!(e.is_invalid_input(), "{url}");
            assert!(!format!("{e} {e:?}").contains("s3cr3t"), "{url}: {e}");
        }
    }
}
