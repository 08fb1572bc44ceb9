//! Patterns as regexes for librdkafka's topic subscription.

use polybus_core::Pattern;
use polybus_core::topic::Segment;

/// A regular expression (librdkafka's dialect: POSIX-like, no look-around) that
/// matches exactly the topics `pattern` matches, leaving aside the reserved
/// `polybus.` namespace, which records are filtered by on receipt.
pub(crate) fn regex(pattern: &Pattern) -> String {
    const WORD: &str = "[-A-Za-z0-9_]+";
    // `#.#` means what `#` means; collapsing runs keeps the translation simple.
    let mut segs: Vec<&Segment> = Vec::new();
    for s in pattern.segments() {
        if !(matches!(s, Segment::Hash) && matches!(segs.last(), Some(Segment::Hash))) {
            segs.push(s);
        }
    }
    let mut out = String::from("^");
    if let [Segment::Hash] = segs[..] {
        out.push_str(&format!("{WORD}(\\.{WORD})*$"));
        return out;
    }
    for (i, seg) in segs.iter().enumerate() {
        let after_leading_hash = i == 1 && matches!(segs[0], Segment::Hash);
        match seg {
            // A leading `#` takes its dot with each word: `(w\.)*`.
            Segment::Hash if i == 0 => out.push_str(&format!("({WORD}\\.)*")),
            // Any other `#` takes the dot before each word: `(\.w)*`.
            Segment::Hash => out.push_str(&format!("(\\.{WORD})*")),
            word => {
                if i > 0 && !after_leading_hash {
                    out.push_str("\\.");
                }
                match word {
                    Segment::Word(w) => out.push_str(&w.replace('-', "\\-")),
                    _ => out.push_str(WORD),
                }
            }
        }
    }
    out.push('$');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use polybus_core::Topic;

    use proptest::prelude::*;

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("a-b".to_string()),
            Just("polybus".to_string())
        ]
    }

    proptest! {
        /// The regex handed to librdkafka matches exactly what the C1 matcher
        /// matches, outside the reserved namespace (filtered on receipt).
        #[test]
        fn regex_agrees_with_the_pattern_matcher(
            pattern in prop::collection::vec(prop_oneof![word(), Just("*".to_string()), Just("#".to_string())], 1..5),
            topic in prop::collection::vec(word(), 1..6),
        ) {
            let pattern = Pattern::new(&pattern.join(".")).unwrap();
            let topic = topic.join(".");
            let re = ::regex::Regex::new(&regex(&pattern)).unwrap();
            if !Topic::is_reserved(&topic) || pattern.matches(&topic) {
                prop_assert_eq!(re.is_match(&topic), pattern.matches(&topic), "{} vs {}", regex(&pattern), topic);
            }
        }
    }

    #[test]
    fn regexes_read_as_expected() {
        let re = |p: &str| regex(&Pattern::new(p).unwrap());
        assert_eq!(re("a.*"), "^a\\.[-A-Za-z0-9_]+$");
        assert_eq!(re("#"), "^[-A-Za-z0-9_]+(\\.[-A-Za-z0-9_]+)*$");
        assert_eq!(re("#.b"), "^([-A-Za-z0-9_]+\\.)*b$");
    }
}
