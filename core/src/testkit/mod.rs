//! The conformance suite: one case per behaviour of the delivery contract, run
//! against any backend.
//!
//! A backend's test file names a [`Target`] (how to connect to the broker under
//! test) and expands [`conformance_suite!`](crate::conformance_suite), which makes
//! one `#[tokio::test]` per case of [`cases::CASES`], named `<backend>::<case>`,
//! so each case is reported and filterable on its own:
//!
//! ```ignore
//! struct Memory(String);
//!
//! #[polybus_core::async_trait]
//! impl polybus_core::testkit::Target for Memory {
//!     async fn connect(&self) -> polybus_core::Result<polybus_core::Bus> {
//!         polybus_memory::connect(&format!("memory://{}", self.0))
//!     }
//! }
//!
//! polybus_core::conformance_suite!(memory, Memory(polybus_core::testkit::unique_name()));
//! ```
//!
//! The test crate needs `tokio` (features `macros`, `rt`) as a dev-dependency.
//!
//! A case that needs a [`Capability`] the backend does not claim passes as
//! *skipped*: it says so on stderr and appends a line to the run report
//! (`$CARGO_TARGET_TMPDIR/polybus-conformance.report`, or `$POLYBUS_REPORT`),
//! which `scripts/test` sums up as ran and skipped counts, by name and reason.

pub mod cases;
#[cfg(feature = "otel-testkit")]
pub mod otel;

use std::fmt;
use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use crate::{Bus, Capability, Delivery, DeliveryStream, Message, Result, RetryPolicy};

/// How the suite reaches the broker under test.
#[async_trait]
pub trait Target: Send + Sync + 'static {
    /// A new connection. Every call within one case must reach the same broker.
    async fn connect(&self) -> Result<Bus>;

    /// Try to connect to a broker that does not answer. `None` where the
    /// backend has no network (the case is then skipped, by name).
    async fn connect_unreachable(&self) -> Option<Result<Bus>> {
        None
    }

    /// Why this target's cases are skipped, if the person running them opted out
    /// (for example with an environment variable). Never a silent skip: each case
    /// is reported skipped with this reason.
    fn opted_out(&self) -> Option<String> {
        None
    }

    /// How to start the broker, said when a case cannot connect.
    fn setup_hint(&self) -> &str {
        ""
    }

    /// How long a case waits for a delivery it expects.
    fn patience(&self) -> Duration {
        Duration::from_secs(15)
    }

    /// How long a case watches to be sure nothing arrives.
    fn quiet(&self) -> Duration {
        Duration::from_millis(400)
    }
}

/// A short unique name, for brokers, topics and groups of one case.
pub fn unique_name() -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    // The tail of a v7 uuid is random; 12 hex digits keep names short and distinct.
    format!("t{}", &id[id.len() - 12..])
}

/// `m` without the headers the trace-context propagator writes (feature
/// `otel`: `traceparent` and `tracestate` with the W3C propagator), so a case
/// compares a delivered message with the one it published. Without the
/// feature, or without a propagator installed, `m` as it is.
pub fn untraced(m: &Message) -> Message {
    #[cfg(feature = "otel")]
    {
        let fields: Vec<String> = opentelemetry::global::get_text_map_propagator(|p| {
            p.fields().map(str::to_owned).collect()
        });
        if fields.iter().any(|f| m.header(f).is_some()) {
            let mut m = m.clone();
            m.headers_mut().retain(|k, _| !fields.contains(k));
            return m;
        }
    }
    m.clone()
}

/// Why a case did not pass.
pub enum CaseError {
    /// The case does not apply to this backend; the reason names what is missing.
    Skip(String),
    /// The case failed.
    Fail(String),
}

impl<E: std::error::Error> From<E> for CaseError {
    fn from(e: E) -> Self {
        CaseError::Fail(format!("{e} ({e:?})"))
    }
}

impl fmt::Debug for CaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaseError::Skip(r) => write!(f, "skipped: {r}"),
            CaseError::Fail(r) => write!(f, "failed: {r}"),
        }
    }
}

/// What a case returns.
pub type CaseResult = std::result::Result<(), CaseError>;

/// What a case works with: a connection, names private to the case, and waits.
pub struct Ctx {
    target: Arc<dyn Target>,
    bus: Bus,
    ns: String,
    label: String,
}

impl Ctx {
    /// The case's first connection.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Another connection to the same broker.
    pub async fn connect(&self) -> Result<Bus> {
        self.target.connect().await
    }

    /// The target, for cases that need more than a connection.
    pub fn target(&self) -> &dyn Target {
        &*self.target
    }

    /// `suffix` under this case's own namespace, so cases sharing a broker never
    /// see each other's messages.
    pub fn topic(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.ns)
    }

    /// A group name private to this case.
    pub fn group(&self, name: &str) -> String {
        format!("{}-{name}", self.ns)
    }

    /// Skip unless the backend claims `capability`.
    pub fn require(&self, capability: Capability) -> CaseResult {
        if self.bus.capabilities().has(capability) {
            Ok(())
        } else {
            Err(CaseError::Skip(format!("needs capability `{capability}`")))
        }
    }

    /// A retry policy quick enough for tests against real brokers.
    pub fn fast_retry(&self) -> RetryPolicy {
        RetryPolicy::fixed(Duration::from_millis(100))
    }

    /// The next delivery; fails the case if none comes within the patience.
    pub async fn recv(&self, stream: &mut DeliveryStream) -> Delivery {
        match tokio::time::timeout(self.target.patience(), stream.next()).await {
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(e))) => panic!("{}: the stream yielded an error: {e}", self.label),
            Ok(None) => panic!(
                "{}: the stream ended while a delivery was expected",
                self.label
            ),
            Err(_) => panic!(
                "{}: no delivery within {:?}",
                self.label,
                self.target.patience()
            ),
        }
    }

    /// Deliveries until `n` have come, each acked; fails the case on a timeout.
    pub async fn recv_acked(&self, stream: &mut DeliveryStream, n: usize) -> Vec<Message> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let d = self.recv(stream).await;
            out.push(d.message().clone());
            d.ack().await.expect("ack");
        }
        out
    }

    /// Fail the case if anything arrives within the quiet period.
    pub async fn expect_quiet(&self, stream: &mut DeliveryStream) {
        self.expect_quiet_for(stream, self.target.quiet()).await
    }

    /// Fail the case if anything arrives within `period`.
    pub async fn expect_quiet_for(&self, stream: &mut DeliveryStream, period: Duration) {
        let Ok(next) = tokio::time::timeout(period, stream.next()).await else {
            return;
        };
        let Some(item) = next else {
            panic!(
                "{}: the stream ended while it should have stayed open",
                self.label
            );
        };
        {
            match item {
                Ok(d) => panic!(
                    "{}: expected nothing within {period:?}, got a delivery on {} (attempt {}, payload {:?})",
                    self.label,
                    d.topic(),
                    d.attempt(),
                    String::from_utf8_lossy(d.message().payload())
                ),
                Err(e) => panic!("{}: expected nothing, got an error: {e}", self.label),
            }
        }
    }
}

/// Run one case; what the macro expands to. Panics (fails the test) on failure.
pub async fn run_case<T, F, Fut>(
    backend: &str,
    case: &str,
    report_dir: Option<&str>,
    target: T,
    body: F,
) where
    T: Target,
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = CaseResult>,
{
    let label = format!("{backend}::{case}");
    if let Some(reason) = target.opted_out() {
        eprintln!("SKIPPED {label}: {reason}");
        report(report_dir, &format!("skipped\t{backend}\t{case}\t{reason}"));
        return;
    }
    let target: Arc<dyn Target> = Arc::new(target);
    let bus = match target.connect().await {
        Ok(bus) => bus,
        Err(e) => panic!(
            "{label}: cannot connect to the broker under test: {e}. {}",
            target.setup_hint()
        ),
    };
    let ctx = Ctx {
        target: target.clone(),
        bus,
        ns: unique_name(),
        label: label.clone(),
    };
    let limit = Duration::from_secs(120);
    let outcome = match tokio::time::timeout(limit, body(ctx)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(CaseError::Fail(format!("did not finish within {limit:?}"))),
    };
    match outcome {
        Ok(()) => report(report_dir, &format!("ran\t{backend}\t{case}")),
        Err(CaseError::Skip(reason)) => {
            eprintln!("SKIPPED {label}: {reason}");
            report(report_dir, &format!("skipped\t{backend}\t{case}\t{reason}"));
        }
        Err(CaseError::Fail(reason)) => panic!("{label} failed: {reason}"),
    }
}

fn report(dir: Option<&str>, line: &str) {
    let path = match std::env::var("POLYBUS_REPORT") {
        Ok(p) => p.into(),
        Err(_) => match dir {
            Some(d) => std::path::Path::new(d).join("polybus-conformance.report"),
            None => return,
        },
    };
    // One short write per line with O_APPEND: lines from parallel tests do not interleave.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}

/// Expand the whole suite as `mod $backend { #[tokio::test] fn <case>() … }`:
/// one test per case of the list in [`cases`]. `$target` is evaluated once per
/// case, so each case may get a fresh broker.
#[macro_export]
macro_rules! conformance_suite {
    ($backend:ident, $target:expr) => {
        $crate::__conformance_case_list!([tests $backend, $target]);
    };
}

/// What the case list expands to: `[tests $backend, $target]` makes the tests
/// of [`conformance_suite!`](crate::conformance_suite); `[registry]` makes
/// [`cases::CASES`], and checks inside this crate that every case listed exists.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_expand {
    ([tests $backend:ident, $target:expr] $($module:ident { $($case:ident),* $(,)? })*) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            $($(
                #[::tokio::test(flavor = "current_thread")]
                async fn $case() {
                    $crate::testkit::run_case(
                        stringify!($backend),
                        stringify!($case),
                        option_env!("CARGO_TARGET_TMPDIR"),
                        $target,
                        $crate::testkit::cases::$module::$case,
                    )
                    .await;
                }
            )*)*
        }
    };
    ([registry] $($module:ident { $($case:ident),* $(,)? })*) => {
        /// Every case of the suite, in the order of the list: `CASES.len()` is
        /// how many tests [`conformance_suite!`](crate::conformance_suite) makes.
        pub const CASES: &[$crate::testkit::cases::Case] = &[$($(
            $crate::testkit::cases::Case { module: stringify!($module), name: stringify!($case) },
        )*)*];

        // A name in the list without its function fails here, not only where
        // a backend expands the suite.
        const _: () = {$($(
            let _ = $crate::testkit::cases::$module::$case;
        )*)*};
    };
}
