//! What the tool prints, how it reads its input, and its exit codes.

use std::path::Path;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use polybus::{Error, Kind, Message};
use tokio::io::AsyncReadExt;

/// Text for a reader, or JSON lines for a script.
pub(crate) struct Out {
    pub(crate) json: bool,
}

impl Out {
    pub(crate) fn new(json: bool) -> Self {
        Out { json }
    }

    /// One JSON object on its own line.
    pub(crate) fn line(&self, value: &serde_json::Value) {
        println!("{value}");
    }

    /// A failure, on stderr (and as JSON on stdout with `--json`).
    pub(crate) fn error(&self, e: &Error) {
        if self.json {
            self.line(&serde_json::json!({ "ok": false, "kind": e.kind().name(), "error": e.to_string() }));
        }
        eprintln!("polybus: {} error: {e}", e.kind().name());
    }

    /// A delivery as `tail` prints it.
    pub(crate) fn delivery(&self, topic: &str, m: &Message, attempt: u32) {
        let payload = String::from_utf8_lossy(m.payload());
        if self.json {
            self.line(&serde_json::json!({
                "topic": topic,
                "id": m.id(),
                "key": m.key(),
                "attempt": attempt,
                "timestamp_ms": m.timestamp_millis(),
                "content_type": m.content_type(),
                "headers": m.headers(),
                "payload": payload,
            }));
        } else {
            let key = m.key().map(|k| format!(" key={k}")).unwrap_or_default();
            println!("{topic} {}{key}: {payload}", m.id());
        }
    }
}

/// `t` as milliseconds since the Unix epoch, for JSON.
pub(crate) fn millis(t: Option<SystemTime>) -> Option<u64> {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
}

/// The exit code of a failure of `kind` (the table in `polybus --help`).
pub(crate) fn exit_code(kind: Kind) -> ExitCode {
    ExitCode::from(match kind {
        Kind::InvalidInput | Kind::PayloadTooLarge | Kind::Decode | Kind::Encode => 2,
        Kind::Connection => 3,
        Kind::Authentication => 4,
        Kind::Timeout => 5,
        Kind::Refused | Kind::Unsupported | Kind::CircuitOpen => 6,
        _ => 1,
    })
}

/// All of `file`, or of stdin.
pub(crate) async fn read_input(file: Option<&Path>) -> polybus::Result<Vec<u8>> {
    match file {
        Some(path) => tokio::fs::read(path)
            .await
            .map_err(|e| Error::invalid_input(format!("cannot read {}: {e}", path.display()))),
        None => {
            let mut buf = Vec::new();
            tokio::io::stdin()
                .read_to_end(&mut buf)
                .await
                .map(|_| buf)
                .map_err(|e| Error::invalid_input(format!("cannot read stdin: {e}")))
        }
    }
}
