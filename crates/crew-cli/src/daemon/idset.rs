//! [`IdSet`]: a set of job ids as a bitmap over the span from the lowest to
//! the highest id in it.
//!
//! Why: the daemon keeps, per job not yet received, whether it finished and
//! whether it was received; with a hash set that costs some 40–70 bytes a
//! job (entries, control bytes, a power-of-two table), with a bitmap one
//! bit. Ids are handed out in sequence and jobs end roughly in order, so
//! the span between the oldest and newest id still in the set stays close
//! to its size, and the words at either end that emptied are dropped. An
//! id far outside the span (only a damaged journal could hold one) goes
//! to a small ordered set instead, so that no id can make the bitmap huge.

use std::collections::{BTreeSet, VecDeque};

use crew_core::JobId;

/// The widest span kept as bits: 2^24 words, 2^30 ids (128 MiB).
const MAX_WORDS: u64 = 1 << 24;

/// A set of job ids (see the module's documentation).
#[derive(Debug, Default, Clone)]
pub(crate) struct IdSet {
    /// The id of bit 0 of `words[0]` (a multiple of 64).
    base: u64,
    words: VecDeque<u64>,
    /// Ids too far from the others to be kept as bits.
    outliers: BTreeSet<u64>,
    len: usize,
}

impl IdSet {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The word and bit of `id`, when it falls in the span.
    fn at(&self, id: u64) -> Option<(usize, u32)> {
        let off = id.checked_sub(self.base)?;
        let word = usize::try_from(off / 64).ok()?;
        (word < self.words.len()).then_some((word, (off % 64) as u32))
    }

    /// Adds `id`; whether it was not there.
    pub(crate) fn insert(&mut self, id: JobId) -> bool {
        let id = id.0;
        let aligned = id - id % 64;
        if self.words.is_empty() {
            self.base = aligned;
            self.words.push_back(0);
        } else if aligned < self.base {
            let grow = (self.base - aligned) / 64;
            if grow + self.words.len() as u64 > MAX_WORDS {
                return self.insert_outlier(id);
            }
            for _ in 0..grow {
                self.words.push_front(0);
            }
            self.base = aligned;
        } else {
            let need = (aligned - self.base) / 64 + 1;
            if need > MAX_WORDS {
                return self.insert_outlier(id);
            }
            while (self.words.len() as u64) < need {
                self.words.push_back(0);
            }
        }
        let Some((w, b)) = self.at(id) else { return self.insert_outlier(id) };
        let fresh = self.words[w] & (1 << b) == 0;
        if fresh {
            self.words[w] |= 1 << b;
            self.len += 1;
        }
        fresh
    }

    fn insert_outlier(&mut self, id: u64) -> bool {
        let fresh = self.outliers.insert(id);
        if fresh {
            self.len += 1;
        }
        fresh
    }

    /// Removes `id`; whether it was there.
    pub(crate) fn remove(&mut self, id: &JobId) -> bool {
        if self.outliers.remove(&id.0) {
            self.len -= 1;
            return true;
        }
        let Some((w, b)) = self.at(id.0) else { return false };
        if self.words[w] & (1 << b) == 0 {
            return false;
        }
        self.words[w] &= !(1 << b);
        self.len -= 1;
        while self.words.front() == Some(&0) {
            self.words.pop_front();
            self.base += 64;
        }
        while self.words.back() == Some(&0) {
            self.words.pop_back();
        }
        if self.words.is_empty() {
            self.base = 0;
        }
        true
    }

    pub(crate) fn contains(&self, id: &JobId) -> bool {
        match self.at(id.0) {
            Some((w, b)) => self.words[w] & (1 << b) != 0,
            None => self.outliers.contains(&id.0),
        }
    }

    /// The lowest id.
    pub(crate) fn first(&self) -> Option<JobId> {
        let bits = self.words.front().map(|w| self.base + u64::from(w.trailing_zeros()));
        match (bits, self.outliers.first()) {
            (Some(a), Some(&b)) => Some(JobId(a.min(b))),
            (a, b) => a.or(b.copied()).map(JobId),
        }
    }

    /// The highest id.
    pub(crate) fn last(&self) -> Option<JobId> {
        let bits = self
            .words
            .back()
            .map(|w| self.base + 64 * (self.words.len() as u64 - 1) + 63 - u64::from(w.leading_zeros()));
        match (bits, self.outliers.last()) {
            (Some(a), Some(&b)) => Some(JobId(a.max(b))),
            (a, b) => a.or(b.copied()).map(JobId),
        }
    }

    /// Whether some id is at most `last`.
    pub(crate) fn any_up_to(&self, last: JobId) -> bool {
        self.first().is_some_and(|f| f <= last)
    }

    /// The ids from `from` on, in order.
    pub(crate) fn iter_from(&self, from: JobId) -> impl Iterator<Item = JobId> + '_ {
        let start = from.0.saturating_sub(self.base) / 64;
        let bits = self.words.iter().enumerate().skip(usize::try_from(start).unwrap_or(usize::MAX)).flat_map(
            move |(i, &w)| {
                let word_base = self.base + 64 * i as u64;
                (0..64u32).filter(move |b| w & (1 << b) != 0).map(move |b| word_base + u64::from(b))
            },
        );
        let bits = bits.filter(move |&id| id >= from.0);
        let outliers = self.outliers.range(from.0..).copied();
        merge(bits, outliers).map(JobId)
    }
}

/// Two ascending iterators as one.
fn merge(a: impl Iterator<Item = u64>, b: impl Iterator<Item = u64>) -> impl Iterator<Item = u64> {
    let mut a = a.peekable();
    let mut b = b.peekable();
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if x <= y => a.next(),
        (Some(_), Some(_)) => b.next(),
        (Some(_), None) => a.next(),
        (None, _) => b.next(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The set agrees with a `BTreeSet` through inserts and removes in a
    /// scrambled order, outliers included, and its bitmap shrinks back.
    #[test]
    fn agrees_with_a_btree_set() {
        let mut set = IdSet::default();
        let mut model = BTreeSet::new();
        let mut x: u64 = 12345;
        let mut step = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20_000u64 {
            let r = step();
            let id = if r % 97 == 0 { u64::MAX - r % 1000 } else { 1000 + r % 5000 };
            if round % 3 == 2 {
                assert_eq!(set.remove(&JobId(id)), model.remove(&id), "remove {id}");
            } else {
                assert_eq!(set.insert(JobId(id)), model.insert(id), "insert {id}");
            }
            assert_eq!(set.len(), model.len());
            assert_eq!(set.first().map(|j| j.0), model.first().copied());
            assert_eq!(set.last().map(|j| j.0), model.last().copied());
            if round % 1000 == 0 {
                let from = 1000 + step() % 6000;
                let got: Vec<u64> = set.iter_from(JobId(from)).map(|j| j.0).collect();
                let want: Vec<u64> = model.range(from..).copied().collect();
                assert_eq!(got, want);
                assert!(set.words.len() <= 5000 / 64 + 2, "{} words", set.words.len());
            }
        }
        for id in model.clone() {
            assert!(set.contains(&JobId(id)));
            assert!(set.remove(&JobId(id)));
        }
        assert!(set.is_empty());
        assert!(set.words.is_empty() && set.outliers.is_empty());
        // Ids received in order leave no words behind.
        for id in 1..=100_000 {
            set.insert(JobId(id));
        }
        for id in 1..=99_990 {
            set.remove(&JobId(id));
        }
        assert!(set.words.len() <= 2);
        assert!(set.any_up_to(JobId(99_991)) && !set.any_up_to(JobId(99_990)));
    }
}
