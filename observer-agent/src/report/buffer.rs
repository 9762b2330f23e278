//! Observations waiting to be reported: sealed batches keep their sequence
//! number until acknowledged, so a resend is recognised as one. Bounded:
//! past the capacity new observations are dropped and counted.

use std::collections::VecDeque;

use observer_proto::{Observation, UnixNanos};

pub struct Batch {
    pub sequence: u64,
    pub observations: Vec<Observation>,
    /// Agent wall clock when sealed (the report's `sent`).
    pub sealed: UnixNanos,
}

pub struct Buffer {
    sealed: VecDeque<Batch>,
    open: Vec<Observation>,
    next_sequence: u64,
    batch_max: usize,
    capacity: usize,
    len: usize,
    dropped: u64,
}

impl Buffer {
    pub fn new(batch_max: usize, capacity: usize) -> Self {
        Self {
            sealed: VecDeque::new(),
            open: Vec::new(),
            next_sequence: 1,
            batch_max: batch_max.max(1),
            capacity: capacity.max(1),
            len: 0,
            dropped: 0,
        }
    }

    /// Adds one observation; false (and counted) when the buffer is full.
    pub fn push(&mut self, o: Observation, now: UnixNanos) -> bool {
        if self.len >= self.capacity {
            self.dropped += 1;
            return false;
        }
        self.open.push(o);
        self.len += 1;
        if self.open.len() >= self.batch_max {
            self.seal(now);
        }
        true
    }

    /// Turns the open observations into a numbered batch.
    pub fn seal(&mut self, now: UnixNanos) {
        if self.open.is_empty() {
            return;
        }
        let observations = std::mem::take(&mut self.open);
        self.sealed.push_back(Batch {
            sequence: self.next_sequence,
            observations,
            sealed: now,
        });
        self.next_sequence += 1;
    }

    pub fn front(&self) -> Option<&Batch> {
        self.sealed.front()
    }

    /// Sealed batches with a sequence above `sequence`, oldest first.
    pub fn sealed_after(&self, sequence: u64) -> impl Iterator<Item = &Batch> {
        self.sealed.iter().filter(move |b| b.sequence > sequence)
    }

    /// Forgets every batch up to and including `sequence`.
    pub fn acknowledge(&mut self, sequence: u64) {
        while self.sealed.front().is_some_and(|b| b.sequence <= sequence) {
            if let Some(b) = self.sealed.pop_front() {
                self.len -= b.observations.len();
            }
        }
    }

    /// Observations held (sealed and open).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// A smaller batch size, when the aggregator asks for one. Applies to
    /// batches sealed from now on.
    pub fn limit_batch(&mut self, max: usize) {
        if max > 0 {
            self.batch_max = self.batch_max.min(max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o() -> Observation {
        Observation::NewFlow(observer_proto::NewFlow {
            src: "10.0.0.1:1".parse().unwrap(),
            dst: "10.0.0.2:2".parse().unwrap(),
            original_dst: "10.96.0.1:3".parse().unwrap(),
            time: t(1),
        })
    }

    fn t(nanos: i64) -> UnixNanos {
        UnixNanos::from_nanos(nanos)
    }

    #[test]
    fn batches_keep_their_sequence_until_acknowledged() {
        let mut b = Buffer::new(2, 10);
        for _ in 0..5 {
            assert!(b.push(o(), t(1)));
        }
        b.seal(t(2));
        let seqs: Vec<u64> = b.sealed.iter().map(|x| x.sequence).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(b.len(), 5);
        let after: Vec<u64> = b.sealed_after(1).map(|x| x.sequence).collect();
        assert_eq!(after, [2, 3]);
        b.acknowledge(2);
        assert_eq!(b.front().unwrap().sequence, 3);
        assert_eq!(b.len(), 1);
        b.acknowledge(3);
        assert!(b.is_empty());
        assert!(b.front().is_none());
    }

    #[test]
    fn full_buffer_drops_and_counts() {
        let mut b = Buffer::new(100, 3);
        for _ in 0..5 {
            b.push(o(), t(1));
        }
        assert_eq!((b.len(), b.dropped()), (3, 2));
        b.seal(t(1));
        b.acknowledge(1);
        assert!(b.push(o(), t(1)));
    }
}
