//! One tag set's queued jobs, by (priority desc, arrival).
//!
//! Arrival numbers only grow at the back and only shrink at the front (see
//! `Scheduler::back_key` and `front_key`), so each priority level is a
//! deque kept in order by pushing at one end or the other: 16 bytes a job,
//! where an ordered map paid about three times that in half-full nodes.
//!
//! A job leaves the middle of a level (a cancel, a worker that came back
//! with it) without moving the others: its entry stays as a tombstone
//! until it reaches an end, and an entry is live only while the job is
//! still queued under that very key, which the caller answers from the
//! job table (`is_live`). The fronts are kept live, so the best job is
//! always at hand; once tombstones outnumber the live entries of a level,
//! the level is swept.

use std::collections::{BTreeMap, VecDeque};

use crew_core::job::JobId;

use crate::QueueKey;

/// Tombstones tolerated in a group before a sweep, on top of its live
/// count.
const SWEEP_SLACK: usize = 64;

#[derive(Debug, Default)]
pub(crate) struct Group {
    levels: BTreeMap<std::cmp::Reverse<i32>, VecDeque<(i64, JobId)>>,
    live: usize,
    stale: usize,
}

impl Group {
    /// Live jobs queued.
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Queues `job` under `key`, which must come after (back) or before
    /// (front) every arrival of its level.
    pub(crate) fn insert(&mut self, key: QueueKey, job: JobId) {
        let level = self.levels.entry(key.0).or_default();
        if level.front().is_some_and(|&(seq, _)| key.1 < seq) {
            level.push_front((key.1, job));
        } else {
            debug_assert!(level.back().is_none_or(|&(seq, _)| seq < key.1), "queue keys out of order");
            level.push_back((key.1, job));
        }
        self.live += 1;
    }

    /// The best queued job's key.
    pub(crate) fn first_key(&self) -> Option<QueueKey> {
        let (prio, level) = self.levels.first_key_value()?;
        level.front().map(|&(seq, _)| (*prio, seq))
    }

    /// Takes the best queued job out.
    pub(crate) fn pop_first(&mut self, is_live: impl Fn(JobId, QueueKey) -> bool) -> Option<(QueueKey, JobId)> {
        let mut entry = self.levels.first_entry()?;
        let prio = *entry.key();
        let level = entry.get_mut();
        let (seq, job) = level.pop_front()?;
        self.live -= 1;
        self.stale = self.stale.saturating_sub(trim(prio, level, &is_live));
        if level.is_empty() {
            entry.remove();
        }
        self.sweep_if_stale(is_live);
        Some(((prio, seq), job))
    }

    /// Takes `job`, queued under `key`, out.
    pub(crate) fn remove(&mut self, key: QueueKey, job: JobId, is_live: impl Fn(JobId, QueueKey) -> bool) {
        let Some(level) = self.levels.get_mut(&key.0) else { return };
        self.live = self.live.saturating_sub(1);
        self.stale += 1;
        // The removed job still looks queued to `is_live`.
        let alive = |j: JobId, k: QueueKey| !(j == job && k == key) && is_live(j, k);
        self.stale = self.stale.saturating_sub(trim(key.0, level, &alive));
        if level.is_empty() {
            self.levels.remove(&key.0);
        }
        self.sweep_if_stale(alive);
    }

    /// Sweeps the tombstones out once they outnumber the live jobs.
    fn sweep_if_stale(&mut self, is_live: impl Fn(JobId, QueueKey) -> bool) {
        if self.stale > self.live + SWEEP_SLACK {
            for (prio, level) in &mut self.levels {
                level.retain(|&(seq, j)| is_live(j, (*prio, seq)));
            }
            self.levels.retain(|_, level| !level.is_empty());
            self.stale = 0;
        }
    }

    /// The live jobs, best first.
    pub(crate) fn iter(&self, is_live: impl Fn(JobId, QueueKey) -> bool) -> impl Iterator<Item = (QueueKey, JobId)> {
        self.levels
            .iter()
            .flat_map(|(prio, level)| level.iter().map(move |&(seq, job)| ((*prio, seq), job)))
            .filter(move |&(key, job)| is_live(job, key))
    }

    /// Tombstones kept, for the sanity check.
    #[cfg(test)]
    pub(crate) fn stale(&self) -> usize {
        self.stale
    }
}

/// Pops tombstones off both ends of a level; how many.
fn trim(
    prio: std::cmp::Reverse<i32>,
    level: &mut VecDeque<(i64, JobId)>,
    is_live: &impl Fn(JobId, QueueKey) -> bool,
) -> usize {
    let mut n = 0;
    while level.front().is_some_and(|&(seq, job)| !is_live(job, (prio, seq))) {
        level.pop_front();
        n += 1;
    }
    while level.back().is_some_and(|&(seq, job)| !is_live(job, (prio, seq))) {
        level.pop_back();
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::cmp::Reverse;
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    #[test]
    fn agrees_with_an_ordered_map_under_pushes_pops_and_removals() {
        // Where each job is queued: the stand-in for the job table.
        let queued: RefCell<HashMap<JobId, QueueKey>> = RefCell::new(HashMap::new());
        let is_live = |j: JobId, k: QueueKey| queued.borrow().get(&j) == Some(&k);
        let mut group = Group::default();
        let mut model: BTreeMap<QueueKey, JobId> = BTreeMap::new();
        let (mut back, mut front, mut next_job) = (0i64, 0i64, 0u64);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut swept = false;
        for _ in 0..100_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let prio = Reverse((rng >> 50) as i32 % 3);
            match rng % 8 {
                0..=3 => {
                    next_job += 1;
                    let key = if rng % 16 < 2 {
                        front -= 1;
                        (prio, front)
                    } else {
                        back += 1;
                        (prio, back)
                    };
                    group.insert(key, JobId(next_job));
                    queued.borrow_mut().insert(JobId(next_job), key);
                    model.insert(key, JobId(next_job));
                }
                4 => {
                    let got = group.pop_first(is_live);
                    let want = model.pop_first();
                    assert_eq!(got, want);
                    if let Some((_, j)) = got {
                        queued.borrow_mut().remove(&j);
                    }
                }
                _ => {
                    // A job from anywhere in the queue leaves (a cancel).
                    let Some((&key, &job)) = model.iter().nth((rng >> 32) as usize % model.len().max(1)) else {
                        continue;
                    };
                    group.remove(key, job, is_live);
                    queued.borrow_mut().remove(&job);
                    model.remove(&key);
                    swept |= group.stale() == 0 && group.len() > 100;
                }
            }
            assert_eq!(group.len(), model.len());
            assert_eq!(group.first_key(), model.first_key_value().map(|(k, _)| *k));
            assert!(group.stale() <= group.len() + SWEEP_SLACK + 1);
        }
        let listed: Vec<(QueueKey, JobId)> = group.iter(is_live).collect();
        let want: Vec<(QueueKey, JobId)> = model.into_iter().collect();
        assert_eq!(listed, want);
        assert!(swept, "the run swept tombstones");
    }
}
