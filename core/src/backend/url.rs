//! Broker URLs: the one parser every backend reads its URL with, and the one
//! redaction every error, `Debug` and log line shows URLs and settings through.
//!
//! # Grammar
//!
//! ```text
//! scheme://[user[:password]@]host[:port][,host[:port]…][/path][?key=value[&key=value…]]
//! ```
//!
//! * **Several hosts.** The authority may name several brokers separated by
//!   commas; they share the credentials, path and query. The [`url`] crate knows
//!   one host per URL, so the host list is split off here and every host gets a
//!   single-host URL of its own (`scheme://user:password@host:port/path?query`)
//!   that the `url` crate parses; the credentials, path and query come from the
//!   first of them. A host list with an empty entry (`h1,,h2`) is refused.
//! * **Percent-decoding.** The user name, password, host names, path and every
//!   query key and value are percent-decoded (`%2F` is `/`, `%40` is `@`). A `+`
//!   stays a plus sign: it is not a space, so a password with a `+` survives.
//! * **Reserved characters in credentials.** A `/`, `?`, `#` or `@` in a user
//!   name or password must be percent-encoded. The raw forms that can be told
//!   apart are refused: an `@` after the host (in the path, or in a query key),
//!   and any `#` (a broker URL has no fragment).
//!
//! # Redaction
//!
//! [`redact`] masks, in any string that may be a URL (even a malformed one):
//! the password (`user:***@host`; a user name alone, which may be a token, is
//! masked whole: `***@host`), and the value of every query key that
//! [`is_secret_key`] flags. When the authority holds no `@` but the URL does
//! (a raw `/`, `?` or `#` in a password cut the authority short), everything up
//! to the last `@` is masked: too much when an `@` only stood in a query value,
//! never too little. [`scrub`] removes known secret values from foreign text,
//! such as a client library's error message.

use std::fmt;
use std::str::FromStr;

use percent_encoding::percent_decode_str;
use url::Url;

use crate::{Error, Result};

/// What stands in for a secret in every message.
pub const MASK: &str = "***";

/// Fragments of option names whose values are secrets, matched case-insensitively
/// with `_` and `-` read as `.`: passwords and passphrases (`sasl.password`,
/// `ssl.key.password`, `ssl.keystore.password`, `…passphrase`), secrets
/// (`sasl.oauthbearer.client.secret`), tokens, keys and key files (`ssl.key.pem`,
/// `ssl.key.location`, `sasl.kerberos.keytab`, `api_key`, private keys),
/// credentials, JAAS configurations, and the whole `sasl.oauthbearer.*` family
/// (its `config` and `extensions` may carry secrets).
const SECRET_FRAGMENTS: &[&str] = &[
    "pass",
    "pwd",
    "secret",
    "token",
    "key",
    "credential",
    "jaas",
    "private",
    "oauthbearer",
    "signature",
];

/// Whether the value of option `key` must never be shown: see the module docs.
///
/// ```
/// use polybus_core::backend::url::is_secret_key;
/// assert!(is_secret_key("sasl.password") && is_secret_key("ssl.key.pem"));
/// assert!(is_secret_key("sasl.oauthbearer.client.secret") && is_secret_key("Auth_Token"));
/// assert!(!is_secret_key("partitions") && !is_secret_key("linger.ms"));
/// ```
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase().replace(['_', '-'], ".");
    SECRET_FRAGMENTS.iter().any(|f| key.contains(f))
}

/// `url` with its password and every secret query value replaced by `***`.
///
/// Works on any text: a URL without a scheme (`user:pw@host`), a malformed one
/// (a raw `/` or `?` in a password), a bare `host:port` list.
///
/// ```
/// use polybus_core::backend::url::redact;
/// assert_eq!(redact("amqp://guest:pw@h:5672/%2f"), "amqp://guest:***@h:5672/%2f");
/// assert_eq!(redact("kafka://h:9092?sasl.password=pw&acks=all"), "kafka://h:9092?sasl.password=***&acks=all");
/// assert_eq!(redact("amqp://u:p?w@h/vh"), "amqp://u:***@h/vh");
/// ```
pub fn redact(url: &str) -> String {
    // Only a real scheme is kept apart: in `user:pw@host://…` all is credentials.
    let (head, rest) = match url.find("://") {
        Some(i)
            if url[..i]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
        {
            url.split_at(i + 3)
        }
        _ => ("", url),
    };
    let mut out = String::with_capacity(url.len());
    out.push_str(head);
    // Whether the masked credentials swallowed the `?`: then what follows them
    // is query, and its secret values are masked too.
    let (tail, in_query) = match credentials_end(rest) {
        Some(at) => {
            match rest[..at].split_once(':') {
                Some((user, _)) if !user.contains(['?', '/', '#']) => {
                    out.push_str(&format!("{user}:{MASK}@"))
                }
                _ => out.push_str(&format!("{MASK}@")),
            }
            (&rest[at + 1..], rest[..at].contains('?'))
        }
        None => (rest, false),
    };
    let (tail, fragment) = match tail.split_once('#') {
        Some((t, _)) => (t, Some(MASK)),
        None => (tail, None),
    };
    match tail.split_once('?') {
        _ if in_query => out.push_str(&redact_query(tail)),
        Some((before, query)) => {
            out.push_str(before);
            out.push('?');
            out.push_str(&redact_query(query));
        }
        None => out.push_str(tail),
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// Where the credentials of `rest` (a URL after `scheme://`) end: the last `@`
/// of the authority; or, when a raw `/`, `?`, `#` or `&` in a password ended the
/// authority early (`u:p?a=b@h`), the last `@` anywhere. That masks too much when
/// there are no credentials and a query value holds an `@`, never too little.
fn credentials_end(rest: &str) -> Option<usize> {
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => Some(at),
        None => rest.rfind('@'),
    }
}

fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if is_secret_key(&decode_lossy(k)) => format!("{k}={MASK}"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// `text` with every occurrence of each non-empty secret replaced by `***`: for
/// messages of client libraries that may echo a setting's value.
pub fn scrub<S: AsRef<str>>(text: &str, secrets: &[S]) -> String {
    let mut out = text.to_owned();
    for secret in secrets.iter().map(AsRef::as_ref) {
        if !secret.is_empty() {
            out = out.replace(secret, MASK);
        }
    }
    out
}

fn decode_lossy(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

fn decode(s: &str, what: &str) -> std::result::Result<String, String> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| format!("{what} is not percent-encoded utf-8"))
}

/// A parsed broker URL, every part percent-decoded; see the module docs.
///
/// Its `Debug` masks the password and secret query values.
#[derive(Clone)]
pub struct BrokerUrl {
    /// The scheme, as written (one of those [`parse`](BrokerUrl::parse) accepts).
    pub scheme: String,
    /// The user name, if the URL names one.
    pub user: Option<String>,
    /// The password, if the URL has one.
    pub password: Option<String>,
    /// The brokers: host names (IPv6 addresses in brackets) and ports, in order.
    pub hosts: Vec<(String, Option<u16>)>,
    /// The path without its leading `/`; `None` if the URL has none, `Some("")`
    /// for a lone `/`.
    pub path: Option<String>,
    /// The query's `key=value` pairs, in order; a pair without `=` has an empty value.
    pub query: Vec<(String, String)>,
    label: String,
    shown: String,
    /// One single-host URL per host (one without a host if there is none).
    urls: Vec<Url>,
}

impl BrokerUrl {
    /// Parse `url`, whose scheme must be one of `schemes`; `label` names the
    /// backend in messages (`invalid {label} url …`). Every error is
    /// [`InvalidInput`](crate::Kind::InvalidInput) and shows the URL redacted.
    pub fn parse(url: &str, label: &str, schemes: &[&str]) -> Result<BrokerUrl> {
        let shown = redact(url);
        let invalid =
            |what: String| Error::invalid_input(format!("invalid {label} url `{shown}`: {what}"));
        let (scheme, rest) = match url.split_once("://") {
            Some((s, rest)) if schemes.contains(&s) => (s, rest),
            _ => {
                let starts: Vec<_> = schemes.iter().map(|s| format!("{s}://")).collect();
                return Err(invalid(format!(
                    "it must start with {}",
                    starts.join(" or ")
                )));
            }
        };
        check_raw_delimiters(rest).map_err(invalid)?;
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let (userinfo, host_list) = match authority.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), authority),
        };
        let singles: Vec<&str> = match host_list {
            "" => vec![""],
            list => list.split(',').collect(),
        };
        let urls = singles
            .iter()
            .map(|host| single(scheme, &userinfo, host, tail, singles.len()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let parts = Parts::of(&urls, !host_list.is_empty()).map_err(invalid)?;
        Ok(BrokerUrl {
            scheme: scheme.to_owned(),
            user: parts.user,
            password: parts.password,
            hosts: parts.hosts,
            path: parts.path,
            query: parts.query,
            label: label.to_owned(),
            shown,
            urls,
        })
    }

    /// The URL as given, redacted: for messages.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// An [`InvalidInput`](crate::Kind::InvalidInput) error about this URL:
    /// `invalid {label} url `{redacted url}`: {what}`.
    pub fn invalid(&self, what: impl fmt::Display) -> Error {
        Error::invalid_input(format!(
            "invalid {} url `{}`: {what}",
            self.label, self.shown
        ))
    }

    /// The error for option `key`'s bad `value`: `… {key} `{value}` {what}`, the
    /// value masked if the key is a secret one.
    pub fn bad_value(&self, key: &str, value: &str, what: &str) -> Error {
        let value = if is_secret_key(key) { MASK } else { value };
        self.invalid(format!("{key} `{value}` {what}"))
    }

    /// `value` of option `key` parsed as a `T`, or [`bad_value`](Self::bad_value)
    /// saying it `what`.
    pub fn value<T: FromStr>(&self, key: &str, value: &str, what: &str) -> Result<T> {
        value.parse().map_err(|_| self.bad_value(key, value, what))
    }

    /// The single-host URL of host `index` (credentials and path percent-encoded
    /// as the `url` crate writes them), with `query` (encoded) as its query.
    ///
    /// # Panics
    ///
    /// If `index` is not below the number of hosts (or 1 when there are none).
    pub fn single_host_url(&self, index: usize, query: &[(String, String)]) -> String {
        let mut url = self.urls[index].clone();
        if query.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(query);
        }
        url.into()
    }

    /// The secret values this URL holds (the password, decoded and as written,
    /// and the values of secret query keys), for [`scrub`].
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets: Vec<String> = self.password.iter().cloned().collect();
        // A user name without a password may be a token.
        if self.password.is_none() {
            secrets.extend(self.user.iter().filter(|u| !u.is_empty()).cloned());
        }
        secrets.extend(self.urls[0].password().map(str::to_owned));
        let secret_values = self.query.iter().filter(|(k, _)| is_secret_key(k));
        secrets.extend(secret_values.map(|(_, v)| v.clone()));
        secrets
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let query: Vec<(&str, &str)> = self
            .query
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret_key(k) { MASK } else { v }))
            .collect();
        f.debug_struct("BrokerUrl")
            .field("scheme", &self.scheme)
            // A user name without a password may be a token.
            .field(
                "user",
                &self
                    .user
                    .as_deref()
                    .map(|u| if self.password.is_some() { u } else { MASK }),
            )
            .field("password", &self.password.as_ref().map(|_| MASK))
            .field("hosts", &self.hosts)
            .field("path", &self.path)
            .field("query", &query)
            .finish()
    }
}

/// Refuse the raw characters that would cut a URL somewhere its writer did not
/// mean: see the module docs.
fn check_raw_delimiters(rest: &str) -> std::result::Result<(), String> {
    const ENCODE: &str = "percent-encode `/`, `?`, `#` and `@` (%2F, %3F, %23, %40) \
                          in user names, passwords and paths";
    if rest.contains('#') {
        return Err(format!("a broker url has no fragment: {ENCODE}"));
    }
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let in_path = before_query[authority_end.min(before_query.len())..].contains('@');
    let in_key = query
        .split('&')
        .any(|pair| pair.split('=').next().is_some_and(|k| k.contains('@')));
    if in_path || in_key {
        return Err(format!("an `@` after the host: {ENCODE}"));
    }
    Ok(())
}

/// Parse the single-host URL of `host`.
fn single(
    scheme: &str,
    userinfo: &str,
    host: &str,
    tail: &str,
    count: usize,
) -> std::result::Result<Url, String> {
    if host.is_empty() && count > 1 {
        return Err("an empty broker address: name the brokers as host:port, \
                    separated by commas"
            .into());
    }
    Url::parse(&format!("{scheme}://{userinfo}{host}{tail}")).map_err(|e| {
        if host.is_empty() {
            e.to_string()
        } else {
            format!("broker address `{host}`: {e}")
        }
    })
}

/// The decoded parts of a parsed URL.
struct Parts {
    user: Option<String>,
    password: Option<String>,
    hosts: Vec<(String, Option<u16>)>,
    path: Option<String>,
    query: Vec<(String, String)>,
}

impl Parts {
    fn of(urls: &[Url], has_hosts: bool) -> std::result::Result<Parts, String> {
        let first = &urls[0];
        let hosts = if has_hosts {
            urls.iter()
                .map(|u| Ok((decode(u.host_str().unwrap_or(""), "a host")?, u.port())))
                .collect::<std::result::Result<_, String>>()?
        } else {
            Vec::new()
        };
        let user = match first.username() {
            "" => None,
            user => Some(decode(user, "the user name")?),
        };
        let password = first
            .password()
            .map(|p| decode(p, "the password"))
            .transpose()?;
        let path = match first.path() {
            "" => None,
            p => Some(decode(p.strip_prefix('/').unwrap_or(p), "the path")?),
        };
        let mut query = Vec::new();
        for pair in first.query().unwrap_or("").split('&') {
            if pair.is_empty() {
                continue;
            }
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode(k, "a query key")?;
            let value = decode(v, &format!("the value of `{key}`"))?;
            query.push((key, value));
        }
        Ok(Parts {
            user,
            password,
            hosts,
            path,
            query,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<BrokerUrl> {
        BrokerUrl::parse(url, "test", &["amqp", "kafka", "memory"])
    }

    #[test]
    fn a_password_with_raw_delimiters_is_masked_whole() {
        for (url, secret) in [
            ("amqp://u:p?a=b@h/vh", "p?a=b"),
            ("amqp://u:p/x?k=v@h/vh", "p/x?k=v"),
            ("amqp://tok?en=1@h", "tok?en=1"),
            ("amqp://u:se#c?x=y@h", "se#c?x=y"),
            ("amqp://u:p&w@h", "p&w"),
        ] {
            let shown = redact(url);
            assert!(!shown.contains(secret), "{url} -> {shown}");
            if let Err(e) = parse(url) {
                assert!(!e.to_string().contains(secret), "{url}: {e}");
            }
        }
        // A lone user name may be a token: masked in Debug and in `secrets`.
        let u = parse("amqp://t0ken@h/").unwrap();
        assert!(!format!("{u:?}").contains("t0ken"), "{u:?}");
        assert!(u.secrets().contains(&"t0ken".to_owned()));
    }

    #[test]
    fn parts_are_percent_decoded_and_hosts_split() {
        let u = parse("amqp://us%40r:p%2Fw+d@h1:5672,[::1]:5673/v%2Fh?x=a%26b&y&z=1+2").unwrap();
        assert_eq!(u.scheme, "amqp");
        assert_eq!(u.user.as_deref(), Some("us@r"));
        assert_eq!(u.password.as_deref(), Some("p/w+d"));
        assert_eq!(
            u.hosts,
            [("h1".into(), Some(5672)), ("[::1]".into(), Some(5673))]
        );
        assert_eq!(u.path.as_deref(), Some("v/h"));
        let q: Vec<(&str, &str)> = u.query.iter().map(|(k, v)| (&**k, &**v)).collect();
        assert_eq!(q, [("x", "a&b"), ("y", ""), ("z", "1+2")]);
        assert_eq!(
            u.single_host_url(1, &[("heartbeat".into(), "5".into())]),
            "amqp://us%40r:p%2Fw+d@[::1]:5673/v%2Fh?heartbeat=5"
        );
        assert!(!format!("{u:?}").contains("p/w"), "{u:?}");
        let m = parse("memory://").unwrap();
        assert!(m.hosts.is_empty() && m.path.is_none() && m.query.is_empty());
        assert_eq!(parse("kafka://h/").unwrap().path.as_deref(), Some(""));
    }

    #[test]
    fn bad_urls_name_the_part_and_hide_the_password() {
        for (url, says) in [
            (
                "http://h",
                "it must start with amqp:// or kafka:// or memory://",
            ),
            ("amqp://u:pw@h1,,h2/", "an empty broker address"),
            (
                "kafka://h:99999?sasl.password=pw",
                "broker address `h:99999`",
            ),
            ("amqp://u:p/w@h/vh", "an `@` after the host"),
            ("amqp://u:p?w@h/vh", "an `@` after the host"),
            ("amqp://u:p#w@h/vh", "no fragment"),
            (
                "amqp://u:%ff@h/vh",
                "the password is not percent-encoded utf-8",
            ),
        ] {
            let e = parse(url).unwrap_err();
            assert!(e.is_invalid_input(), "{url}");
            assert!(e.to_string().contains(says), "{url}: {e}");
            assert!(!e.to_string().contains("pw"), "{url}: {e}");
            assert!(!e.to_string().contains("p/w") && !e.to_string().contains("p?w"));
        }
    }

    #[test]
    fn redaction_masks_passwords_and_secret_values_only() {
        for (url, shown) in [
            (
                "amqp://guest:pw@localhost:5672/%2f",
                "amqp://guest:***@localhost:5672/%2f",
            ),
            ("amqp://localhost", "amqp://localhost"),
            ("amqps://a:b@h/v?x=1@2", "amqps://a:***@h/v?x=1@2"),
            ("amqp://token@h", "amqp://***@h"),
            ("guest:pw@rabbit:5672", "guest:***@rabbit:5672"),
            ("amqp://u:p/w@h/vh", "amqp://u:***@h/vh"),
            ("amqp://u:p#w@h/vh", "amqp://u:***@h/vh"),
            (
                "kafka://h?sasl.username=me@corp&SASL_PASSWORD=pw",
                // An `@` with no credentials before the host: everything up to it
                // is masked, since a raw delimiter in a password looks the same.
                "kafka://***@corp&SASL_PASSWORD=***",
            ),
            (
                "kafka://h?ssl.key.pem=pw&ssl.key.password=pw&sasl.oauthbearer.client.secret=pw",
                "kafka://h?ssl.key.pem=***&ssl.key.password=***&sasl.oauthbearer.client.secret=***",
            ),
            (
                "kafka:/h?sasl%2Epassword=pw#frag",
                "kafka:/h?sasl%2Epassword=***#***",
            ),
            ("a:1,b:2", "a:1,b:2"),
            ("u:pw@h://x", "u:***@h://x"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
        assert_eq!(
            scrub("bad value pw for x", &["pw", ""]),
            "bad value *** for x"
        );
        let u = parse("kafka://h?sasl.password=p%2Bw&linger.ms=5").unwrap();
        assert_eq!(u.secrets(), ["p+w"]);
    }
}
