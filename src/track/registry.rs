//! The set of live streams, shared by every `TrackLayer` of one controller.
//!
//! One atomic word holds the count and two flags (`CLOSING`, `FORCED`), so "how many were open
//! when closing began", "which ended gracefully" and "which were still open at the deadline"
//! are decided without locks and each stream lands in exactly one bucket (the idea of
//! tokio-util's `TaskTracker`). Per-stream details live in a sharded map for logging.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

const CLOSING: u64 = 0b01;
const FORCED: u64 = 0b10;
const ONE: u64 = 0b100;
const SHARDS: usize = 32;

/// Hashes the registry's keys, unique sequential ids chosen by the registry itself (not by
/// clients, so no flooding concern): one multiply-fold instead of SipHash on every register
/// and deregister.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    #[inline]
    fn write_u64(&mut self, id: u64) {
        // Ids in one shard share their low bits (`id % SHARDS`): fold the full product so
        // every bit of the id reaches the bits the table uses.
        let p = u128::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = (p as u64) ^ ((p >> 64) as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

type Shard = Mutex<HashMap<u64, Entry, BuildHasherDefault<IdHasher>>>;

/// What the registry keeps of a live stream, for the force-close log.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) route: crate::route::RoutePath,
    pub(crate) key: Option<Arc<str>>,
    /// Nanoseconds from the registry's epoch to the stream's start (8 bytes, not an
    /// `Instant`'s 16: there is one entry per open stream).
    started: u64,
}

impl Entry {
    pub(crate) fn new(route: crate::route::RoutePath, key: Option<Arc<str>>) -> Self {
        Self {
            route,
            key,
            started: 0,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Registry {
    state: AtomicU64,
    next_id: AtomicU64,
    graceful: AtomicU64,
    late: AtomicU64,
    idle: Notify,
    shards: Box<[Shard]>,
    epoch: Instant,
}

/// How a stream's end counted in the drain accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Ended before `Closing` began.
    BeforeDrain,
    /// Ended after `Closing` began and before the deadline.
    Gracefully,
    /// Was still open at the deadline (already counted as force-closed).
    Forced,
}

impl Registry {
    pub(crate) fn new() -> Self {
        Self {
            state: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            graceful: AtomicU64::new(0),
            late: AtomicU64::new(0),
            idle: Notify::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            epoch: Instant::now(),
        }
    }

    fn shard(&self, id: u64) -> &Shard {
        &self.shards[(id as usize) % SHARDS]
    }

    /// Registers a stream and returns its id.
    pub(crate) fn register(&self, mut entry: Entry) -> u64 {
        entry.started = (Instant::now() - self.epoch).as_nanos() as u64;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(self.shard(id)).insert(id, entry);
        let prev = self.state.fetch_add(ONE, Ordering::AcqRel);
        if prev & CLOSING != 0 {
            self.late.fetch_add(1, Ordering::Relaxed);
        }
        id
    }

    /// Removes a stream. Must be called exactly once per `register`.
    /// How long the stream of `entry` has been open at `now`.
    pub(crate) fn age(&self, entry: &Entry, now: Instant) -> Duration {
        now.saturating_duration_since(self.epoch + Duration::from_nanos(entry.started))
    }

    /// Removes a stream; returns how its end counted and its entry.
    pub(crate) fn deregister(&self, id: u64) -> (Ended, Option<Entry>) {
        let entry = lock(self.shard(id)).remove(&id);
        let prev = self.state.fetch_sub(ONE, Ordering::AcqRel);
        let ended = if prev & FORCED != 0 {
            Ended::Forced
        } else if prev & CLOSING != 0 {
            self.graceful.fetch_add(1, Ordering::Relaxed);
            Ended::Gracefully
        } else {
            Ended::BeforeDrain
        };
        if prev >> 2 == 1 {
            self.idle.notify_one();
        }
        (ended, entry)
    }

    pub(crate) fn active(&self) -> u64 {
        self.state.load(Ordering::Acquire) >> 2
    }

    /// Marks the start of `Closing`; returns the streams open at that instant.
    pub(crate) fn close(&self) -> u64 {
        let n = self.state.fetch_or(CLOSING, Ordering::AcqRel) >> 2;
        if n == 0 {
            // Already empty: wake `wait_idle`, which was waiting for the closing flag.
            self.idle.notify_one();
        }
        n
    }

    /// Marks the grace deadline; returns the streams still open (the force-closed ones).
    pub(crate) fn force(&self) -> u64 {
        self.state.fetch_or(FORCED, Ordering::AcqRel) >> 2
    }

    pub(crate) fn graceful(&self) -> u64 {
        self.graceful.load(Ordering::Relaxed)
    }

    pub(crate) fn late(&self) -> u64 {
        self.late.load(Ordering::Relaxed)
    }

    /// Resolves once the count is zero and closing has begun (checked, not assumed: a stream
    /// registered after the count first reached zero keeps it waiting).
    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            let s = self.state.load(Ordering::Acquire);
            if s >> 2 == 0 && s & CLOSING != 0 {
                return;
            }
            notified.await;
        }
    }

    /// Calls `f` for every live stream (for logging; locks one shard at a time).
    pub(crate) fn for_each(&self, mut f: impl FnMut(u64, &Entry)) {
        for shard in self.shards.iter() {
            for (id, e) in lock(shard).iter() {
                f(*id, e);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a shard lock cannot leave the map inconsistent (single insert or
    // remove), so a poisoned lock is still usable; never panic here, we may be in a Drop.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry::new(
            crate::route::RoutePath::new(&http::Uri::from_static("/events")),
            None,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn entries_keep_their_start_and_come_back_on_deregister() {
        let r = Registry::new();
        tokio::time::advance(Duration::from_millis(1500)).await;
        let a = r.register(entry());
        tokio::time::advance(Duration::from_secs(5)).await;
        let mut ages = Vec::new();
        r.for_each(|_, e| ages.push(r.age(e, Instant::now())));
        assert_eq!(ages, [Duration::from_secs(5)]);
        let (ended, e) = r.deregister(a);
        assert_eq!(ended, Ended::BeforeDrain);
        let e = e.expect("the entry comes back once");
        assert_eq!(e.route.path(), "/events");
        assert_eq!(r.age(&e, Instant::now()), Duration::from_secs(5));
        assert_eq!(r.active(), 0);
    }

    #[tokio::test]
    async fn every_stream_lands_in_one_bucket() {
        let r = Registry::new();
        let a = r.register(entry());
        let b = r.register(entry());
        let c = r.register(entry());
        assert_eq!(r.deregister(a).0, Ended::BeforeDrain);
        assert_eq!(r.close(), 2);
        let d = r.register(entry());
        assert_eq!(r.late(), 1);
        assert_eq!(r.deregister(b).0, Ended::Gracefully);
        assert_eq!(r.force(), 2);
        assert_eq!(r.deregister(c).0, Ended::Forced);
        assert_eq!(r.deregister(d).0, Ended::Forced);
        assert_eq!(r.graceful(), 1);
        assert_eq!(r.active(), 0);
    }

    #[tokio::test]
    async fn wait_idle_needs_closing_and_zero() {
        let r = Arc::new(Registry::new());
        let mut idle = tokio_test::task::spawn({
            let r = r.clone();
            async move { r.wait_idle().await }
        });
        tokio_test::assert_pending!(idle.poll());
        let a = r.register(entry());
        r.deregister(a);
        // Zero but not closing: still waiting.
        tokio_test::assert_pending!(idle.poll());
        let b = r.register(entry());
        r.close();
        tokio_test::assert_pending!(idle.poll());
        r.deregister(b);
        assert!(idle.is_woken());
        tokio_test::assert_ready!(idle.poll());
    }
}
