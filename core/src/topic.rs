//! Topics and patterns (contract clause C1).
//!
//! A topic is one or more words joined by dots: `user.created`. A word is made of
//! ASCII letters, digits, `_` and `-`. The charset is the intersection of what AMQP
//! routing keys and Kafka topic names accept, so a valid topic is valid on every
//! backend; the length limit (249) is Kafka's.
//!
//! A pattern is a topic whose words may also be `*` (exactly one word) or `#` (zero
//! or more words), as in AMQP topic exchanges, and it matches the same way on every
//! backend.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};

use crate::names::RESERVED_WORD;

/// The longest topic accepted (Kafka's limit on topic names).
pub const MAX_TOPIC_LEN: usize = 249;
/// The longest pattern accepted (AMQP's limit on binding keys).
pub const MAX_PATTERN_LEN: usize = 255;

fn is_word_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Words of word characters, joined by single dots.
fn is_valid_topic(name: &[u8]) -> bool {
    let mut after_dot = true;
    for &b in name {
        if b == b'.' {
            if after_dot {
                return false;
            }
            after_dot = true;
        } else if is_word_char(b) {
            after_dot = false;
        } else {
            return false;
        }
    }
    !after_dot
}

fn check_word(kind: &str, whole: &str, word: &str, index: usize) -> Result<()> {
    if word.is_empty() {
        return Err(Error::invalid_input(format!(
            "invalid {kind} `{whole}`: word {} is empty (no leading, trailing or double dots)",
            index + 1
        )));
    }
    if let Some(c) = word.bytes().find(|&b| !is_word_char(b)) {
        return Err(Error::invalid_input(format!(
            "invalid {kind} `{whole}`: word `{word}` has `{}`; words use letters, digits, `_` and `-`",
            c.escape_ascii()
        )));
    }
    Ok(())
}

/// A validated topic name, cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Validate `name` as a topic.
    pub fn new(name: &str) -> Result<Self> {
        Self::validate(name)?;
        Ok(Topic(Arc::from(name)))
    }

    /// Check `name` without allocating.
    pub fn validate(name: &str) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid_input(
                "invalid topic ``: a topic has at least one word",
            ));
        }
        if name.len() > MAX_TOPIC_LEN {
            return Err(Error::invalid_input(format!(
                "invalid topic `{}…`: {} bytes, the limit is {MAX_TOPIC_LEN}",
                &name[..name.floor_char_boundary(32)],
                name.len()
            )));
        }
        // One pass over the bytes for the common, valid case; the word by word
        // check below only runs to say what is wrong.
        if is_valid_topic(name.as_bytes()) {
            return Ok(());
        }
        for (i, word) in name.split('.').enumerate() {
            check_word("topic", name, word, i)?;
        }
        Ok(())
    }

    /// See [`TopicExt::from_broker`](crate::backend::TopicExt::from_broker).
    pub(crate) fn unchecked(name: &str) -> Self {
        Topic(Arc::from(name))
    }

    /// Whether `name` is in the library's namespace (first word `polybus`).
    pub fn is_reserved(name: &str) -> bool {
        name.strip_prefix(RESERVED_WORD)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    }

    /// The topic as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The words of the topic.
    pub fn words(&self) -> impl Iterator<Item = &str> {
        self.0.split('.')
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Topic({:?})", &*self.0)
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Topic {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Topic::new(s)
    }
}

/// One word of a [`Pattern`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Segment {
    /// A literal word.
    Word(Box<str>),
    /// `*`: exactly one word.
    Star,
    /// `#`: zero or more words.
    Hash,
}

/// A validated subscription pattern.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    text: Arc<str>,
    segments: Arc<[Segment]>,
}

impl Pattern {
    /// Validate and parse `text` as a pattern.
    pub fn new(text: &str) -> Result<Self> {
        if text.is_empty() {
            return Err(Error::invalid_input(
                "invalid pattern ``: a pattern has at least one word (use `#` for all topics)",
            ));
        }
        if text.len() > MAX_PATTERN_LEN {
            return Err(Error::invalid_input(format!(
                "invalid pattern `{}…`: {} bytes, the limit is {MAX_PATTERN_LEN}",
                &text[..text.floor_char_boundary(32)],
                text.len()
            )));
        }
        let mut segments = Vec::new();
        for (i, word) in text.split('.').enumerate() {
            segments.push(match word {
                "*" => Segment::Star,
                "#" => Segment::Hash,
                w => {
                    check_word("pattern", text, w, i)?;
                    Segment::Word(w.into())
                }
            });
        }
        Ok(Pattern {
            text: Arc::from(text),
            segments: segments.into(),
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed words.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Whether the pattern has no wildcard, so it names exactly one topic.
    pub fn is_literal(&self) -> bool {
        self.segments.iter().all(|s| matches!(s, Segment::Word(_)))
    }

    /// Whether `topic` matches, with AMQP topic-exchange semantics.
    pub fn matches(&self, topic: &str) -> bool {
        if Topic::is_reserved(topic)
            && !matches!(self.segments.first(), Some(Segment::Word(w)) if &**w == RESERVED_WORD)
        {
            return false;
        }
        let words: Vec<&str> = topic.split('.').collect();
        matches_words(&self.segments, &words)
    }
}

/// Matches in O(segments × words) time: a table of "the first i segments match the
/// first j words". Backtracking would be exponential on patterns like `#.#.#.x`.
fn matches_words(segs: &[Segment], words: &[&str]) -> bool {
    let n = words.len();
    let mut dp = vec![false; n + 1];
    dp[0] = true;
    let mut next = vec![false; n + 1];
    for seg in segs {
        next[0] = false;
        match seg {
            Segment::Hash => {
                let mut any = false;
                for j in 0..=n {
                    any |= dp[j];
                    next[j] = any;
                }
            }
            Segment::Star => next[1..].copy_from_slice(&dp[..n]),
            Segment::Word(w) => {
                for j in 1..=n {
                    next[j] = dp[j - 1] && **w == *words[j - 1];
                }
            }
        }
        std::mem::swap(&mut dp, &mut next);
    }
    dp[n]
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", &*self.text)
    }
}

impl std::str::FromStr for Pattern {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Pattern::new(s)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_reserved_namespace_is_the_first_word_polybus() {
        for (name, reserved) in [
            ("polybus", true),
            ("polybus.dead-letter.g", true),
            ("polybusx.a", false),
            ("a.polybus", false),
            ("poly", false),
        ] {
            assert_eq!(Topic::is_reserved(name), reserved, "{name}");
        }
    }

    use super::*;

    #[test]
    fn topic_validation_names_the_offender() {
        assert!(Topic::new("user.created").is_ok());
        assert!(Topic::new("a").is_ok());
        assert!(Topic::new("user_1.created-now").is_ok());
        for bad in ["", ".a", "a.", "a..b", "a.*", "a.#", "a b", "ü.x", "a/b"] {
            let e = Topic::new(bad).unwrap_err();
            assert!(e.is_invalid_input(), "{bad}");
            assert!(e.to_string().contains(&format!("`{bad}`")), "{e}");
        }
        assert!(Topic::new(&"a".repeat(249)).is_ok());
        let long = "a".repeat(250);
        let e = Topic::new(&long).unwrap_err();
        assert!(e.to_string().contains("250 bytes"), "{e}");
    }

    #[test]
    fn pattern_semantics_follow_amqp() {
        let m = |p: &str, t: &str| Pattern::new(p).unwrap().matches(t);
        assert!(m("user.*", "user.created"));
        assert!(!m("user.*", "user"));
        assert!(!m("user.*", "user.created.eu"));
        assert!(m("user.#", "user"));
        assert!(m("user.#", "user.created.eu"));
        assert!(m("#", "a"));
        assert!(m("#", "a.b.c"));
        assert!(m("#.created", "created"));
        assert!(m("#.created", "user.created"));
        assert!(!m("#.created", "user.created.eu"));
        assert!(m("*.#.*", "a.b"));
        assert!(!m("*.#.*", "a"));
        assert!(m("a.#.b.#", "a.b"));
        assert!(m("a.#.b.#", "a.x.y.b.z"));
        assert!(!m("user.created", "user.created2"));
    }

    #[test]
    fn wildcards_never_reach_the_library_namespace() {
        let m = |p: &str, t: &str| Pattern::new(p).unwrap().matches(t);
        assert!(!m("#", "polybus.dead-letter.g"));
        assert!(!m("*.dead-letter.g", "polybus.dead-letter.g"));
        assert!(m("polybus.dead-letter.*", "polybus.dead-letter.g"));
        assert!(m("polybus.#", "polybus.dead-letter.g"));
        assert!(m("#", "polybusx.a"));
    }

    #[test]
    fn pattern_rejects_partial_wildcards() {
        for bad in ["", "user.*x", "us#er", "a..b", ".#", "#.", "a.b c"] {
            assert!(Pattern::new(bad).unwrap_err().is_invalid_input(), "{bad}");
        }
    }

    /// The plain reference: straight from the definition, by backtracking.
    fn reference(segs: &[Segment], words: &[&str]) -> bool {
        match segs.split_first() {
            None => words.is_empty(),
            Some((Segment::Hash, rest)) => (0..=words.len()).any(|n| reference(rest, &words[n..])),
            Some((Segment::Star, rest)) => !words.is_empty() && reference(rest, &words[1..]),
            Some((Segment::Word(w), rest)) => {
                words.first().is_some_and(|f| **w == **f) && reference(rest, &words[1..])
            }
        }
    }

    #[test]
    fn adversarial_pattern_is_fast() {
        let p = Pattern::new(&format!("{}z", "#.".repeat(100))).unwrap();
        let topic = vec!["a"; 120].join(".");
        assert!(!p.matches(&topic));
    }

    use proptest::prelude::*;

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("c-1".to_string())
        ]
    }

    fn seg() -> impl Strategy<Value = String> {
        prop_oneof![word(), Just("*".to_string()), Just("#".to_string())]
    }

    proptest! {
        #[test]
        fn matcher_agrees_with_reference(
            pat in prop::collection::vec(seg(), 1..6),
            top in prop::collection::vec(word(), 1..7),
        ) {
            let p = Pattern::new(&pat.join(".")).unwrap();
            let t = Topic::new(&top.join(".")).unwrap();
            let words: Vec<&str> = t.words().collect();
            prop_assert_eq!(p.matches(t.as_str()), reference(p.segments(), &words));
        }

        #[test]
        fn every_generated_topic_is_valid_and_matches_itself_and_hash(top in prop::collection::vec(word(), 1..7)) {
            let t = top.join(".");
            prop_assert!(Topic::new(&t).is_ok());
            prop_assert!(Pattern::new(&t).unwrap().matches(&t));
            prop_assert!(Pattern::new("#").unwrap().matches(&t));
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,40}") {
            let _ = Topic::new(&s);
            let _ = Pattern::new(&s);
        }
    }
}
