//! No secret of a URL ever shows: URLs with a secret in each place one can be
//! (a password, raw or percent-encoded, a token as user name, `sasl.password`,
//! `ssl.key.password`, `ssl.key.pem`, `sasl.oauthbearer.client.secret`, a token
//! setting, a misspelt password setting), beside valid and invalid options (a bad
//! number, an unknown path, a bad port, an empty host, an unreachable broker on
//! 127.0.0.1:1 with a short `connect_timeout_ms`), go to `polybus::connect` and to
//! each options parser. The secret, raw or percent-encoded, must be absent from
//! every error's `Display`, `Debug` and whole `source()` chain, from the `Debug`
//! of the options and of the bus, and from the log lines the attempt wrote.
//!
//! Runs with `--all-features`; each backend's part needs its feature. No broker
//! is needed; the last tests also connect to the local RabbitMQ and Kafka when
//! they are up (and check the bus's `Debug`), and only check errors when not.

use std::error::Error as StdError;
use std::fmt::Debug;
use std::io::Write;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// `s` with every byte but ASCII letters and digits percent-encoded.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The forms a secret may show in: as given and percent-encoded.
fn forms(secret: &str) -> Vec<String> {
    let mut forms = vec![secret.to_owned(), encode(secret)];
    forms.dedup();
    forms
}

fn hidden(forms: &[String], what: &str, text: &str) -> Result<(), TestCaseError> {
    for form in forms {
        prop_assert!(
            !text.contains(form.as_str()),
            "{what} shows `{form}`: {text}"
        );
    }
    Ok(())
}

/// The error's `Display` and `Debug`, and those of every source under it.
fn check_error(forms: &[String], e: &(dyn StdError + 'static)) -> Result<(), TestCaseError> {
    let mut next = Some(e);
    while let Some(e) = next {
        hidden(forms, "an error", &e.to_string())?;
        hidden(forms, "an error's Debug", &format!("{e:?}"))?;
        next = e.source();
    }
    Ok(())
}

fn check_parsed<T: Debug>(
    forms: &[String],
    parsed: polybus::Result<T>,
) -> Result<(), TestCaseError> {
    match parsed {
        Ok(options) => hidden(forms, "the options' Debug", &format!("{options:?}")),
        Err(e) => check_error(forms, &e),
    }
}

/// Log lines, captured per case.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `polybus::connect(url)` on a runtime of this thread, with its log lines.
fn connect(url: &str) -> (polybus::Result<polybus::Bus>, String) {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = runtime.block_on(async {
        let result = polybus::connect(url).await;
        if let Ok(bus) = &result {
            let _ = bus.close().await;
        }
        result
    });
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    (result, text)
}

fn check_connect(forms: &[String], url: &str) -> Result<(), TestCaseError> {
    let (result, logs) = connect(url);
    hidden(forms, "a log line", &logs)?;
    match result {
        Ok(bus) => hidden(forms, "the bus's Debug", &format!("{bus:?}")),
        Err(e) => check_error(forms, &e),
    }
}

/// A secret: letters and digits, then maybe one of `specials` and a short tail.
fn secret(specials: &'static str) -> impl Strategy<Value = String> {
    let special = proptest::sample::select(specials.chars().collect::<Vec<_>>());
    (
        "Zq[A-Za-z0-9]{6,10}",
        proptest::option::of((special, "[A-Za-z0-9]{1,3}")),
    )
        .prop_map(|(head, tail)| match tail {
            Some((c, t)) => format!("{head}{c}{t}"),
            None => head,
        })
}

/// Characters a password must percent-encode, or may hold.
const ANY: &str = "/?#@&=+%: ";
/// Raw in a URL, these still leave the URL readable as one whose password holds
/// them (a raw `?` followed by `=`, which looks like a query, is covered by
/// `polybus_core::backend::url`'s own tests: everything up to the `@` is masked).
const RAW: &str = "/?#:+";

#[cfg(any(feature = "amqp", feature = "kafka"))]
const HOSTS: &[&str] = &[
    "127.0.0.1:1",
    "127.0.0.1:99999",
    "127.0.0.1:1,,127.0.0.1:2",
    "127.0.0.1:1,127.0.0.1:2",
    "127.0.0.1:port",
];

#[cfg(feature = "memory")]
proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn memory_urls_never_show_a_secret(place in 0..4usize, secret in secret(ANY), raw in secret(RAW)) {
        let e = encode(&secret);
        let (url, forms) = match place {
            0 => (format!("memory://app?token={e}"), forms(&secret)),
            1 => (format!("memory://u:{e}@app"), forms(&secret)),
            2 => (format!("memory://app/x?max_payload=abc&sasl.password={e}"), forms(&secret)),
            _ => (format!("memory://u:{raw}@app"), forms(&raw)),
        };
        check_parsed(&forms, polybus::memory::MemoryOptions::from_url(&url))?;
        check_connect(&forms, &url)?;
    }
}

#[cfg(feature = "amqp")]
const AMQP_EXTRAS: &[&str] = &[
    "",
    "max_payload=lots",
    "exchange=",
    "connect_timeout_ms=soon",
    "heartbeat=abc",
    "tls_ca_file=/nonexistent.pem",
];

#[cfg(feature = "amqp")]
proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn amqp_urls_never_show_a_secret(
        place in 0..5usize,
        secret in secret(ANY),
        raw in secret(RAW),
        host in proptest::sample::select(HOSTS),
        extra in proptest::sample::select(AMQP_EXTRAS),
    ) {
        let e = encode(&secret);
        let (url, forms) = match place {
            0 => (format!("amqp://u:{e}@{host}/%2f?{extra}"), forms(&secret)),
            1 => (format!("amqps://{e}@{host}/vh?{extra}"), forms(&secret)),
            2 => (format!("amqp://u:{raw}@{host}/vh?{extra}"), forms(&raw)),
            3 => (format!("amqp://u:p@{host}/vh?{extra}&auth_token={e}"), forms(&secret)),
            _ => (format!("amqp://u:p@{host}?password={e}&{extra}"), forms(&secret)),
        };
        let url = format!("{url}&connect_timeout_ms=300");
        check_parsed(&forms, polybus::amqp::AmqpOptions::from_url(&url))?;
        check_connect(&forms, &url)?;
    }
}

#[cfg(feature = "kafka")]
const KAFKA_SECRET_KEYS: &[&str] = &[
    "sasl.password",
    "ssl.key.password",
    "sasl.oauthbearer.client.secret",
    "ssl.key.pem",
    "sasl.oauthbearer.token",
    "sasl.passwrd",
];

#[cfg(feature = "kafka")]
const KAFKA_EXTRAS: &[&str] = &[
    "",
    "partitions=abc",
    "replication=0",
    "compression=snappy2",
    "linger.ms=5",
    "linger.ms=soon",
    "security.protocol=sasl_plaintext&sasl.mechanism=PLAIN&sasl.username=u",
];

#[cfg(feature = "kafka")]
proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn kafka_urls_never_show_a_secret(
        key in proptest::sample::select(KAFKA_SECRET_KEYS),
        in_authority in proptest::bool::weighted(0.15),
        secret in secret(ANY),
        host in proptest::sample::select(HOSTS),
        path in proptest::sample::select(&["", "/", "/x"][..]),
        extra in proptest::sample::select(KAFKA_EXTRAS),
        secret_first in any::<bool>(),
    ) {
        let e = encode(&secret);
        let url = if in_authority {
            format!("kafka://u:{e}@{host}{path}?{extra}")
        } else if secret_first {
            format!("kafka://{host}{path}?{key}={e}&{extra}")
        } else {
            format!("kafka://{host}{path}?{extra}&{key}={e}")
        };
        let url = format!("{url}&connect_timeout_ms=300");
        let forms = forms(&secret);
        check_parsed(&forms, polybus::kafka::KafkaOptions::from_url(&url))?;
        check_connect(&forms, &url)?;
    }
}

/// The two URLs a new user tried, whose errors showed `s3cr3t`.
#[cfg(feature = "kafka")]
#[test]
fn the_reported_kafka_urls_hide_the_password() {
    let forms = forms("s3cr3t");
    for url in [
        "kafka://127.0.0.1:1?sasl.password=s3cr3t&partitions=abc",
        "kafka://127.0.0.1:1/x?sasl.password=s3cr3t",
    ] {
        let (result, logs) = connect(url);
        let e = result.expect_err(url);
        assert!(e.is_invalid_input(), "{url}: {e}");
        check_error(&forms, &e).unwrap();
        hidden(&forms, "a log line", &logs).unwrap();
        check_parsed(&forms, polybus::kafka::KafkaOptions::from_url(url)).unwrap();
    }
}

/// A misspelt secret setting reaches librdkafka, whose refusal echoes its value.
#[cfg(feature = "kafka")]
#[test]
fn librdkafka_refusing_a_secret_setting_does_not_show_it() {
    let (result, _) = connect("kafka://127.0.0.1:1?sasl.passwrd=Zq-s3cr3t&connect_timeout_ms=300");
    let e = result.unwrap_err();
    assert!(e.is_invalid_input(), "{e}");
    assert!(e.to_string().contains("sasl.passwrd"), "{e}");
    check_error(&forms("Zq-s3cr3t"), &e).unwrap();
}

/// Against the live brokers when they are up: the bus's `Debug` hides the
/// secret settings it was made with.
#[cfg(all(feature = "amqp", feature = "kafka"))]
#[test]
fn live_buses_hide_their_secret_settings() {
    let forms = forms("Zq-live-s3cr3t");
    for url in [
        "amqp://guest:guest@127.0.0.1:5672/polybus-test?auth_token=Zq-live-s3cr3t&connect_timeout_ms=2000",
        "kafka://127.0.0.1:9092?sasl.password=Zq-live-s3cr3t&connect_timeout_ms=2000",
    ] {
        check_connect(&forms, url).unwrap();
    }
}
