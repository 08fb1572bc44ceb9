//! [`Ready`]: a group's queue of ready messages, a deque kept in fixed-size
//! chunks. A `VecDeque` doubles as it grows, holding the old and the new
//! buffer at once and moving everything it holds, and keeps its largest size
//! after it drains; a group a producer runs far ahead of (an unbounded one)
//! would peak at three times its backlog. Chunks never move what they hold, a
//! drained one is freed (the last one is kept for reuse, so a queue at a
//! steady depth allocates nothing). Measured, publish-only throughput did not
//! change (2.79 against 2.84 M msg/s, medians of 12 interleaved runs): its
//! cost is in faulting in fresh pages for the backlog, which both pay.

use std::collections::VecDeque;

/// Entries per chunk: large enough that allocating one is rare, small enough
/// that a nearly empty queue holds little.
const CHUNK: usize = 256;

pub(crate) struct Ready<T> {
    /// Never holds an empty chunk.
    chunks: VecDeque<VecDeque<T>>,
    len: usize,
    /// The last chunk emptied, kept for the next one needed.
    spare: Option<VecDeque<T>>,
}

impl<T> Default for Ready<T> {
    fn default() -> Self {
        Ready {
            chunks: VecDeque::new(),
            len: 0,
            spare: None,
        }
    }
}

impl<T> Ready<T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn push_back(&mut self, value: T) {
        match self.chunks.back_mut() {
            Some(chunk) if chunk.len() < CHUNK => chunk.push_back(value),
            _ => {
                let mut chunk = self.fresh();
                chunk.push_back(value);
                self.chunks.push_back(chunk);
            }
        }
        self.len += 1;
    }

    pub(crate) fn push_front(&mut self, value: T) {
        match self.chunks.front_mut() {
            Some(chunk) if chunk.len() < CHUNK => chunk.push_front(value),
            _ => {
                let mut chunk = self.fresh();
                chunk.push_front(value);
                self.chunks.push_front(chunk);
            }
        }
        self.len += 1;
    }

    pub(crate) fn pop_front(&mut self) -> Option<T> {
        let chunk = self.chunks.front_mut()?;
        let value = chunk.pop_front()?;
        if chunk.is_empty() {
            self.spare = self.chunks.pop_front();
        }
        self.len -= 1;
        Some(value)
    }

    pub(crate) fn clear(&mut self) {
        self.chunks.clear();
        self.len = 0;
    }

    fn fresh(&mut self) -> VecDeque<T> {
        self.spare
            .take()
            .unwrap_or_else(|| VecDeque::with_capacity(CHUNK))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_across_chunks_from_both_ends() {
        let mut q = Ready::default();
        let mut model = VecDeque::new();
        // Pushes and pops that cross chunk boundaries at both ends.
        for i in 0..(3 * CHUNK + 7) {
            q.push_back(i);
            model.push_back(i);
            if i % 3 == 0 {
                assert_eq!(q.pop_front(), model.pop_front());
            }
        }
        for i in 0..(CHUNK + 3) {
            q.push_front(10_000 + i);
            model.push_front(10_000 + i);
        }
        assert_eq!(q.len(), model.len());
        while let Some(v) = q.pop_front() {
            assert_eq!(Some(v), model.pop_front());
        }
        assert!(q.is_empty() && model.is_empty());
        q.push_back(1);
        q.clear();
        assert_eq!((q.len(), q.pop_front()), (0, None));
    }
}
