//! [`Message`]: what is published and delivered, with its metadata (clause C13).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU64;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Kind, Result};

/// Message headers: string keys, string values, kept exactly as given.
pub type Headers = BTreeMap<String, String>;

pub use crate::names::header;

/// A message: an id, an optional key, headers, a payload, a content type and a
/// timestamp.
///
/// The payload is [`Bytes`], so cloning a message or fanning it out to several
/// groups never copies it. The timestamp has millisecond precision, the finest
/// every backend carries, so it round-trips unchanged.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    id: Id,
    // Boxed strings and the timestamp as milliseconds keep the message small:
    // queues hold it by value and it moves on every hop of the in-memory broker.
    key: Option<Box<str>>,
    headers: Headers,
    payload: Bytes,
    content_type: Option<Box<str>>,
    /// Milliseconds since the Unix epoch.
    timestamp: u64,
    /// Deliver no earlier than this, in milliseconds since the Unix epoch (C14);
    /// carried as [`header::DELIVER_AT`] once published.
    deliver_at: Option<NonZeroU64>,
}

/// Longest id kept inside the message: a hyphenated UUID, the id every message
/// gets by default.
const INLINE_ID: usize = 36;

/// A message id. Ids up to [`INLINE_ID`] bytes live inline, so a default id costs
/// no allocation on publish, nor on receipt where backends parse it back.
enum Id {
    Inline {
        len: u8,
        bytes: [u8; INLINE_ID],
    },
    Heap(Box<str>),
    /// The UUIDv7 of a new message, for the millisecond it was made in, drawn
    /// and rendered the first time anyone reads it (or the message is cloned,
    /// so a clone has the same id). A message no one asks the id of (the
    /// in-memory broker's hot path) never pays for the random bits and the
    /// rendering, which were a tenth of a publish.
    Lazy {
        millis: u64,
        text: OnceLock<[u8; INLINE_ID]>,
    },
}

impl Id {
    fn new(id: Cow<'_, str>) -> Self {
        if id.len() <= INLINE_ID {
            let mut bytes = [0; INLINE_ID];
            bytes[..id.len()].copy_from_slice(id.as_bytes());
            Id::Inline {
                len: id.len() as u8,
                bytes,
            }
        } else {
            Id::Heap(id.into_owned().into_boxed_str())
        }
    }

    fn lazy(millis: u64) -> Self {
        Id::Lazy {
            millis,
            text: OnceLock::new(),
        }
    }

    /// The id's length in bytes, without reading it as a `str`.
    fn len(&self) -> usize {
        match self {
            Id::Inline { len, .. } => usize::from(*len),
            Id::Heap(id) => id.len(),
            Id::Lazy { .. } => INLINE_ID,
        }
    }

    fn as_str(&self) -> &str {
        let inline = match self {
            Id::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Id::Heap(id) => return id,
            Id::Lazy { millis, text } => text.get_or_init(|| render_v7(*millis)),
        };
        // Only ever filled from a `&str` cut at its length, or a rendered UUID.
        std::str::from_utf8(inline).expect("inline id is UTF-8")
    }
}

impl Clone for Id {
    fn clone(&self) -> Self {
        match self {
            Id::Inline { len, bytes } => Id::Inline {
                len: *len,
                bytes: *bytes,
            },
            Id::Heap(id) => Id::Heap(id.clone()),
            // Drawn now, so the clone and the original share it.
            Id::Lazy { .. } => Id::new(Cow::Borrowed(self.as_str())),
        }
    }
}

/// A hyphenated UUIDv7 for `millis` since the epoch, its other 74 bits random.
fn render_v7(millis: u64) -> [u8; INLINE_ID] {
    let ts =
        uuid::Timestamp::from_unix_time(millis / 1000, (millis % 1000) as u32 * 1_000_000, 0, 0);
    let mut bytes = [0; INLINE_ID];
    uuid::Uuid::new_v7(ts).hyphenated().encode_lower(&mut bytes);
    bytes
}

impl PartialEq for Id {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Id {}

/// A new message's id and timestamp, from one read of the clock.
fn id_and_time() -> (Id, u64) {
    let millis = millis_since_epoch(SystemTime::now());
    (Id::lazy(millis), millis)
}

/// `t` in whole milliseconds since the Unix epoch; earlier times are the epoch.
pub(crate) fn millis_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Message {
    /// A message with `payload`, a fresh unique id (UUIDv7, so ids sort by the
    /// millisecond they were made in) and the current time.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        let (id, timestamp) = id_and_time();
        Message {
            id,
            key: None,
            headers: Headers::new(),
            payload: payload.into(),
            content_type: None,
            timestamp,
            deliver_at: None,
        }
    }

    /// See [`MessageExt::from_record`](crate::backend::MessageExt::from_record).
    pub(crate) fn empty_record(payload: Bytes) -> Self {
        Message {
            id: Id::new(Cow::Borrowed("")),
            key: None,
            headers: Headers::new(),
            payload,
            content_type: None,
            timestamp: 0,
            deliver_at: None,
        }
    }

    /// A message whose payload is `value` encoded with `codec`, and whose content type
    /// is the codec's.
    pub fn encode<C: Codec, T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        Ok(Message::new(C::encode(value)?).with_content_type(C::CONTENT_TYPE))
    }

    /// A message whose payload is `value` as JSON (`application/json`).
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        Self::encode::<JsonCodec, T>(value)
    }

    /// Decode the payload with `codec`.
    pub fn decode<C: Codec, T: DeserializeOwned>(&self) -> Result<T> {
        C::decode(&self.payload)
    }

    /// Decode the payload as JSON. A payload that is not valid JSON for `T` is a
    /// [`Kind::Decode`] error that says why.
    pub fn json_payload<T: DeserializeOwned>(&self) -> Result<T> {
        self.decode::<JsonCodec, T>()
    }

    /// Set the id. Ids are the caller's to keep unique.
    pub fn with_id<'a>(mut self, id: impl Into<Cow<'a, str>>) -> Self {
        self.id = Id::new(id.into());
        self
    }

    /// Set the key. Messages with the same key keep their order (C5); on Kafka the
    /// key picks the partition.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into().into_boxed_str());
        self
    }

    /// Add or replace a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Set the content type (a MIME type such as `application/json`).
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into().into_boxed_str());
        self
    }

    /// Set the timestamp; it is truncated to milliseconds.
    pub fn with_timestamp(mut self, timestamp: SystemTime) -> Self {
        self.timestamp = millis_since_epoch(timestamp);
        self
    }

    /// The id.
    pub fn id(&self) -> &str {
        self.id.as_str()
    }

    /// The id's length in bytes: for checks, which need not read it as text.
    pub(crate) fn id_len(&self) -> usize {
        self.id.len()
    }

    /// The key, if any.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// All headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Mutable access to the headers.
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }

    /// One header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Take the payload.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }

    /// The content type, if any.
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    /// The time the message was created (or set with [`with_timestamp`](Self::with_timestamp)).
    pub fn timestamp(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.timestamp)
    }

    /// The timestamp as milliseconds since the Unix epoch.
    pub fn timestamp_millis(&self) -> u64 {
        self.timestamp
    }

    /// Deliver no earlier than `at` (C14): every matching group receives the
    /// message at `at` or later, never before. At most
    /// [`MAX_SCHEDULE`] ahead of the publish;
    /// a time in the past delivers at once. Times are wall-clock times, so the
    /// clocks of publisher and consumer hosts should agree.
    pub fn deliver_at(mut self, at: SystemTime) -> Self {
        self.deliver_at = NonZeroU64::new(millis_since_epoch(at).max(1));
        self
    }

    /// Deliver no earlier than `delay` from now; see [`deliver_at`](Self::deliver_at).
    pub fn deliver_after(self, delay: Duration) -> Self {
        self.deliver_at(SystemTime::now() + delay)
    }

    /// When the message is to be delivered, if it is scheduled: as set with
    /// [`deliver_at`](Self::deliver_at), or, on a received message, as its
    /// [`header::DELIVER_AT`] says.
    pub fn scheduled_for(&self) -> Option<SystemTime> {
        let ms = match self.deliver_at {
            Some(ms) => ms.get(),
            None => self.header(header::DELIVER_AT)?.parse().ok()?,
        };
        Some(UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// See [`MessageExt::dead_lettered`](crate::backend::MessageExt::dead_lettered).
    pub(crate) fn dead_letter_copy(
        &self,
        topic: &str,
        attempts: u32,
        (reason, last_error): (&str, Option<&str>),
        group: &str,
    ) -> Message {
        let mut message = self.clone();
        let headers = message.headers_mut();
        headers.insert(header::DEAD_LETTER_REASON.into(), bounded(reason));
        match last_error {
            Some(e) => headers.insert(header::LAST_ERROR.into(), bounded(e)),
            // A dead letter dead-lettered again says only why this time.
            None => headers.remove(header::LAST_ERROR),
        };
        headers
            .entry(header::ORIGINAL_TOPIC.into())
            .or_insert_with(|| topic.to_owned());
        headers.insert(header::ATTEMPTS.into(), attempts.to_string());
        headers.insert(header::GROUP.into(), group.into());
        headers.insert(
            header::DEAD_LETTERED_AT.into(),
            millis_since_epoch(SystemTime::now()).to_string(),
        );
        message
    }

    /// Drop every header in the library's `polybus-` namespace. Publishing does
    /// this, so callers cannot forge attempts; then the schedule set with
    /// [`deliver_at`](Self::deliver_at) becomes its header.
    pub(crate) fn strip_library_headers(&mut self) {
        // Checked first so the common case (no such header) does not rebuild the map.
        if self.headers.keys().any(|k| header::is_reserved(k)) {
            self.headers.retain(|k, _| !header::is_reserved(k));
        }
        if let Some(at) = self.deliver_at.take() {
            self.headers
                .insert(header::DELIVER_AT.into(), at.get().to_string());
        }
    }

    /// How far past now the schedule set with [`deliver_at`](Self::deliver_at)
    /// lies, if it does.
    pub(crate) fn scheduled_ahead(&self) -> Option<Duration> {
        let at = self.deliver_at?.get();
        let now = millis_since_epoch(SystemTime::now());
        (at > now).then(|| Duration::from_millis(at - now))
    }

    /// How long from now until the message's schedule: `None` when it is not
    /// scheduled or is due. Asked of every received message, so it costs nothing
    /// for one without headers.
    pub(crate) fn not_due_for(&self) -> Option<Duration> {
        if self.headers.is_empty() {
            return None;
        }
        let at: u64 = self.headers.get(header::DELIVER_AT)?.parse().ok()?;
        let now = millis_since_epoch(SystemTime::now());
        (at > now).then(|| Duration::from_millis(at - now))
    }
}

/// How far ahead a message can be scheduled ([`Message::deliver_at`]): seven
/// days, the longest retry delay, whose mechanism holds scheduled messages.
pub const MAX_SCHEDULE: Duration = crate::retry::MAX_DELAY;

/// The longest reason or last error a dead letter carries: an error that quotes
/// a whole response body must not make the dead letter too large to publish
/// (AMQP headers share one frame), or it would be requeued forever (C8).
pub(crate) const MAX_REASON: usize = 4096;

fn bounded(text: &str) -> String {
    if text.len() <= MAX_REASON {
        return text.to_owned();
    }
    format!(
        "{}…",
        &text[..text.floor_char_boundary(MAX_REASON - '…'.len_utf8())]
    )
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id.as_str())
            .field("key", &self.key)
            .field("headers", &self.headers)
            .field("payload_len", &self.payload.len())
            .field("content_type", &self.content_type)
            .field("timestamp_millis", &self.timestamp_millis())
            .finish()
    }
}

/// A serde format for payloads.
pub trait Codec {
    /// The content type the codec writes and reads.
    const CONTENT_TYPE: &'static str;
    /// Encode a value.
    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes>;
    /// Decode a value; failures are [`Kind::Decode`] errors.
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T>;
}

/// JSON through `serde_json`, as a [`Codec`] (`Message::encode::<JsonCodec, _>`;
/// [`Message::json`] is the shorthand). A handler that takes JSON uses the
/// extractor [`Json`](crate::Json) instead.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    const CONTENT_TYPE: &'static str = "application/json";

    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes> {
        serde_json::to_vec(value).map(Bytes::from).map_err(|e| {
            Error::new(Kind::Encode, format!("cannot encode json: {e}")).with_source(e)
        })
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes).map_err(|e| {
            Error::new(
                Kind::Decode,
                format!("cannot decode json as {}: {e}", std::any::type_name::<T>()),
            )
            .with_source(e)
        })
    }
}

/// MessagePack through `rmp-serde` (feature `msgpack`): compact and binary.
/// Structs are written as maps with field names, so other MessagePack clients
/// read them without knowing the field order.
#[cfg(feature = "msgpack")]
#[derive(Debug, Clone, Copy, Default)]
pub struct MsgPack;

#[cfg(feature = "msgpack")]
impl Codec for MsgPack {
    const CONTENT_TYPE: &'static str = "application/msgpack";

    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes> {
        rmp_serde::to_vec_named(value)
            .map(Bytes::from)
            .map_err(|e| {
                Error::new(Kind::Encode, format!("cannot encode msgpack: {e}")).with_source(e)
            })
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
        rmp_serde::from_slice(bytes).map_err(|e| {
            Error::new(
                Kind::Decode,
                format!(
                    "cannot decode msgpack as {}: {e}",
                    std::any::type_name::<T>()
                ),
            )
            .with_source(e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct User {
        id: String,
    }

    #[test]
    fn ids_are_unique_and_timestamps_are_millis() {
        let a = Message::new("x");
        let b = Message::new("x");
        assert_ne!(a.id(), b.id());
        let nanos = a
            .timestamp()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        assert_eq!(nanos % 1_000_000, 0);
    }

    #[test]
    fn ids_of_any_length_round_trip_and_compare_by_text() {
        let generated = Message::new("x");
        assert_eq!(generated.id().len(), 36);
        assert!(uuid::Uuid::parse_str(generated.id()).is_ok());
        let long = "é".repeat(40);
        for id in [
            "",
            "a",
            "ü-36-bytes-of-text-just-at-the-limi",
            long.as_str(),
        ] {
            let m = Message::new("x").with_id(id);
            assert_eq!(m.id(), id);
            let owned: String = id.into();
            assert_eq!(m, m.clone().with_id(owned));
        }
        let m = Message::new("x");
        assert_ne!(m.clone().with_id("a"), m.with_id("b"));
    }

    #[test]
    fn json_round_trips_and_bad_json_is_a_decode_error() {
        let m = Message::json(&User { id: "u1".into() }).unwrap();
        assert_eq!(m.content_type(), Some("application/json"));
        assert_eq!(m.json_payload::<User>().unwrap(), User { id: "u1".into() });
        let e = Message::new("not json").json_payload::<User>().unwrap_err();
        assert!(e.is_decode());
        assert!(e.to_string().starts_with("cannot decode json as"), "{e}");
    }

    #[cfg(feature = "msgpack")]
    #[test]
    fn msgpack_round_trips_and_garbage_is_a_decode_error() {
        let m = Message::encode::<MsgPack, _>(&User { id: "u1".into() }).unwrap();
        assert_eq!(m.content_type(), Some("application/msgpack"));
        assert_eq!(
            m.decode::<MsgPack, User>().unwrap(),
            User { id: "u1".into() }
        );
        let e = Message::new(vec![0xc1u8])
            .decode::<MsgPack, User>()
            .unwrap_err();
        assert!(e.is_decode(), "{e}");
        assert!(e.to_string().starts_with("cannot decode msgpack as"), "{e}");
    }

    #[test]
    fn a_dead_letter_keeps_its_first_original_topic() {
        let once = Message::new("x").dead_letter_copy("user.created", 3, ("bad", None), "billing");
        assert_eq!(once.header(header::ORIGINAL_TOPIC), Some("user.created"));
        assert_eq!(once.header(header::ATTEMPTS), Some("3"));
        let twice = once.dead_letter_copy(
            "polybus.dead-letter.billing",
            1,
            ("worse", Some("boom")),
            "dlq",
        );
        assert_eq!(twice.header(header::ORIGINAL_TOPIC), Some("user.created"));
        assert_eq!(twice.header(header::DEAD_LETTER_REASON), Some("worse"));
        assert_eq!(once.header(header::LAST_ERROR), None);
        assert_eq!(twice.header(header::LAST_ERROR), Some("boom"));
        let long = "é".repeat(MAX_REASON);
        let bounded = Message::new("x").dead_letter_copy("a", 1, (&long, Some(&long)), "g");
        for name in [header::DEAD_LETTER_REASON, header::LAST_ERROR] {
            let kept = bounded.header(name).unwrap();
            assert!(
                kept.len() <= MAX_REASON && kept.ends_with('…'),
                "{name}: {}",
                kept.len()
            );
        }
        assert_eq!(twice.header(header::GROUP), Some("dlq"));
    }

    #[test]
    fn strip_removes_only_library_headers() {
        let mut m = Message::new("x")
            .with_header("polybus-attempt", "9")
            .with_header("trace", "t");
        m.strip_library_headers();
        assert_eq!(m.headers().len(), 1);
        assert_eq!(m.header("trace"), Some("t"));
    }
}
