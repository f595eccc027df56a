use std::collections::HashMap;
use std::future::{ready, Ready};
use std::sync::{Arc, Mutex};

use super::{ConnectionStore, Lease, LeaseInner, StoreError};

const SHARDS: usize = 16;

/// Per-key stream counts in this process (the default store).
///
/// A sharded map with one short critical section per acquire and per release; a key's entry
/// is removed when its last lease is dropped, so memory follows the number of keys with open
/// streams.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower_drain::track::{ConnectionStore, MemoryStore};
/// let store = MemoryStore::new();
/// let a = store.acquire("alice", 1).await.unwrap();
/// assert!(a.is_some());
/// assert!(store.acquire("alice", 1).await.unwrap().is_none()); // at the limit
/// assert_eq!(store.held("alice"), 1);
/// drop(a);
/// assert_eq!(store.held("alice"), 0);
/// # }
/// ```
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<HashMap<Arc<str>, u32>>]>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl Inner {
    fn shard(&self, key: &str) -> &Mutex<HashMap<Arc<str>, u32>> {
        // FNV-1a: cheap and good enough to spread keys over a few shards.
        let mut h: u32 = 0x811c_9dc5;
        for b in key.as_bytes() {
            h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
        }
        &self.shards[h as usize % SHARDS]
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryStore {
    /// An empty store.
    ///
    /// ```
    /// assert_eq!(tower_drain::track::MemoryStore::new().held("anyone"), 0);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Slots currently held for `key`.
    ///
    /// ```
    /// assert_eq!(tower_drain::track::MemoryStore::new().held("bob"), 0);
    /// ```
    pub fn held(&self, key: &str) -> u32 {
        lock(self.inner.shard(key)).get(key).copied().unwrap_or(0)
    }
}

impl ConnectionStore for MemoryStore {
    type Future = Ready<Result<Option<Lease>, StoreError>>;

    fn acquire(&self, key: &str, limit: u32) -> Self::Future {
        let mut map = lock(self.inner.shard(key));
        let granted = match map.get_mut(key) {
            Some(n) if *n >= limit => None,
            Some(n) => {
                *n += 1;
                Some(())
            }
            None if limit == 0 => None,
            None => {
                map.insert(Arc::from(key), 1);
                Some(())
            }
        };
        drop(map);
        ready(Ok(granted.map(|()| {
            Lease::from_inner(LeaseInner::Memory(MemoryLease {
                store: self.inner.clone(),
                key: Arc::from(key),
            }))
        })))
    }

    fn store_id(&self) -> Option<usize> {
        Some(Arc::as_ptr(&self.inner) as usize)
    }
}

pub(crate) struct MemoryLease {
    store: Arc<Inner>,
    key: Arc<str>,
}

impl Drop for MemoryLease {
    fn drop(&mut self) {
        let mut map = lock(self.store.shard(&self.key));
        if let Some(n) = map.get_mut(&*self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&*self.key);
            }
        }
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn limit_holds_under_contention_and_keys_are_independent() {
        let store = MemoryStore::new();
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let s = store.clone();
            tasks.push(tokio::spawn(
                async move { s.acquire("k", 5).await.unwrap() },
            ));
        }
        let mut leases = Vec::new();
        for t in tasks {
            if let Some(l) = t.await.unwrap() {
                leases.push(l);
            }
        }
        assert_eq!(leases.len(), 5);
        assert_eq!(store.held("k"), 5);
        assert!(store.acquire("other", 5).await.unwrap().is_some());
        leases.pop();
        assert_eq!(store.held("k"), 4);
        assert!(store.acquire("k", 5).await.unwrap().is_some());
        assert_eq!(store.held("k"), 4, "the granted lease was dropped at once");
        drop(leases);
        assert_eq!(store.held("k"), 0);
        assert!(store.inner.shards.iter().all(|s| lock(s).is_empty()));
    }

    #[tokio::test]
    async fn zero_limit_admits_nothing() {
        assert!(MemoryStore::new().acquire("k", 0).await.unwrap().is_none());
    }
}
