//! One live connection per bus, shared by its publisher and subscriptions:
//! failover across broker addresses, reconnection with backoff (C11), the
//! confirm-mode publish path (C4), and topology declarations.

use std::collections::HashSet;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::task::Poll;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::{
    Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind, PublisherConfirm,
};
use polybus_core::backend::{Failure, ValidSubscription};
use polybus_core::names::retry_store;
use polybus_core::{Error, Kind, Message, Result};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::mapping;
use crate::options::{AmqpOptions, redact};

/// How long an unused private queue outlives its subscriber (for example across
/// a reconnect) before the broker deletes it.
const PRIVATE_QUEUE_EXPIRES_MS: i64 = 60_000;

pub(crate) struct Connector {
    pub(crate) options: AmqpOptions,
    live: Mutex<Option<Arc<Live>>>,
}

pub(crate) struct Live {
    pub(crate) conn: Connection,
    /// The confirm channels publishes are spread over (`publish_channels`).
    /// RabbitMQ runs each channel in one process of its own, so concurrent
    /// publishers on one channel queue behind each other on the broker.
    publishers: Vec<Publisher>,
    /// The next channel for a message without a key.
    next: AtomicUsize,
    /// Retry queues already declared on this connection.
    declared: StdMutex<HashSet<String>>,
}

/// Publishes of a batch queued before their writes are awaited together
/// ([`crate::in_order::in_order`] polls every pending one on each wake, so the
/// chunk bounds that work). Chunks of 30, the most `join_all` keeps in order,
/// cost the broker more CPU a message and the bench a sixth of its rate
/// (benches/NOTES.md, "RabbitMQ publishing beside the peers").
const WRITE_CHUNK: usize = 256;

/// One confirm channel of the publish pool.
struct Publisher {
    channel: Channel,
    /// lapin numbers confirms and queues frames under different locks, so two
    /// `basic_publish` calls at once on one channel could mismatch confirms.
    /// Held only for the call's first poll, which does both (see [`Publisher::write`]).
    lock: StdMutex<()>,
}

impl Publisher {
    /// `basic_publish`, resolved once the frames are written. lapin registers
    /// the confirm and queues the frames in the call's first poll, then waits
    /// for its I/O thread to write them; only that first poll is serialized, so
    /// concurrent publishes wait for the write together, not in turn (holding
    /// the lock across the write added a thread round trip per publish to every
    /// publish queued behind it: +0.4 to 0.7 ms at p50 at 10 k msg/s).
    async fn write(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        message: &Message,
        extra: &[(&str, String)],
    ) -> lapin::Result<PublisherConfirm> {
        let mut publish = std::pin::pin!(self.channel.basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            },
            message.payload(),
            mapping::properties(message, extra),
        ));
        let first = std::future::poll_fn(|cx| {
            let _queueing = polybus_core::backend::lock(&self.lock);
            Poll::Ready(publish.as_mut().poll(cx))
        })
        .await;
        match first {
            Poll::Ready(sent) => sent,
            Poll::Pending => publish.await,
        }
    }
}

impl Live {
    /// The channel for `message`: by its key, so messages with the same key
    /// keep their order (C5) even when published concurrently; otherwise in turn.
    fn publisher(&self, message: &Message) -> &Publisher {
        let n = self.publishers.len();
        let i = match message.key() {
            _ if n == 1 => 0,
            Some(key) => {
                // A fixed hasher: the same key takes the same channel for the
                // life of the connection.
                let mut h = std::hash::DefaultHasher::new();
                key.hash(&mut h);
                (h.finish() % n as u64) as usize
            }
            None => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        &self.publishers[i]
    }

    fn healthy(&self) -> bool {
        self.conn.status().connected()
            && self
                .publishers
                .iter()
                .all(|p| p.channel.status().connected())
    }
}

/// Translate a lapin error into a polybus error, naming what failed.
pub(crate) fn map_err(e: lapin::Error, what: &str) -> Error {
    use lapin::ErrorKind as L;
    let kind = match e.kind() {
        L::IOError(_) | L::MissingHeartbeatError | L::RuntimeShutdownError(_) => Kind::Connection,
        L::InvalidChannelState(..) | L::InvalidConnectionState(_) | L::InvalidChannel(_) => {
            Kind::Connection
        }
        L::ProtocolError(p) => match p.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => Kind::Authentication,
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => Kind::Authentication,
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED) => Kind::Connection,
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => Kind::Refused,
            _ => Kind::Refused,
        },
        _ => Kind::Other,
    };
    let detail = match e.kind() {
        L::ProtocolError(p) => p.get_message().as_str().to_owned(),
        _ => e.to_string(),
    };
    Error::new(kind, format!("{what}: {detail}")).with_source(e)
}

pub(crate) fn reconnect_backoff() -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

impl Connector {
    /// Connect once to the first broker that answers; fail fast otherwise (C12).
    pub(crate) async fn connect(options: AmqpOptions) -> Result<Arc<Self>> {
        options.validate()?;
        let connector = Arc::new(Connector {
            options,
            live: Mutex::new(None),
        });
        let live = connector.open().await?;
        *connector.live.lock().await = Some(Arc::new(live));
        Ok(connector)
    }

    /// Try each broker address once.
    async fn open(&self) -> Result<Live> {
        let mut last = None;
        for uri in &self.options.uris {
            match self.open_one(uri).await {
                Ok(live) => return Ok(live),
                Err(e) => {
                    tracing::warn!(broker = %redact(uri), error = %e, "amqp connection failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::invalid_input("no broker address given")))
    }

    async fn open_one(&self, uri: &str) -> Result<Live> {
        let shown = redact(uri);
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.options.tls_ca_pem.clone(),
        };
        let runtime = lapin::runtime::default_runtime()
            .map_err(|e| map_err(e, "cannot use the tokio runtime for amqp"))?;
        let props = ConnectionProperties::default().with_connection_name("polybus".into());
        let connect = Connection::connect_uri_with_config(lapin_uri(uri)?, props, tls, runtime);
        let conn = match tokio::time::timeout(self.options.connect_timeout, connect).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(map_err(e, &format!("cannot connect to {shown}"))),
            Err(_) => {
                return Err(Error::new(
                    Kind::Timeout,
                    format!(
                        "cannot connect to {shown}: no answer within {:?}",
                        self.options.connect_timeout
                    ),
                ));
            }
        };
        let mut publishers = Vec::with_capacity(self.options.publish_channels);
        for _ in 0..self.options.publish_channels {
            let channel = conn
                .create_channel()
                .await
                .map_err(|e| map_err(e, "cannot open a publish channel"))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| map_err(e, "cannot enable publisher confirms"))?;
            publishers.push(Publisher {
                channel,
                lock: StdMutex::new(()),
            });
        }
        declare_exchange(&publishers[0].channel, &self.options.exchange).await?;
        tracing::info!(broker = %shown, "amqp connected");
        Ok(Live {
            conn,
            publishers,
            next: AtomicUsize::new(0),
            declared: StdMutex::new(HashSet::new()),
        })
    }

    /// A deadline `timeout` from now that cannot overflow.
    pub(crate) fn deadline_in(timeout: Duration) -> Instant {
        polybus_core::retry::deadline_after(timeout)
    }

    /// The live connection, reconnecting with backoff if it was lost. Every
    /// caller waits at most until its own `deadline`, whether for the lock (held
    /// by whoever is reconnecting) or for the reconnection itself.
    pub(crate) async fn live(&self, deadline: Instant) -> Result<Arc<Live>> {
        let unreachable = |last: Option<&Error>| {
            let last = last
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default();
            Error::new(
                Kind::Connection,
                format!("no broker reachable in time{last}"),
            )
        };
        let Ok(mut slot) = tokio::time::timeout_at(deadline, self.live.lock()).await else {
            return Err(unreachable(None));
        };
        if let Some(live) = slot.as_ref()
            && live.healthy()
        {
            return Ok(live.clone());
        }
        // A connection made before and lost: this is a reconnect.
        let lost = slot.is_some();
        let mut backoff = reconnect_backoff();
        loop {
            let e = match tokio::time::timeout_at(deadline, self.open()).await {
                Ok(Ok(live)) => {
                    let live = Arc::new(live);
                    *slot = Some(live.clone());
                    if lost {
                        polybus_core::backend::record_reconnect(&crate::endpoint(&self.options));
                    }
                    return Ok(live);
                }
                Ok(Err(e)) => e,
                Err(_) => return Err(unreachable(None)),
            };
            let wait = backoff.next().unwrap_or(Duration::from_secs(5));
            if Instant::now() + wait >= deadline {
                return Err(unreachable(Some(&e)));
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Publish with a confirm. A publish that
    /// cannot be written because the connection is down waits for a reconnect
    /// (up to the publish time-out); one whose confirm is lost or late is not
    /// retried, since the broker may have it: the caller hears `maybe_delivered`.
    ///
    /// `mandatory` is for the library's own republishes to a named queue: if the
    /// queue is gone the broker returns the message, and that is a failure, not
    /// a silent loss. (Returns are matched by message id, since lapin may attach
    /// a return to another publish's confirm.)
    ///
    /// The properties are built from `message` and `extra` library headers for
    /// each attempt, so the first attempt copies nothing.
    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Message,
        extra: &[(&str, String)],
        mandatory: bool,
    ) -> std::result::Result<(), Failure> {
        let deadline = Self::deadline_in(self.options.publish_timeout);
        self.publish_until(deadline, exchange, routing_key, message, extra, mandatory)
            .await
    }

    /// [`publish`](Self::publish), bounded by a `deadline` the caller may share
    /// with other publishes (a batch has one time-out, not one per message).
    async fn publish_until(
        &self,
        deadline: Instant,
        exchange: &str,
        routing_key: &str,
        message: &Message,
        extra: &[(&str, String)],
        mandatory: bool,
    ) -> std::result::Result<(), Failure> {
        loop {
            let live = self.live(deadline).await.map_err(Failure::not_delivered)?;
            let sent = live
                .publisher(message)
                .write(exchange, routing_key, mandatory, message, extra)
                .await;
            let confirm = match sent {
                Ok(confirm) => confirm,
                // Not written: safe to try again on a new connection.
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "publish not written; reconnecting");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(Failure::not_delivered(map_err(e, "cannot publish"))),
            };
            let confirmed = tokio::time::timeout_at(deadline, confirm).await;
            return Self::outcome(confirmed, mandatory, message.id(), routing_key);
        }
    }

    /// Publish a batch to one routing key: every message written in turn, then
    /// every confirm awaited at once, as a raw client pipelines. What cannot be
    /// written (a lost connection) is published again after a reconnect, all
    /// within the batch's one time-out.
    pub(crate) async fn publish_many(
        &self,
        exchange: &str,
        routing_key: &str,
        messages: &[&Message],
    ) -> Vec<std::result::Result<(), Failure>> {
        let deadline = Self::deadline_in(self.options.publish_timeout);
        let mut confirms = Vec::with_capacity(messages.len());
        if let Ok(live) = self.live(deadline).await
            && let Some(first) = messages.first()
        {
            // One channel for the whole batch, so it keeps its order.
            let publisher = live.publisher(first);
            // A chunk's publishes are queued in order by their first polls, then
            // their writes are awaited together: awaiting each write before
            // queueing the next costs the batch one wake-up of lapin's I/O thread
            // per message, and the broker a read per frame (benches/NOTES.md
            // has what it measured).
            'chunks: for chunk in messages.chunks(WRITE_CHUNK) {
                let writes = chunk
                    .iter()
                    .map(|message| publisher.write(exchange, routing_key, false, message, &[]));
                for written in crate::in_order::in_order(writes).await {
                    match written {
                        Ok(confirm) => confirms.push(confirm),
                        // What follows a failed write is published again after
                        // a reconnect; a later one written anyway may arrive twice,
                        // which at-least-once allows.
                        Err(_) => break 'chunks,
                    }
                }
            }
        }
        let written = confirms.len();
        let awaited = futures::future::join_all(confirms.into_iter().zip(messages).map(
            |(confirm, message)| async move {
                let confirmed = tokio::time::timeout_at(deadline, confirm).await;
                Self::outcome(confirmed, false, message.id(), routing_key)
            },
        ));
        let rest = futures::future::join_all(messages[written..].iter().map(|message| {
            self.publish_until(deadline, exchange, routing_key, message, &[], false)
        }));
        let (mut results, rest) = tokio::join!(awaited, rest);
        results.extend(rest);
        results
    }

    /// What a confirm (or its time-out) means for the publish.
    fn outcome(
        confirmed: std::result::Result<lapin::Result<Confirmation>, tokio::time::error::Elapsed>,
        mandatory: bool,
        id: &str,
        routing_key: &str,
    ) -> std::result::Result<(), Failure> {
        let confirmed = match confirmed {
            Ok(c) => c,
            Err(_) => {
                return Err(Failure::maybe_delivered(Error::new(
                    Kind::Timeout,
                    "no confirm from the broker in time",
                )));
            }
        };
        match confirmed {
            Ok(Confirmation::Ack(Some(returned)))
                if mandatory
                    && returned
                        .delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .is_some_and(|returned| returned.as_str() == id) =>
            {
                Err(Failure::not_delivered(Error::new(
                    Kind::Refused,
                    format!("the broker returned the message: no queue `{routing_key}`"),
                )))
            }
            Ok(Confirmation::Ack(_)) => Ok(()),
            Ok(Confirmation::Nack(_)) => Err(Failure::not_delivered(Error::new(
                Kind::Refused,
                "the broker refused the message (publisher nack)",
            ))),
            Ok(Confirmation::NotRequested) => Err(Failure::maybe_delivered(Error::new(
                Kind::Other,
                "no confirm was requested; this is a polybus bug",
            ))),
            Err(e) => Err(Failure::maybe_delivered(map_err(e, "the confirm was lost"))),
        }
    }

    /// Declare the retry queue holding messages of `group` for `delay_ms`:
    /// messages expire from it back into the group's queue. A durable group's is
    /// declared once per connection. A private group's expires when unused, and
    /// publishing does not count as use, so it is declared again each time.
    pub(crate) async fn retry_queue(
        &self,
        group: &str,
        durable: bool,
        delay_ms: u64,
    ) -> Result<String> {
        let name = retry_queue_name(group, delay_ms);
        let live = self
            .live(Self::deadline_in(self.options.publish_timeout))
            .await?;
        if durable && polybus_core::backend::lock(&live.declared).contains(&name) {
            return Ok(name);
        }
        let channel = live
            .conn
            .create_channel()
            .await
            .map_err(|e| map_err(e, "cannot open a channel"))?;
        let mut args = FieldTable::default();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(delay_ms as i64),
        );
        args.insert("x-dead-letter-exchange".into(), long(""));
        args.insert("x-dead-letter-routing-key".into(), long(group));
        if !durable {
            args.insert(
                "x-expires".into(),
                AMQPValue::LongLongInt(delay_ms as i64 + PRIVATE_QUEUE_EXPIRES_MS),
            );
        }
        let options = QueueDeclareOptions {
            durable,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(name.as_str().into(), options, args)
            .await
            .map_err(|e| map_err(e, &format!("cannot declare retry queue `{name}`")))?;
        let _ = channel.close(200, "declared".into()).await;
        polybus_core::backend::lock(&live.declared).insert(name.clone());
        Ok(name)
    }
}

/// `polybus.retry.<group>.<ms>ms`, or for groups too long for AMQP's 255-byte
/// names, the group's first 200 bytes and a stable hash of the whole (FNV-1a:
/// the name must be the same in every process and Rust version).
pub(crate) fn retry_queue_name(group: &str, delay_ms: u64) -> String {
    let name = format!("{}.{delay_ms}ms", retry_store(group));
    if name.len() <= 255 {
        return name;
    }
    let hash = group.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    // Group names are ASCII, so any byte index is a char boundary.
    format!("{}.{hash:016x}.{delay_ms}ms", retry_store(&group[..200]))
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.as_bytes().to_vec().into())
}

async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| map_err(e, &format!("cannot declare exchange `{exchange}`")))
}

/// Declare a group's queue bound to `patterns`. A durable group is a quorum queue
/// (it counts returned deliveries, so crash loops end in the dead letter, C8); a
/// private group is a classic queue that expires a minute after its subscriber
/// is gone.
pub(crate) async fn declare_group(
    channel: &Channel,
    exchange: &str,
    group: &str,
    durable: bool,
    patterns: &[&str],
) -> Result<()> {
    let mut args = FieldTable::default();
    if durable {
        args.insert("x-queue-type".into(), long("quorum"));
    } else {
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(PRIVATE_QUEUE_EXPIRES_MS),
        );
    }
    let options = QueueDeclareOptions {
        durable,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(group.into(), options, args)
        .await
        .map_err(|e| map_err(e, &format!("cannot declare the queue of group `{group}`")))?;
    for pattern in patterns {
        channel
            .queue_bind(
                group.into(),
                exchange.into(),
                (*pattern).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| map_err(e, &format!("cannot bind group `{group}` to `{pattern}`")))?;
    }
    Ok(())
}

/// Declare everything a subscription needs: the exchange, its group's queue and
/// bindings, and the dead-letter store (a durable group of the dead-letter
/// topic's name, so dead letters are kept until read).
pub(crate) async fn declare_subscription(
    channel: &Channel,
    exchange: &str,
    sub: &ValidSubscription,
) -> Result<()> {
    declare_exchange(channel, exchange).await?;
    let patterns: Vec<&str> = sub.patterns.iter().map(|p| p.as_str()).collect();
    declare_group(channel, exchange, &sub.group, sub.durable, &patterns).await?;
    // Dead letters are published straight to this queue, so it needs no binding.
    declare_group(channel, exchange, sub.dead_letter_topic.as_str(), true, &[]).await?;
    Ok(())
}

/// `uri` as lapin's `AMQPUri`. lapin's parser takes the host from
/// `Url::domain()`, which is `None` for an IPv6 address, and then falls back to
/// `localhost`, so `amqp://[fd00::5]` would quietly connect to this machine: the
/// host is set from our own parse. (An IPv4 address is an opaque host under the
/// non-special `amqp` scheme, and parses fine.)
fn lapin_uri(uri: &str) -> Result<AMQPUri> {
    // Its parse error may quote the URI, password and all: not passed on.
    let mut parsed: AMQPUri = uri
        .parse()
        .map_err(|_: String| Error::invalid_input(format!("invalid amqp url {}", redact(uri))))?;
    if let Ok(url) = url::Url::parse(uri)
        && let Some(url::Host::Ipv6(ip)) = url.host()
    {
        parsed.authority.host = ip.to_string();
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_queue_names_fit_amqp_short_strings() {
        assert_eq!(
            retry_queue_name("billing", 125),
            "polybus.retry.billing.125ms"
        );
        let long = format!(
            "polybus.dead-letter.polybus.dead-letter.{}",
            "g".repeat(200)
        );
        let a = retry_queue_name(&long, 7_000_000_000);
        assert!(a.len() <= 255, "{}", a.len());
        assert_eq!(a, retry_queue_name(&long, 7_000_000_000), "stable");
        let other = format!("{}h", &long[..long.len() - 1]);
        assert_ne!(a, retry_queue_name(&other, 7_000_000_000));
    }
}
