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

use common::proxy::{FrameProxy, Settle};
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

// Coalesced acks (`AmqpOptions::ack_batch`): what reaches the wire, seen by a
// proxy that reads the client's frames, and what the broker redelivers after
// the connection is cut, as it is when a client crashes.

/// A durable group subscribed through a frame-reading proxy, and a publisher
/// connected straight to the broker.
struct Coalescing {
    proxy: FrameProxy,
    sub: polybus::DeliveryStream,
    publisher: polybus::Bus,
    topic: String,
    group: String,
    /// The subscriber's bus, connected through `proxy` with the test's URL parameters.
    consumer: polybus::Bus,
}

async fn coalescing(url: &str, params: &str, prefetch: u32) -> Coalescing {
    let proxy = FrameProxy::start(HOST).await;
    let consumer = bus(&format!(
        "amqp://guest:guest@127.0.0.1:{}/{VHOST}?{params}",
        proxy.port
    ))
    .await;
    let (topic, group) = (unique("coalesce."), unique("coalesce-"));
    let sub = consumer
        .subscribe(
            Subscription::new(topic.clone())
                .group(group.clone())
                .prefetch(prefetch),
        )
        .await
        .unwrap();
    Coalescing {
        proxy,
        sub,
        publisher: bus(url).await,
        topic,
        group,
        consumer,
    }
}

/// Publish `n` messages whose payloads are their numbers.
async fn publish_numbered(bus: &polybus::Bus, topic: &str, n: usize) {
    for i in 0..n {
        bus.publish(topic, Message::new(i.to_string()))
            .await
            .unwrap();
    }
}

async fn receive(sub: &mut polybus::DeliveryStream, n: usize) -> Vec<polybus::Delivery> {
    let mut got = Vec::new();
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("a delivery within 10 s")
            .unwrap()
            .unwrap();
        got.push(d);
    }
    got
}

/// Wait until the proxy has seen `n` settlement frames (or 5 s pass).
async fn settlements(proxy: &FrameProxy, n: usize) -> Vec<Settle> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.settlements().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.settlements()
}

/// What `group` holds now: every message until a sentinel published after
/// `expected` have arrived, acked. Redeliveries of a closed channel are
/// requeued together, so one of them arriving late would come before the sentinel.
async fn remaining(url: &str, topic: &str, group: &str, expected: usize) -> Vec<String> {
    let bus = bus(url).await;
    let mut sub = bus
        .subscribe(Subscription::new(topic).group(group))
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut sentinel_sent = expected == 0;
    if sentinel_sent {
        bus.publish(topic, Message::new("sentinel")).await.unwrap();
    }
    loop {
        let d = tokio::time::timeout(Duration::from_secs(15), sub.next())
            .await
            .unwrap_or_else(|_| panic!("{group} went quiet; so far {got:?}"))
            .unwrap()
            .unwrap();
        let payload = String::from_utf8(d.message().payload().to_vec()).unwrap();
        d.ack().await.unwrap();
        if payload == "sentinel" {
            break;
        }
        got.push(payload);
        if !sentinel_sent && got.len() >= expected {
            bus.publish(topic, Message::new("sentinel")).await.unwrap();
            sentinel_sent = true;
        }
    }
    sub.close(Duration::from_secs(5)).await.unwrap();
    got.sort();
    got
}

#[tokio::test]
async fn c7_a_run_of_contiguous_acks_is_one_frame_and_close_sends_it() {
    let Some(url) = url() else { return };
    // Only the batch (half the prefetch: 50) or the close sends acks here.
    let Coalescing {
        proxy,
        mut sub,
        publisher,
        topic,
        group,
        consumer: _consumer,
    } = coalescing(&url, "ack_flush_ms=600000", 100).await;
    publish_numbered(&publisher, &topic, 60).await;
    let deliveries = receive(&mut sub, 60).await;
    assert!(proxy.settlements().is_empty(), "nothing is settled yet");
    for d in deliveries {
        d.ack().await.unwrap();
    }
    // The 50th ack filled the batch: one frame for tags 1..=50; the last ten wait.
    assert_eq!(
        settlements(&proxy, 1).await,
        [Settle::Ack {
            tag: 50,
            multiple: true
        }]
    );
    sub.close(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        proxy.settlements(),
        [
            Settle::Ack {
                tag: 50,
                multiple: true
            },
            Settle::Ack {
                tag: 60,
                multiple: true
            }
        ],
        "close sends the acks still waiting"
    );
    assert_eq!(
        remaining(&url, &topic, &group, 0).await,
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn c9_out_of_order_acks_never_cover_an_unsettled_delivery() {
    let Some(url) = url() else { return };
    // Prefetch 10: six unsettled are more than half of it, so a quiet stream
    // flushes; the batch (5) is not reached by the four acks.
    let Coalescing {
        proxy,
        mut sub,
        publisher,
        topic,
        group,
        consumer: _consumer,
    } = coalescing(&url, "ack_flush_ms=600000", 10).await;
    publish_numbered(&publisher, &topic, 6).await;
    let mut deliveries: Vec<Option<polybus::Delivery>> =
        receive(&mut sub, 6).await.into_iter().map(Some).collect();
    // Tags 1..=6 carry payloads 0..=5. Ack tags 4, 6, 2, 1; 3 and 5 stay unsettled.
    for tag in [4usize, 6, 2, 1] {
        deliveries[tag - 1].take().unwrap().ack().await.unwrap();
    }
    // The stream has nothing more to hand out: polling it sends what waits.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err()
    );
    assert_eq!(
        settlements(&proxy, 3).await,
        [
            Settle::Ack {
                tag: 2,
                multiple: true
            },
            Settle::Ack {
                tag: 4,
                multiple: false
            },
            Settle::Ack {
                tag: 6,
                multiple: false
            },
        ]
    );
    // A crash now: the broker must give back exactly the two never acked.
    proxy.cut();
    assert_eq!(remaining(&url, &topic, &group, 2).await, ["2", "4"]);
    drop(deliveries);
}

#[tokio::test]
async fn c9_an_ack_not_yet_sent_when_the_connection_dies_is_redelivered() {
    let Some(url) = url() else { return };
    let Coalescing {
        proxy,
        mut sub,
        publisher,
        topic,
        group,
        consumer: _consumer,
    } = coalescing(&url, "ack_flush_ms=600000", 100).await;
    publish_numbered(&publisher, &topic, 3).await;
    for d in receive(&mut sub, 3).await {
        d.ack().await.unwrap();
    }
    // A quiet stream holding 3 of its prefetch of 100 (under half) leaves
    // them waiting for the batch or the delay.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err()
    );
    // `Ok` means recorded: the frames wait for the batch, a quiet stream, the
    // delay or the close, and a crash before any of them loses none of the messages.
    proxy.cut();
    assert!(proxy.settlements().is_empty());
    assert_eq!(remaining(&url, &topic, &group, 3).await, ["0", "1", "2"]);
}

#[tokio::test]
async fn c7_a_waiting_ack_is_sent_after_the_flush_delay() {
    let Some(url) = url() else { return };
    let Coalescing {
        proxy,
        mut sub,
        publisher,
        topic,
        group,
        consumer: _consumer,
    } = coalescing(&url, "ack_flush_ms=100", 100).await;
    publish_numbered(&publisher, &topic, 2).await;
    let mut got = receive(&mut sub, 2).await;
    got.remove(0).ack().await.unwrap();
    // The stream is not polled again: only the delay sends it.
    assert_eq!(
        settlements(&proxy, 1).await,
        [Settle::Ack {
            tag: 1,
            multiple: false
        }]
    );
    proxy.cut();
    assert_eq!(remaining(&url, &topic, &group, 1).await, ["1"]);
}

#[tokio::test]
async fn c7_ack_batch_1_sends_every_ack_at_once() {
    let Some(url) = url() else { return };
    let Coalescing {
        proxy,
        mut sub,
        publisher,
        topic,
        group,
        consumer: _consumer,
    } = coalescing(&url, "ack_batch=1&ack_flush_ms=600000", 100).await;
    publish_numbered(&publisher, &topic, 3).await;
    for d in receive(&mut sub, 3).await {
        d.ack().await.unwrap();
    }
    let expected: Vec<Settle> = (1..=3)
        .map(|tag| Settle::Ack {
            tag,
            multiple: false,
        })
        .collect();
    assert_eq!(settlements(&proxy, 3).await, expected);
    proxy.cut();
    assert_eq!(
        remaining(&url, &topic, &group, 0).await,
        Vec::<String>::new()
    );
}

/// Publishes are spread over several confirm channels (`publish_channels`);
/// messages with one key take one channel, so even publishes in flight
/// together reach the group in the order they were made (C5).
#[tokio::test]
async fn c5_one_key_keeps_its_order_across_publish_channels() {
    let Some(url) = url() else { return };
    let bus = bus(&format!("{url}?publish_channels=4")).await;
    let topic = unique("channels.");
    let mut sub = bus
        .subscribe(
            Subscription::new(topic.clone())
                .group(unique("channels-"))
                .prefetch(500),
        )
        .await
        .unwrap();
    let n = 300;
    let publishes = (0..n).map(|i| {
        let key = if i % 2 == 0 { "even" } else { "odd" };
        bus.publish(&topic, Message::new(i.to_string()).with_key(key))
    });
    for r in futures::future::join_all(publishes).await {
        r.unwrap();
    }
    let mut last = [None::<u32>; 2];
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("every message within 10 s")
            .unwrap()
            .unwrap();
        let i: u32 = std::str::from_utf8(d.message().payload())
            .unwrap()
            .parse()
            .unwrap();
        let slot = &mut last[(i % 2) as usize];
        assert!(slot.is_none_or(|prev| prev < i), "{i} after {slot:?}");
        *slot = Some(i);
        d.ack().await.unwrap();
    }
}
