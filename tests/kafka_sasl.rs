//! Kafka over SASL, against the tansu of `scripts/brokers/tansu-sasl.sh start`
//! (127.0.0.1:9094, `--authentication`, user `polybus` with SCRAM-SHA-256 and
//! SCRAM-SHA-512 credentials). `POLYBUS_SKIP_KAFKA=1` opts out.
//!
//! What no broker here can show: SASL PLAIN (tansu 0.6 is built with SCRAM
//! and OAUTHBEARER only) and TLS (tansu 0.6 parses `--cert` and `--key` and
//! builds an acceptor its listener never uses; librdkafka's mock cluster
//! speaks neither SASL nor TLS). The URL and options for both are unit-tested
//! in `polybus-kafka`'s options, and TLS is tested on RabbitMQ.
#![cfg(feature = "kafka")]

use std::time::{Duration, Instant};

use futures::StreamExt;
use polybus::{Kind, Message, Subscription};

mod common;

use common::unique;

const HOST: &str = "127.0.0.1:9094";
const HINT: &str = "start the SASL tansu with `scripts/brokers/tansu-sasl.sh start`, \
                    or set POLYBUS_SKIP_KAFKA=1";

fn opted_out() -> bool {
    let out = std::env::var_os("POLYBUS_SKIP_KAFKA").is_some();
    if out {
        eprintln!("SKIPPED: POLYBUS_SKIP_KAFKA is set");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c12_scram_logins_publish_and_consume() {
    if opted_out() {
        return;
    }
    for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512"] {
        let url = format!("kafka://polybus:polybus-secret@{HOST}?sasl_mechanism={mechanism}");
        let bus = polybus::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{mechanism}: {e}; {HINT}"));
        let topic = unique("sasl.");
        let mut s = bus
            .subscribe(Subscription::new(&topic).group(unique("sasl-")))
            .await
            .unwrap();
        bus.publish(&topic, Message::new(mechanism)).await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(30), s.next())
            .await
            .expect("a delivery within 30 s")
            .unwrap()
            .unwrap();
        assert_eq!(d.message().payload().as_ref(), mechanism.as_bytes());
        d.ack().await.unwrap();
        s.close(Duration::from_secs(1)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c12_a_wrong_password_is_an_authentication_error_in_bounded_time() {
    if opted_out() {
        return;
    }
    let started = Instant::now();
    let url = format!(
        "kafka://polybus:wrong-secret@{HOST}?sasl_mechanism=SCRAM-SHA-512&connect_timeout_ms=10000"
    );
    let e = polybus::connect(&url).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.kind(), Kind::Authentication, "{e}; {HINT}");
    assert!(took < Duration::from_secs(11), "took {took:?}");
    assert!(!format!("{e} {e:?}").contains("wrong-secret"), "{e:?}");
    eprintln!("wrong password refused in {took:?}: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c12_a_client_without_credentials_is_refused_in_bounded_time() {
    if opted_out() {
        return;
    }
    let started = Instant::now();
    let e = polybus::connect(&format!("kafka://{HOST}?connect_timeout_ms=3000"))
        .await
        .unwrap_err();
    assert!(
        matches!(e.kind(), Kind::Connection | Kind::Authentication),
        "{e}; {HINT}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
