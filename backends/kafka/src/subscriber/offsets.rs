//! The offset arithmetic of a partition: the commit metadata that records a
//! handed-out head (C8).

/// The version of the commit metadata format below.
const METADATA_TAG: &str = "polybus1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Prior {
    pub(super) head: i64,
    pub(super) attempt: u32,
    pub(super) through: i64,
}

impl Prior {
    pub(super) fn encode(&self) -> String {
        format!(
            "{METADATA_TAG}:{}:{}:{}",
            self.head, self.attempt, self.through
        )
    }

    pub(super) fn decode(metadata: &str, committed: i64) -> Option<Prior> {
        let mut it = metadata.strip_prefix(METADATA_TAG)?.split(':').skip(1);
        let head = it.next()?.parse().ok()?;
        let attempt = it.next()?.parse().ok()?;
        let through = it.next()?.parse().ok()?;
        (head == committed).then_some(Prior {
            head,
            attempt,
            through,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_metadata_round_trips() {
        let p = Prior {
            head: 7,
            attempt: 2,
            through: 9,
        };
        assert_eq!(Prior::decode(&p.encode(), 7), Some(p));
        assert_eq!(Prior::decode(&p.encode(), 8), None, "stale: another offset");
        assert_eq!(Prior::decode("", 7), None);
        assert_eq!(Prior::decode("something else", 7), None);
    }
}
