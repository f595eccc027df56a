//! The in-process lease table: live leases grouped by Redis key, plus releases still queued.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

const SHARDS: usize = 16;

/// Locks `m`, poisoned or not (a poisoned lock's data is taken as it is).
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) struct Table {
    shards: Box<[Mutex<HashMap<Arc<str>, Slots>>]>,
}

#[derive(Default)]
pub(super) struct Slots {
    live: HashSet<u64>,
    /// Dropped leases whose `ZREM` is queued: the next acquire of this key removes them first.
    releasing: Vec<u64>,
}

impl Table {
    pub(super) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    pub(super) fn shard(&self, key: &str) -> &Mutex<HashMap<Arc<str>, Slots>> {
        let mut h: u32 = 0x811c_9dc5;
        for b in key.as_bytes() {
            h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
        }
        &self.shards[h as usize % SHARDS]
    }

    pub(super) fn insert(&self, key: &Arc<str>, id: u64) {
        lock(self.shard(key))
            .entry(key.clone())
            .or_default()
            .live
            .insert(id);
    }

    /// Moves a live lease to "releasing" (when `queued`) or forgets it; false if it was not
    /// live (taken by shutdown).
    pub(super) fn release(&self, key: &Arc<str>, id: u64, queued: bool) -> bool {
        let mut map = lock(self.shard(key));
        let Some(slots) = map.get_mut(key) else {
            return false;
        };
        if !slots.live.remove(&id) {
            return false;
        }
        if queued {
            slots.releasing.push(id);
        } else if slots.releasing.is_empty() && slots.live.is_empty() {
            map.remove(key);
        }
        true
    }

    /// Forgets queued releases once their `ZREM` was sent (or failed).
    pub(super) fn released(&self, key: &Arc<str>, ids: &[u64]) {
        let mut map = lock(self.shard(key));
        if let Some(slots) = map.get_mut(key) {
            slots.releasing.retain(|id| !ids.contains(id));
            if slots.releasing.is_empty() && slots.live.is_empty() {
                map.remove(key);
            }
        }
    }

    pub(super) fn releasing(&self, key: &str) -> Vec<u64> {
        lock(self.shard(key))
            .get(key)
            .map(|s| s.releasing.clone())
            .unwrap_or_default()
    }

    pub(super) fn releasing_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| lock(s).values().map(|v| v.releasing.len()).sum::<usize>())
            .sum()
    }

    pub(super) fn live_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| lock(s).values().map(|v| v.live.len()).sum::<usize>())
            .sum()
    }

    /// Live leases grouped by key (for the heartbeat).
    pub(super) fn snapshot(&self) -> Vec<(Arc<str>, Vec<u64>)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let map = lock(shard);
            out.extend(
                map.iter()
                    .filter(|(_, s)| !s.live.is_empty())
                    .map(|(k, s)| (k.clone(), s.live.iter().copied().collect())),
            );
        }
        out
    }

    /// How many of `ids` are still live (not released since they were read).
    pub(super) fn count_live(&self, key: &Arc<str>, ids: &[u64]) -> usize {
        lock(self.shard(key))
            .get(key)
            .map(|s| ids.iter().filter(|id| s.live.contains(id)).count())
            .unwrap_or(0)
    }

    pub(super) fn snapshot_key(&self, key: &Arc<str>) -> Vec<u64> {
        lock(self.shard(key))
            .get(key)
            .map(|s| s.live.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Takes every live lease out of the table (for the shutdown clean-up): a lease dropped
    /// afterwards finds nothing to release.
    pub(super) fn take_all(&self) -> Vec<(Arc<str>, Vec<u64>)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let mut map = lock(shard);
            map.retain(|k, s| {
                if !s.live.is_empty() {
                    out.push((k.clone(), s.live.drain().collect()));
                }
                !s.releasing.is_empty()
            });
        }
        out
    }
}
