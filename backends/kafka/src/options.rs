//! [`KafkaOptions`]: brokers, topic creation, compression, limits and time-outs,
//! parsed from a URL or built with named setters, plus one escape hatch for
//! native librdkafka settings.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use polybus_core::Result;
use polybus_core::backend::url::{BrokerUrl, MASK, is_secret_key, redact};

/// Kafka's default `message.max.bytes` is about 1 MiB for a whole record batch;
/// the payload limit leaves room for the key and headers under it.
pub const DEFAULT_MAX_PAYLOAD: usize = 1_000_000;

/// Compression of produced record batches.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// No compression.
    #[default]
    None,
    /// LZ4: cheap, the usual choice.
    Lz4,
    /// Zstandard: smaller, costs more CPU.
    Zstd,
}

impl Compression {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// Options of a Kafka connection.
///
/// ```
/// use std::time::Duration;
/// use polybus_kafka::{Compression, KafkaOptions};
///
/// let options = KafkaOptions::new("127.0.0.1:9092")
///     .partitions(6)
///     .compression(Compression::Lz4)
///     .native("linger.ms", "10");
/// # let _ = options;
/// let parsed = KafkaOptions::from_url("kafka://h1:9092,h2:9092?partitions=6&compression=zstd").unwrap();
/// # let _ = parsed;
/// ```
#[derive(Clone)]
pub struct KafkaOptions {
    pub(crate) brokers: String,
    pub(crate) partitions: i32,
    pub(crate) replication: i16,
    pub(crate) create_topics: bool,
    pub(crate) compression: Compression,
    pub(crate) max_payload: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) publish_timeout: Duration,
    pub(crate) subscribe_timeout: Duration,
    pub(crate) fetch_wait: Duration,
    pub(crate) linger: Duration,
    pub(crate) security: Security,
    pub(crate) native: Vec<(String, String)>,
}

/// How a SASL client proves who it is.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    /// The password in clear (use it over TLS only).
    Plain,
    /// SCRAM with SHA-256: the password never crosses the wire.
    ScramSha256,
    /// SCRAM with SHA-512 (the default of a URL with credentials).
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's `sasl.mechanism` name.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// TLS and SASL: what `security.protocol` and its settings become.
#[derive(Clone, Default)]
pub(crate) struct Security {
    pub(crate) sasl: Option<(SaslMechanism, String, String)>,
    pub(crate) tls: bool,
    pub(crate) ca_file: Option<String>,
}

impl Security {
    /// The librdkafka settings, applied before the native ones.
    pub(crate) fn settings(&self) -> Vec<(&'static str, String)> {
        let protocol = match (&self.sasl, self.tls) {
            (None, false) => return Vec::new(),
            (None, true) => "ssl",
            (Some(_), false) => "sasl_plaintext",
            (Some(_), true) => "sasl_ssl",
        };
        let mut settings = vec![("security.protocol", protocol.to_owned())];
        if let Some((mechanism, user, password)) = &self.sasl {
            settings.push(("sasl.mechanism", mechanism.as_str().to_owned()));
            settings.push(("sasl.username", user.clone()));
            settings.push(("sasl.password", password.clone()));
        }
        if let Some(ca) = &self.ca_file {
            settings.push(("ssl.ca.location", ca.clone()));
        }
        settings
    }
}

impl KafkaOptions {
    /// Options for the comma-separated `host:port` list `brokers`, with the defaults.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaOptions {
            brokers: brokers.into(),
            partitions: 3,
            replication: 1,
            create_topics: true,
            compression: Compression::None,
            max_payload: DEFAULT_MAX_PAYLOAD,
            connect_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(30),
            subscribe_timeout: Duration::from_secs(30),
            fetch_wait: Duration::from_millis(20),
            linger: Duration::from_millis(1),
            security: Security::default(),
            native: Vec::new(),
        }
    }

    /// Parse `kafka://host:9092,host2:9092?…`, or with SASL credentials
    /// `kafka://user:password@host:9092?sasl_mechanism=SCRAM-SHA-256`.
    ///
    /// The URL is read by [`polybus_core::backend::url`]: the brokers are a comma
    /// list of `host:port` (IPv6 as `[::1]:9092`), with no path (a lone trailing
    /// `/` is allowed); credentials, if any, are SASL's, shared by every broker;
    /// the user name, the password and every query key and value are
    /// percent-decoded (`%26` is `&`; a `+` stays a plus). polybus's own parameters:
    ///
    /// | parameter | default | meaning |
    /// |---|---|---|
    /// | `partitions` | 3 | partitions of each topic polybus creates |
    /// | `replication` | 1 | replication factor of each topic polybus creates |
    /// | `create_topics` | true | create missing topics through the admin API; when false, a missing topic is a typed error |
    /// | `compression` | none | `none`, `lz4` or `zstd` |
    /// | `max_payload` | 1000000 | larger payloads are refused before sending |
    /// | `connect_timeout_ms` | 10000 | how long `connect` waits for the cluster's metadata |
    /// | `publish_timeout_ms` | 30000 | how long a publish waits for its delivery report |
    /// | `subscribe_timeout_ms` | 30000 | how long `subscribe` waits for its partition assignment |
    /// | `fetch_wait_ms` | 20 | the longest a consumer's fetch waits at the broker for records (librdkafka `fetch.wait.max.ms`) |
    /// | `linger_ms` | 1 | how long the producer gathers records into a batch (librdkafka `linger.ms`) |
    /// | `sasl_mechanism` | SCRAM-SHA-512 | with credentials: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` |
    /// | `tls` | false | connect over TLS (`security.protocol` `ssl`, or `sasl_ssl` with credentials) |
    /// | `tls_ca_file` | the system's | a PEM file of CA certificates to trust (implies `tls`) |
    ///
    /// Any other parameter is a native librdkafka setting passed through (decoded)
    /// to the producer and consumers, e.g. `?linger.ms=10&socket.keepalive.enable=true`.
    /// The values of secret settings ([`is_secret_key`]: `sasl.password`,
    /// `ssl.key.pem`, `sasl.oauthbearer.client.secret`, …) are never shown.
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = BrokerUrl::parse(url, "kafka", &["kafka"])?;
        const HOSTS: &str = "name the brokers as host:port, separated by commas";
        if parsed.hosts.is_empty() || parsed.path.as_ref().is_some_and(|p| !p.is_empty()) {
            return Err(parsed.invalid(format!("{HOSTS}, with no path")));
        }
        let credentials = match (&parsed.user, &parsed.password) {
            (Some(user), Some(password)) if !user.is_empty() => {
                Some((user.clone(), password.clone()))
            }
            (None, None) => None,
            _ => return Err(parsed.invalid("give SASL credentials as user:password@")),
        };
        let brokers: Vec<String> = parsed
            .hosts
            .iter()
            .map(|(host, port)| match port {
                Some(port) => format!("{host}:{port}"),
                None => host.clone(),
            })
            .collect();
        let mut options = KafkaOptions::new(brokers.join(","));
        let mut mechanism = None;
        for (k, v) in &parsed.query {
            if k == "sasl_mechanism" {
                mechanism = Some(match v.as_str() {
                    "PLAIN" => SaslMechanism::Plain,
                    "SCRAM-SHA-256" => SaslMechanism::ScramSha256,
                    "SCRAM-SHA-512" => SaslMechanism::ScramSha512,
                    _ => {
                        return Err(parsed.bad_value(
                            k,
                            v,
                            "is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
                        ));
                    }
                });
                continue;
            }
            options.apply(&parsed, k, v)?;
        }
        match (credentials, mechanism) {
            (Some((user, password)), m) => {
                options = options.sasl(m.unwrap_or(SaslMechanism::ScramSha512), user, password);
            }
            (None, Some(_)) => {
                return Err(parsed.invalid("sasl_mechanism needs credentials: user:password@"));
            }
            (None, None) => {}
        }
        Ok(options)
    }

    /// Apply URL parameter `k`: polybus's own, or else a native setting.
    fn apply(&mut self, url: &BrokerUrl, k: &str, v: &str) -> Result<()> {
        let millis = |v: &str| {
            url.value(k, v, "is not a number of milliseconds")
                .map(Duration::from_millis)
        };
        match k {
            "partitions" => self.partitions = positive(url, k, v)?,
            "replication" => self.replication = positive(url, k, v)?,
            "create_topics" => self.create_topics = url.value(k, v, "is not true or false")?,
            "compression" => {
                self.compression = match v {
                    "none" => Compression::None,
                    "lz4" => Compression::Lz4,
                    "zstd" => Compression::Zstd,
                    _ => return Err(url.bad_value(k, v, "is not one of none, lz4, zstd")),
                }
            }
            "max_payload" => self.max_payload = url.value(k, v, "is not a number of bytes")?,
            "connect_timeout_ms" => self.connect_timeout = millis(v)?,
            "publish_timeout_ms" => self.publish_timeout = millis(v)?,
            "subscribe_timeout_ms" => self.subscribe_timeout = millis(v)?,
            "fetch_wait_ms" => self.fetch_wait = millis(v)?,
            "linger_ms" => self.linger = millis(v)?,
            "tls" => self.security.tls = url.value(k, v, "is not true or false")?,
            "tls_ca_file" => {
                self.security.tls = true;
                self.security.ca_file = Some(v.into());
            }
            _ => self.native.push((k.into(), v.into())),
        }
        Ok(())
    }

    /// Partitions of each topic polybus creates (default 3; more than one, so a
    /// group's members share the work).
    pub fn partitions(mut self, n: i32) -> Self {
        self.partitions = n.max(1);
        self
    }

    /// Replication factor of each topic polybus creates (default 1).
    pub fn replication(mut self, n: i16) -> Self {
        self.replication = n.max(1);
        self
    }

    /// Create missing topics through the admin API (default), or require them to
    /// exist: then publishing to, or subscribing to, a missing topic is a
    /// [`Refused`](polybus_core::Kind::Refused) error.
    pub fn create_topics(mut self, on: bool) -> Self {
        self.create_topics = on;
        self
    }

    /// Compress produced batches.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Refuse payloads larger than `bytes` before sending.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// How long `connect` waits for the cluster to answer.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a publish waits for its delivery report.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// How long `subscribe` waits for the group to assign partitions.
    pub fn subscribe_timeout(mut self, timeout: Duration) -> Self {
        self.subscribe_timeout = timeout;
        self
    }

    /// The longest a consumer's fetch waits at the broker when it has no
    /// records (default 20 ms; librdkafka's own is 500).
    ///
    /// Kafka answers a fetch as soon as a record arrives, so there this only sets
    /// how often an idle consumer asks again (50 times a second per broker at
    /// 20 ms). Brokers that hold every fetch for the whole wait deliver a record
    /// half a wait late on average: measured here at 1,000 msg/s, p50
    /// publish-to-delivery on librdkafka's mock cluster was 54 ms with a 100 ms
    /// wait and 12 ms with 20 ms; on tansu at 100 msg/s, 144 ms and 30 ms
    /// (BENCHMARKS.md, latency rows). Raise it to spare a busy broker idle
    /// requests; lower it for latency on such brokers.
    pub fn fetch_wait(mut self, wait: Duration) -> Self {
        self.fetch_wait = wait;
        self
    }

    /// How long the producer waits to gather records into one batch (default
    /// 1 ms; librdkafka's own is 5). Every publish awaits its delivery report, so
    /// the linger is added to each publish's latency; records published while a
    /// batch is in flight are batched anyway, so a longer linger buys little
    /// throughput for publishes in a pipeline.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Authenticate with SASL `mechanism` as `user` (over TLS if
    /// [`tls`](Self::tls) is on). A wrong password is an
    /// [`Authentication`](polybus_core::Kind::Authentication) error from
    /// `connect`, within its time-out; the password is never shown.
    pub fn sasl(
        mut self,
        mechanism: SaslMechanism,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.security.sasl = Some((mechanism, user.into(), password.into()));
        self
    }

    /// Connect over TLS, trusting the CA certificates in the PEM file
    /// `ca_file`, or the system's with `None`.
    pub fn tls(mut self, ca_file: Option<String>) -> Self {
        self.security.tls = true;
        self.security.ca_file = ca_file;
        self
    }

    /// The escape hatch: a native librdkafka setting, applied to the producer and
    /// every consumer after polybus's own, so it wins. Settings polybus relies on
    /// (`enable.auto.commit`, `group.id`, ...) can be broken this way; you own it.
    pub fn native(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.native.push((key.into(), value.into()));
        self
    }

    /// The broker list, as given.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// The values of the native settings that hold secrets, for scrubbing
    /// librdkafka's messages.
    pub(crate) fn secrets(&self) -> Vec<&str> {
        self.native
            .iter()
            .filter(|(k, _)| is_secret_key(k))
            .map(|(_, v)| v.as_str())
            .chain(self.security.sasl.as_ref().map(|(_, _, p)| p.as_str()))
            .collect()
    }
}

/// `v` parsed as a number above zero, or the error saying it is not one.
fn positive<T: FromStr + PartialOrd + Default>(url: &BrokerUrl, k: &str, v: &str) -> Result<T> {
    const WHAT: &str = "is not a positive number";
    match url.value(k, v, WHAT)? {
        n if n > T::default() => Ok(n),
        _ => Err(url.bad_value(k, v, WHAT)),
    }
}

/// Native values may hold secrets (`sasl.password`, `ssl.key.password`): shown
/// masked, by [`is_secret_key`]; the brokers are shown through [`redact`].
impl fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let native: Vec<_> = self
            .native
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret_key(k) { MASK } else { v }))
            .collect();
        f.debug_struct("KafkaOptions")
            .field("brokers", &redact(&self.brokers))
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("create_topics", &self.create_topics)
            .field("compression", &self.compression)
            .field("max_payload", &self.max_payload)
            .field("connect_timeout", &self.connect_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field("subscribe_timeout", &self.subscribe_timeout)
            .field("fetch_wait", &self.fetch_wait)
            .field("linger", &self.linger)
            .field(
                "sasl",
                &self
                    .security
                    .sasl
                    .as_ref()
                    .map(|(m, user, _)| (m, user, MASK)),
            )
            .field("tls", &self.security.tls)
            .field("tls_ca_file", &self.security.ca_file)
            .field("native", &native)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_read_and_the_rest_passes_through() {
        let o = KafkaOptions::from_url(
            "kafka://a:9092,b:9093?partitions=6&compression=lz4&create_topics=false&linger.ms=7",
        )
        .unwrap();
        assert_eq!(o.brokers, "a:9092,b:9093");
        assert_eq!(o.partitions, 6);
        assert_eq!(o.compression, Compression::Lz4);
        assert!(!o.create_topics);
        assert_eq!(o.native, [("linger.ms".to_string(), "7".to_string())]);
        let o = KafkaOptions::from_url("kafka://a:1?fetch_wait_ms=250&linger_ms=0").unwrap();
        assert_eq!(o.fetch_wait, Duration::from_millis(250));
        assert_eq!(o.linger, Duration::ZERO);
    }

    #[test]
    fn bad_urls_are_typed_errors_naming_the_part() {
        for (url, says) in [
            ("amqp://x", "kafka://"),
            ("kafka://", "host:port"),
            ("kafka://a:1,,b:2", "host:port"),
            ("kafka://a:1?partitions=0", "partitions"),
            ("kafka://a:1?compression=snappy2", "compression"),
            ("kafka://a:1?publish_timeout_ms=soon", "publish_timeout_ms"),
            ("kafka://a:1?fetch_wait_ms=-1", "fetch_wait_ms"),
        ] {
            let e = KafkaOptions::from_url(url).unwrap_err();
            assert!(e.is_invalid_input(), "{url}");
            assert!(e.to_string().contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn secrets_in_native_settings_are_masked() {
        let o = KafkaOptions::new("a:1").native("sasl.password", "hunter2");
        assert!(!format!("{o:?}").contains("hunter2"));
    }

    #[test]
    fn values_are_percent_decoded_and_secrets_never_shown() {
        let o = KafkaOptions::from_url(
            "kafka://[::1]:9092,b/?sasl.password=a%26b+c&sasl.username=me%40corp&partitions=%32",
        )
        .unwrap();
        assert_eq!(o.brokers, "[::1]:9092,b");
        assert_eq!(o.partitions, 2);
        assert_eq!(o.native[0], ("sasl.password".into(), "a&b+c".into()));
        assert_eq!(o.native[1], ("sasl.username".into(), "me@corp".into()));
        assert!(!format!("{o:?}").contains("a&b"), "{o:?}");
        for url in [
            "kafka://127.0.0.1:1?sasl.password=s3cr3t&partitions=abc",
            "kafka://127.0.0.1:1/x?sasl.password=s3cr3t",
            "kafka://u:s3cr3t@127.0.0.1:1?sasl_mechanism=MD5",
            "kafka://:s3cr3t@127.0.0.1:1",
            "kafka://127.0.0.1:99999?ssl.key.password=s3cr3t",
            "kafka://h?sasl.oauthbearer.client.secret=s3cr3t&replication=0",
        ] {
            let e = KafkaOptions::from_url(url).unwrap_err();
            assert!(e.is_invalid_input(), "{url}");
            assert!(!format!("{e} {e:?}").contains("s3cr3t"), "{url}: {e}");
        }
    }

    /// The librdkafka setting `key` that `o`'s security makes.
    fn setting(o: &KafkaOptions, key: &str) -> Option<String> {
        let settings = o.security.settings();
        settings
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    #[test]
    fn credentials_in_the_url_are_sasl_and_never_shown() {
        let o = KafkaOptions::from_url("kafka://svc:hunter2@h:9094?sasl_mechanism=SCRAM-SHA-256")
            .unwrap();
        let get = |k| setting(&o, k);
        assert_eq!(get("security.protocol").as_deref(), Some("sasl_plaintext"));
        assert_eq!(get("sasl.mechanism").as_deref(), Some("SCRAM-SHA-256"));
        assert_eq!(get("sasl.username").as_deref(), Some("svc"));
        assert_eq!(get("sasl.password").as_deref(), Some("hunter2"));
        assert!(!format!("{o:?}").contains("hunter2"), "{o:?}");
        assert_eq!(o.secrets(), ["hunter2"]);
        // SCRAM-SHA-512 by default; TLS with a CA file.
        let o = KafkaOptions::from_url("kafka://svc:pw@h:9094?tls_ca_file=/etc/ca.pem").unwrap();
        let get = |k| setting(&o, k);
        assert_eq!(get("security.protocol").as_deref(), Some("sasl_ssl"));
        assert_eq!(get("sasl.mechanism").as_deref(), Some("SCRAM-SHA-512"));
        assert_eq!(get("ssl.ca.location").as_deref(), Some("/etc/ca.pem"));
        let o = KafkaOptions::from_url("kafka://h:9093?tls=true").unwrap();
        assert_eq!(
            o.security.settings(),
            [("security.protocol", "ssl".to_owned())]
        );
        assert!(KafkaOptions::new("h:1").security.settings().is_empty());
        let e = KafkaOptions::from_url("kafka://h:1?sasl_mechanism=PLAIN").unwrap_err();
        assert!(
            e.is_invalid_input() && e.to_string().contains("credentials"),
            "{e}"
        );
    }
}
