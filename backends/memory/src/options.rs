//! [`MemoryOptions`]: which in-process broker to open and its payload limit,
//! parsed from a URL or built with named setters.

use polybus_core::Result;
use polybus_core::backend::url::BrokerUrl;

/// The default payload limit: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// Options of an in-memory broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryOptions {
    pub(crate) name: Option<String>,
    pub(crate) max_payload: usize,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        MemoryOptions {
            name: None,
            max_payload: DEFAULT_MAX_PAYLOAD,
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

    /// The broker's name; `None` for a private broker.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Named `name` if it has no name yet: a private broker that can be joined.
    pub fn or_named(mut self, name: impl Into<String>) -> Self {
        self.name.get_or_insert_with(|| name.into());
        self
    }

    /// Parse a `memory://[NAME][?max_payload=BYTES]` URL.
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
                _ => {
                    return Err(
                        parsed.invalid(format!("unknown option `{k}` (known: max_payload)"))
                    );
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
