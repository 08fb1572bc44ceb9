//! RabbitMQ beyond the conformance suite: connection errors (C12), TLS, and
//! interop with another AMQP client. The restart test is in `amqp_restart.rs`,
//! its own binary, so stopping the broker cannot break a test running beside it.
//!
//! Needs the broker of `scripts/brokers/rabbitmq.sh start` (it also installs pika
//! for the interop test). `POLYBUS_SKIP_AMQP=1` opts out; each test then says so.
#![cfg(feature = "amqp")]

use std::time::{Duration, Instant};

use futures::StreamExt;
use polybus::{Kind, Message, Subscription};

mod common;

use common::{HINT, HOST, VHOST, bus, unique, url};

#[tokio::test]
async fn c12_bad_credentials_are_a_typed_error_without_the_password() {
    let Some(_) = url() else { return };
    let started = Instant::now();
    let e = polybus::connect(&format!("amqp://guest:wrong-secret@{HOST}/{VHOST}"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::Authentication, "{e}");
    assert!(!e.to_string().contains("wrong-secret"), "{e}");
    assert!(!format!("{e:?}").contains("wrong-secret"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test]
async fn c12_unknown_vhost_is_a_typed_error() {
    let Some(_) = url() else { return };
    let e = polybus::connect(&format!("amqp://guest:guest@{HOST}/no-such-vhost"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::Authentication, "{e}");
    assert!(e.to_string().contains("no-such-vhost"), "{e}");
}

#[tokio::test]
async fn c12_refused_and_silent_brokers_fail_within_bounds() {
    let Some(_) = url() else { return };
    let started = Instant::now();
    let e = polybus::connect("amqp://guest:guest@127.0.0.1:1/x")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::Connection, "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A listener that accepts and never speaks: the connect time-out applies.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let started = Instant::now();
    let e = polybus::connect(&format!(
        "amqp://guest:guest@127.0.0.1:{port}/x?connect_timeout_ms=1500"
    ))
    .await
    .unwrap_err();
    assert!(matches!(e.kind(), Kind::Timeout | Kind::Connection), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn c12_the_next_broker_address_is_tried_after_a_failure() {
    let Some(_) = url() else { return };
    let bus = bus(&format!("amqp://guest:guest@127.0.0.1:1,{HOST}/{VHOST}")).await;
    let topic = unique("failover.");
    let mut sub = bus
        .subscribe(Subscription::new(topic.clone()))
        .await
        .unwrap();
    bus.publish(&topic, Message::new("via the second"))
        .await
        .unwrap();
    let d = sub.next().await.unwrap().unwrap();
    assert_eq!(d.message().payload().as_ref(), b"via the second");
    d.ack().await.unwrap();
}

#[tokio::test]
async fn tls_amqps_works_with_the_test_ca() {
    let Some(_) = url() else { return };
    let ca = "/var/lib/rabbitmq/polybus/tls/ca.pem"; // made by scripts/brokers/rabbitmq.sh
    assert!(
        std::path::Path::new(ca).exists(),
        "no test CA at {ca}; {HINT}"
    );
    let bus = bus(&format!(
        "amqps://guest:guest@localhost:5671/{VHOST}?tls_ca_file={ca}"
    ))
    .await;
    let topic = unique("tls.");
    let mut sub = bus
        .subscribe(Subscription::new(topic.clone()))
        .await
        .unwrap();
    bus.publish(&topic, Message::new("over tls")).await.unwrap();
    let d = sub.next().await.unwrap().unwrap();
    assert_eq!(d.message().payload().as_ref(), b"over tls");
    d.ack().await.unwrap();

    // Without the CA the server certificate is not trusted: a typed error.
    let e = polybus::connect(&format!("amqps://guest:guest@localhost:5671/{VHOST}"))
        .await
        .unwrap_err();
    assert!(matches!(e.kind(), Kind::Connection | Kind::Other), "{e}");
}

/// Another AMQP client (Python's pika) publishes a plain message straight to
/// the exchange: polybus reads it, with whatever metadata it carried.
#[tokio::test]
async fn interop_plain_messages_from_pika_are_consumed() {
    let Some(url) = url() else { return };
    let bus = bus(&url).await;
    let topic = unique("interop.");
    let mut sub = bus
        .subscribe(Subscription::new(topic.clone()).group(unique("pika-")))
        .await
        .unwrap();
    let script = format!(
        r#"
import pika
c = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@{HOST}/{VHOST}"))
ch = c.channel()
ch.basic_publish(exchange="polybus", routing_key="{topic}", body=b"from pika",
    properties=pika.BasicProperties(headers={{"n": 7, "s": "text"}}, content_type="text/plain"))
c.close()
"#
    );
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .await
        .expect("python3");
    assert!(
        out.status.success(),
        "pika failed (is it installed? scripts/brokers/rabbitmq.sh start installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("pika's message arrives")
        .unwrap()
        .unwrap();
    let m = d.message();
    assert_eq!(m.payload().as_ref(), b"from pika");
    assert_eq!(m.content_type(), Some("text/plain"));
    assert_eq!(m.header("n"), Some("7"));
    assert_eq!(m.header("s"), Some("text"));
    assert!(!m.id().is_empty());
    assert_eq!(d.attempt(), 1);
    assert_eq!(d.topic().as_str(), topic);
    d.ack().await.unwrap();
}

/// Found while moving URL parsing to the `url` crate: lapin's URI parser takes
/// the host from `Url::domain()`, which is `None` for an IPv6 address (an IPv4
/// one is an opaque host in a non-special scheme, and works), and then falls
/// back to `localhost`. A listener on the named address must see the attempt.
#[tokio::test]
async fn c12_an_ip_address_host_is_the_host_connected_to() {
    for (bind, host) in [("127.0.0.2:0", "127.0.0.2"), ("[::1]:0", "[::1]")] {
        let Ok(listener) = tokio::net::TcpListener::bind(bind).await else {
            panic!("cannot listen on {bind}: the test needs loopback addresses");
        };
        let port = listener.local_addr().unwrap().port();
        let accepted = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
        // The listener speaks no AMQP, so the connect fails either way; where it
        // went is the point.
        let _ = polybus::connect(&format!(
            "amqp://guest:guest@{host}:{port}/%2f?connect_timeout_ms=1000"
        ))
        .await;
        let seen = tokio::time::timeout(Duration::from_secs(2), accepted).await;
        assert!(
            matches!(seen, Ok(Ok(Ok(())))),
            "nothing connected to {host}:{port}: the client went elsewhere"
        );
    }
}
