//! The scheduler's jobs by id, stored densely.
//!
//! Job ids are handed out in increasing order by one controller, so a
//! million queued jobs are a million consecutive ids. A hash map keeps each
//! entry with its key at a load factor of at most 7/8, and doubles: at a
//! million entries it holds room for two million (about 150 bytes a job for
//! the scheduler's 64-byte entry). Here ids live in chunks of [`CHUNK`]
//! consecutive ids, each a boxed array of entries, found by the chunk's
//! number in an ordered map: a full chunk costs its entries and nothing
//! else.
//!
//! Ids leave in roughly the order they came, so chunks empty and are freed
//! whole. The few that straggle (a low-priority job passed over by later
//! ones, a job retried many times) would each hold a whole chunk: once a
//! chunk is down to fewer than [`SPARSE_BELOW`] entries, they move to a
//! plain hash map, and ids of that range that come later (a restore) go
//! there too. So memory stays within a small factor of the live entries
//! whatever the pattern.

use std::collections::{BTreeMap, HashMap};

use crew_core::job::JobId;

/// Consecutive ids per chunk.
const CHUNK: u64 = 256;
/// A chunk with fewer live entries than this gives them to the sparse map.
const SPARSE_BELOW: u32 = 16;

#[derive(Debug)]
struct Chunk<T> {
    live: u32,
    entries: Box<[Option<T>]>,
}

/// A map from job id to `T`, dense for runs of consecutive ids: chunks of
/// 256 ids, a chunk down to a few entries handing them to a hash map (so
/// that a straggler never holds a chunk).
#[derive(Debug)]
pub struct JobTable<T> {
    chunks: BTreeMap<u64, Chunk<T>>,
    sparse: HashMap<JobId, T>,
    /// Chunks below this number are not made again: their ids go to
    /// `sparse` (a chunk demoted, or one never made since ids moved on).
    frontier: u64,
    len: usize,
}

impl<T> Default for JobTable<T> {
    fn default() -> Self {
        Self { chunks: BTreeMap::new(), sparse: HashMap::new(), frontier: 0, len: 0 }
    }
}

fn place(id: JobId) -> (u64, usize) {
    (id.0 / CHUNK, (id.0 % CHUNK) as usize)
}

impl<T> JobTable<T> {
    /// How many entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entry of `id`.
    pub fn get(&self, id: &JobId) -> Option<&T> {
        let (c, i) = place(*id);
        match self.chunks.get(&c) {
            Some(chunk) => chunk.entries[i].as_ref(),
            None if self.sparse.is_empty() => None,
            None => self.sparse.get(id),
        }
    }

    /// The entry of `id`, to change.
    pub fn get_mut(&mut self, id: &JobId) -> Option<&mut T> {
        let (c, i) = place(*id);
        match self.chunks.get_mut(&c) {
            Some(chunk) => chunk.entries[i].as_mut(),
            None if self.sparse.is_empty() => None,
            None => self.sparse.get_mut(id),
        }
    }

    /// Whether `id` has an entry.
    pub fn contains_key(&self, id: &JobId) -> bool {
        self.get(id).is_some()
    }

    /// Sets the entry of `id`; returns the one it replaced.
    pub fn insert(&mut self, id: JobId, value: T) -> Option<T> {
        let (c, i) = place(id);
        if !self.chunks.contains_key(&c) {
            if c < self.frontier {
                let old = self.sparse.insert(id, value);
                if old.is_none() {
                    self.len += 1;
                }
                return old;
            }
            self.frontier = c;
            self.chunks.insert(c, Chunk { live: 0, entries: (0..CHUNK).map(|_| None).collect() });
        }
        let chunk = self.chunks.get_mut(&c).expect("the chunk was just made");
        let old = chunk.entries[i].replace(value);
        if old.is_none() {
            chunk.live += 1;
            self.len += 1;
        }
        old
    }

    /// Takes the entry of `id` out.
    pub fn remove(&mut self, id: &JobId) -> Option<T> {
        let (c, i) = place(*id);
        let Some(chunk) = self.chunks.get_mut(&c) else {
            let old = self.sparse.remove(id);
            if old.is_some() {
                self.len -= 1;
            }
            return old;
        };
        let old = chunk.entries[i].take()?;
        chunk.live -= 1;
        self.len -= 1;
        // The newest chunk is still filling: it is not demoted.
        if chunk.live < SPARSE_BELOW && c != self.frontier {
            let chunk = self.chunks.remove(&c).expect("present");
            let start = c * CHUNK;
            for (k, e) in chunk.entries.into_vec().into_iter().enumerate() {
                if let Some(e) = e {
                    self.sparse.insert(JobId(start + k as u64), e);
                }
            }
        }
        Some(old)
    }

    /// Every id, chunked ones in increasing order, then the sparse ones.
    pub fn keys(&self) -> impl Iterator<Item = JobId> + '_ {
        self.chunks
            .iter()
            .flat_map(|(c, chunk)| {
                chunk
                    .entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.is_some())
                    .map(move |(k, _)| JobId(c * CHUNK + k as u64))
            })
            .chain(self.sparse.keys().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cheap deterministic sequence (xorshift).
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn agrees_with_a_hash_map_under_random_inserts_and_removes() {
        let mut table = JobTable::default();
        let mut model: HashMap<JobId, u64> = HashMap::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next_id = 0u64;
        let mut saw_sparse = false;
        for step in 0..200_000u64 {
            let r = next(&mut rng);
            match r % 10 {
                // Mostly new ids in order, as a controller hands them out.
                0..=4 => {
                    let id = JobId(next_id);
                    next_id += 1 + (r >> 40) % 3;
                    assert_eq!(table.insert(id, step), model.insert(id, step));
                }
                // An old id again (a restore), or an overwrite.
                5 => {
                    let id = JobId((r >> 20) % (next_id + 1));
                    assert_eq!(table.insert(id, step), model.insert(id, step));
                }
                // Removals, mostly of the oldest: most chunks empty whole,
                // some straggle into the sparse map.
                _ => {
                    // A product of two uniform draws: old ids are likelier.
                    let id = JobId((r >> 20) % (next_id + 1) * ((r >> 44) % 1024) / 1024);
                    assert_eq!(table.remove(&id), model.remove(&id));
                }
            }
            assert_eq!(table.len(), model.len());
            saw_sparse |= !table.sparse.is_empty();
        }
        for (id, v) in &model {
            assert_eq!(table.get(id), Some(v));
        }
        let mut keys: Vec<JobId> = table.keys().collect();
        keys.sort();
        let mut want: Vec<JobId> = model.keys().copied().collect();
        want.sort();
        assert_eq!(keys, want);
        assert!(saw_sparse, "the run exercised the sparse map");
    }

    #[test]
    fn a_straggler_does_not_keep_its_chunk() {
        let mut table = JobTable::default();
        for i in 0..(CHUNK * 4) {
            table.insert(JobId(i), i);
        }
        // All but one of the first chunk leave: it is handed to the map.
        for i in 1..CHUNK {
            table.remove(&JobId(i));
        }
        assert_eq!(table.chunks.len(), 3);
        assert_eq!(table.sparse.len(), 1);
        assert_eq!(table.get(&JobId(0)), Some(&0));
        *table.get_mut(&JobId(0)).expect("kept") = 7;
        assert_eq!(table.remove(&JobId(0)), Some(7));
        assert_eq!(table.len(), (CHUNK * 3) as usize);
        // Ids of a demoted range that come back go to the map.
        assert_eq!(table.insert(JobId(5), 5), None);
        assert_eq!(table.chunks.len(), 3);
        assert_eq!(table.get(&JobId(5)), Some(&5));
    }
}
