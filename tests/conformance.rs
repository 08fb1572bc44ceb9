//! The delivery contract, proven on every enabled backend: one `#[tokio::test]`
//! per case, named `<backend>::<case>`.
//!
//! `cargo test --test conformance -- --list` lists them; `scripts/test` sums up
//! the run, with every skipped case and its reason.

use polybus::{Bus, Result};
use polybus_core::testkit::{Target, unique_name};

/// A fresh named in-memory broker per case; `connect` joins it again.
#[cfg(feature = "memory")]
struct Memory(String);

#[cfg(feature = "memory")]
#[polybus_core::async_trait]
impl Target for Memory {
    async fn connect(&self) -> Result<Bus> {
        polybus::connect(&format!("memory://{}", self.0)).await
    }
}

#[cfg(feature = "memory")]
polybus_core::conformance_suite!(memory, Memory(unique_name()));
