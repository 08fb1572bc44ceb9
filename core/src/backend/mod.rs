//! What backends share beyond the traits: broker URL parsing and redaction.

pub mod url;
