//! The bus's producer and admin client: configuration, the bounded connect probe,
//! topics made on demand, and publishing with its error mapping.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus_core::backend::Failure;
use polybus_core::backend::url::{redact, scrub};
use polybus_core::{Error, Kind, Message, Receipt, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::mapping;
use crate::options::KafkaOptions;

pub(crate) struct Connector {
    pub(crate) options: KafkaOptions,
    pub(crate) producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// Topics known to exist, so each is looked up or created once per bus.
    known: Mutex<HashSet<String>>,
}

impl Connector {
    /// The settings every client of this bus shares: brokers and the escape hatch.
    pub(crate) fn config(options: &KafkaOptions, own: &[(&str, String)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &options.brokers);
        // librdkafka logs every refused connection at error level; the typed
        // errors polybus returns say the same once.
        config.set("log_level", "3");
        // librdkafka 2.12 times out a record waiting in a broker's transmit
        // queue only when that broker's thread wakes, and while the broker is
        // down that is the next reconnect attempt (its back-off grows to
        // `reconnect.backoff.max.ms`, 10 s by default). A 1 s cap, the Java
        // client's default, keeps a publish's failure within a second of
        // `publish_timeout` and lets every client notice a returned broker
        // within a second (C11, C12; mock.rs has the test).
        config.set("reconnect.backoff.max.ms", "1000");
        for (k, v) in own {
            config.set(*k, v);
        }
        for (k, v) in options.security.settings() {
            config.set(k, v);
        }
        for (k, v) in &options.native {
            config.set(k, v);
        }
        config
    }

    /// Make the producer and admin client, then ask the cluster for its metadata:
    /// librdkafka retries an unreachable broker forever, so this probe is what
    /// makes `connect` fail within `connect_timeout`.
    pub(crate) async fn connect(options: KafkaOptions) -> Result<Arc<Self>> {
        let producer_config = Self::config(
            &options,
            &[
                ("acks", "all".into()),
                ("enable.idempotence", "true".into()),
                ("compression.type", options.compression.as_str().into()),
                ("linger.ms", options.linger.as_millis().to_string()),
                (
                    "message.timeout.ms",
                    options.publish_timeout.as_millis().to_string(),
                ),
                // Room for the largest payload plus its key and headers.
                (
                    "message.max.bytes",
                    (options.max_payload + 64 * 1024)
                        .min(1_000_000_000)
                        .to_string(),
                ),
            ],
        );
        let producer: FutureProducer = producer_config
            .create()
            .map_err(|e| config_error(e, &options))?;
        let admin: AdminClient<DefaultClientContext> = Self::config(&options, &[])
            .create()
            .map_err(|e| config_error(e, &options))?;
        let probe_config = Self::config(&options, &[]);
        let (timeout, brokers) = (options.connect_timeout, redact(&options.brokers));
        let secrets: Vec<String> = options.secrets().into_iter().map(str::to_owned).collect();
        tokio::task::spawn_blocking(move || probe(&probe_config, timeout, &brokers, &secrets))
            .await
            .map_err(|e| Error::new(Kind::Other, format!("metadata probe panicked: {e}")))??;
        Ok(Arc::new(Connector {
            options,
            producer,
            admin,
            known: Mutex::new(HashSet::new()),
        }))
    }

    /// Make sure `topic` exists: create it (a topic made concurrently by someone
    /// else is fine), or, with `create_topics` off, look it up and refuse a
    /// missing one.
    pub(crate) async fn ensure_topic(&self, topic: &str) -> Result<()> {
        if polybus_core::backend::lock(&self.known).contains(topic) {
            return Ok(());
        }
        if self.options.create_topics {
            self.create_topic(topic).await?;
        } else {
            self.require_topic(topic).await?;
        }
        polybus_core::backend::lock(&self.known).insert(topic.to_owned());
        Ok(())
    }

    /// Create `topic`; one that already exists is fine.
    async fn create_topic(&self, topic: &str) -> Result<()> {
        let new = NewTopic::new(
            topic,
            self.options.partitions,
            TopicReplication::Fixed(self.options.replication.into()),
        );
        let admin_options =
            AdminOptions::new().operation_timeout(Some(self.options.connect_timeout));
        let results = tokio::time::timeout(
            self.options.connect_timeout,
            self.admin.create_topics([&new], &admin_options),
        )
        .await
        .map_err(|_| {
            Error::new(
                Kind::Timeout,
                format!(
                    "creating topic `{topic}` took longer than {} ms",
                    self.options.connect_timeout.as_millis()
                ),
            )
        })?
        .map_err(|e| kafka_error(format!("cannot create topic `{topic}`"), e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(Error::new(
                        Kind::Refused,
                        format!("the broker refused to create topic `{topic}`: {code}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Look `topic` up, and refuse it if it is missing (`create_topics` off).
    async fn require_topic(&self, topic: &str) -> Result<()> {
        let client = self.producer.clone();
        let name = topic.to_owned();
        let timeout = self.options.connect_timeout;
        let metadata = tokio::task::spawn_blocking(move || {
            client.client().fetch_metadata(Some(&name), timeout)
        })
        .await
        .map_err(|e| Error::new(Kind::Other, format!("metadata lookup panicked: {e}")))?
        .map_err(|e| kafka_error(format!("cannot look up topic `{topic}`"), e))?;
        let exists = metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
        if !exists {
            return Err(Error::new(
                Kind::Refused,
                format!(
                    "topic `{topic}` does not exist, and this bus does not create topics \
                     (create_topics=false): create it first"
                ),
            ));
        }
        Ok(())
    }

    /// Produce `message` to `topic` and wait for its delivery report.
    pub(crate) async fn produce(
        &self,
        topic: &str,
        message: &Message,
        extra: &[(&str, String)],
    ) -> std::result::Result<Receipt, Failure> {
        self.ensure_topic(topic)
            .await
            .map_err(Failure::not_delivered)?;
        match self
            .producer
            .send(record(topic, message, extra), self.options.publish_timeout)
            .await
        {
            Ok(d) => Ok(Receipt::at(Some(d.partition), Some(d.offset))),
            Err((e, _)) => Err(publish_error(topic, e)),
        }
    }

    /// Enqueue `message` for `topic` (which must be known to exist) without an
    /// async runtime: the returned future resolves on the delivery report.
    pub(crate) fn send_now(
        &self,
        topic: &str,
        message: &Message,
        extra: &[(&str, String)],
    ) -> std::result::Result<DeliveryFuture, KafkaError> {
        self.producer
            .send_result(record(topic, message, extra))
            .map_err(|(e, _)| e)
    }

    /// Wait for every produced record's delivery report.
    pub(crate) async fn flush(&self, timeout: Duration) -> Result<()> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| Error::new(Kind::Other, format!("flush panicked: {e}")))?
            .map_err(|e| kafka_error("flushing the producer".into(), e))
    }
}

/// `message` as a record for `topic`, with `extra` library headers.
fn record<'a>(
    topic: &'a str,
    message: &'a Message,
    extra: &[(&str, String)],
) -> FutureRecord<'a, str, [u8]> {
    let record = FutureRecord::to(topic)
        .payload(message.payload().as_ref())
        .headers(mapping::headers(message, extra))
        .timestamp(i64::try_from(message.timestamp_millis()).unwrap_or(i64::MAX));
    match message.key() {
        Some(key) => record.key(key),
        None => record,
    }
}

/// Ask the cluster for its metadata until `timeout`: librdkafka retries an
/// unreachable broker forever, so this is what makes `connect` fail in time.
/// A client whose SASL login the broker refused never gets an answer either;
/// librdkafka reports the refusal as an error event, which the probe's own
/// client serves between attempts, so that case is an `Authentication` error.
fn probe(
    config: &ClientConfig,
    timeout: Duration,
    brokers: &str,
    secrets: &[String],
) -> Result<()> {
    let client: BaseProducer<AuthWatch> = config
        .create_with_context(AuthWatch::default())
        .map_err(|e| {
            let text = scrub(&e.to_string(), secrets);
            Error::new(
                Kind::InvalidInput,
                format!("invalid kafka settings: {text}"),
            )
        })?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let attempt = client
            .client()
            .fetch_metadata(None, left.min(Duration::from_millis(500)));
        client.poll(Duration::ZERO);
        if let Some(reason) = polybus_core::backend::lock(&client.context().0).take() {
            return Err(Error::new(
                Kind::Authentication,
                format!(
                    "kafka at {brokers} refused the SASL login: {}",
                    scrub(&reason, secrets)
                ),
            ));
        }
        match attempt {
            Ok(_) => return Ok(()),
            Err(e) if left.is_zero() => {
                return Err(Error::new(
                    Kind::Connection,
                    format!(
                        "cannot reach kafka at {brokers} within {} ms: {e}",
                        timeout.as_millis()
                    ),
                )
                .with_source(e));
            }
            // Not answered yet: librdkafka keeps trying the brokers.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

// The probe produces nothing: no delivery reports to handle.
impl rdkafka::producer::ProducerContext for AuthWatch {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, (): ()) {}
}

/// The probe's client context: keeps librdkafka's report of a refused login.
#[derive(Default)]
struct AuthWatch(Mutex<Option<String>>);

impl ClientContext for AuthWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        let refused = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed)
        );
        if refused {
            *polybus_core::backend::lock(&self.0) = Some(reason.to_owned());
        } else {
            tracing::debug!(%error, reason, "kafka connect probe");
        }
    }
}

/// A configuration librdkafka refused. Its message may echo a setting's value,
/// so secret values are scrubbed from it, and the cause is kept only if it shows
/// none of them.
pub(crate) fn config_error(e: KafkaError, options: &KafkaOptions) -> Error {
    let secrets = options.secrets();
    let (text, debug) = (e.to_string(), format!("{e:?}"));
    let shown = scrub(&text, &secrets);
    let error = Error::invalid_input(format!("invalid kafka client configuration: {shown}"));
    if shown == text && scrub(&debug, &secrets) == debug {
        error.with_source(e)
    } else {
        error
    }
}

/// A librdkafka error as a typed error, `what` saying what was being done.
pub(crate) fn kafka_error(what: String, e: KafkaError) -> Error {
    let kind = match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::RequestTimedOut,
        ) => Kind::Timeout,
        Some(
            RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::NetworkException
            | RDKafkaErrorCode::Resolve,
        ) => Kind::Connection,
        Some(
            RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed,
        ) => Kind::Authentication,
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
            Kind::PayloadTooLarge
        }
        Some(_) => Kind::Refused,
        None => Kind::Other,
    };
    Error::new(kind, format!("{what}: {e}")).with_source(e)
}

/// A failed delivery report: typed, and whether the record may be on the broker.
/// Only a refusal before or by the leader is certain not to be written.
fn publish_error(topic: &str, e: KafkaError) -> Failure {
    let certain_not_written = matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::QueueFull
                | RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::Fatal
        )
    );
    let error = kafka_error(format!("publishing to `{topic}`"), e);
    if certain_not_written {
        Failure::not_delivered(error)
    } else {
        Failure::maybe_delivered(error)
    }
}
