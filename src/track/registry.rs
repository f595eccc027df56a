//! The set of live streams, shared by every `TrackLayer` of one controller.
//!
//! Streams are kept in shards, one per worker thread (assigned to a thread on its first
//! registration), so that registering and ending a request touches only memory the thread
//! already owns: one uncontended lock of its own shard, no counter shared by every core. A
//! stream's id carries its shard in the low bits, so it ends in the shard it began in even
//! when its body is dropped on another thread.
//!
//! The drain accounting is exact and lock-step with the shards (the idea of tokio-util's
//! `TaskTracker`, with the shard's lock as the unit of atomicity): [`close`](Registry::close),
//! [`force`](Registry::force) and [`stop`](Registry::stop) flag each shard under its lock, and
//! each shard keeps its own counts, so every stream lands in exactly one bucket — ended before
//! `Closing`, ended gracefully, or force-closed — and the figures add up stream by stream:
//!
//! ```text
//! streams_at_drain + opened_while_closing == closed_gracefully + force_closed
//! ```
//!
//! A stream opened after the grace deadline counts as opened while closing and as force-closed
//! (the deadline has passed: its body ends at once); one still open at `stop` without a
//! deadline having passed counts as force-closed too. `stop` freezes the counts for the report.
//! From `Closing` on, one signed counter of the streams still open (those counted by `close`
//! and those registered later, less those ended since) decides "closed and empty" in a single
//! atomic word, so `wait_idle` is ABA-safe.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Shards per registry (a power of two; a stream id's low bits name its shard).
const SHARD_BITS: u32 = 5;
const SHARDS: usize = 1 << SHARD_BITS;

/// Hashes the registry's keys, unique ids chosen by the registry itself (not by clients, so no
/// flooding concern): one multiply-fold instead of SipHash on every register and deregister.
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
        // Ids in one shard share their low bits (the shard's number): fold the full product
        // so every bit of the id reaches the bits the table uses.
        let p = u128::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = (p as u64) ^ ((p >> 64) as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

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

/// One shard: its streams and the drain flags, behind one lock. Aligned to two cache lines
/// so that shards used by different threads never share one.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(Mutex<ShardState>);

#[derive(Debug, Default)]
struct ShardState {
    /// `Closing` has begun (set by [`Registry::close`]).
    closing: bool,
    /// The grace deadline has passed (set by [`Registry::force`]).
    forced: bool,
    /// The report's counts are final (set by [`Registry::stop`]).
    stopped: bool,
    /// Streams registered after `Closing` began (until `stop`).
    late: u64,
    /// Streams ended after `Closing` began and before the deadline.
    graceful: u64,
    /// Streams open at the deadline, registered after it, or open at `stop`.
    forced_n: u64,
    /// The next id's sequence number in this shard.
    next: u64,
    live: HashMap<u64, Entry, BuildHasherDefault<IdHasher>>,
}

#[derive(Debug)]
pub(crate) struct Registry {
    shards: Box<[Shard]>,
    /// From `Closing` on: streams counted by `close`, plus those registered later, less those
    /// ended since. Signed: an end may be subtracted before `close` has added its count.
    open: AtomicI64,
    /// Set once `close` has added its count to `open` (so `open` is exact from then on).
    closed: AtomicBool,
    idle: Notify,
    epoch: Instant,
}

/// The drain's counts (see the module docs for the identity they satisfy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Streams registered after `Closing` began.
    pub(crate) late: u64,
    /// Streams ended after `Closing` began, before the deadline.
    pub(crate) graceful: u64,
    /// Streams force-closed.
    pub(crate) forced: u64,
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

/// The shard of the calling thread: threads take shards in turn on their first registration,
/// so each worker of a runtime with up to [`SHARDS`] workers has one of its own.
fn thread_shard() -> usize {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    thread_local! {
        static SHARD: Cell<u32> = const { Cell::new(u32::MAX) };
    }
    SHARD.with(|s| {
        let mut n = s.get();
        if n == u32::MAX {
            n = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS as u32;
            s.set(n);
        }
        n as usize
    })
}

impl Registry {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            open: AtomicI64::new(0),
            closed: AtomicBool::new(false),
            idle: Notify::new(),
            epoch: Instant::now(),
        }
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, ShardState> {
        // A panic while holding a shard lock cannot leave it inconsistent (one insert or
        // remove, flags set by plain stores), so a poisoned lock is still usable; never
        // panic here, we may be in a Drop.
        self.shards[shard]
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a stream and returns its id.
    pub(crate) fn register(&self, mut entry: Entry) -> u64 {
        entry.started = (Instant::now() - self.epoch).as_nanos() as u64;
        let shard = thread_shard();
        let mut s = self.lock(shard);
        let id = (s.next << SHARD_BITS) | shard as u64;
        s.next += 1;
        s.live.insert(id, entry);
        let late = s.closing;
        if late && !s.stopped {
            s.late += 1;
            if s.forced {
                // Past the deadline: its body ends at once.
                s.forced_n += 1;
            }
        }
        drop(s);
        if late {
            self.open.fetch_add(1, Ordering::AcqRel);
        }
        id
    }

    /// How long the stream of `entry` has been open at `now`.
    pub(crate) fn age(&self, entry: &Entry, now: Instant) -> Duration {
        now.saturating_duration_since(self.epoch + Duration::from_nanos(entry.started))
    }

    /// Removes a stream; returns how its end counted and its entry. Must be called exactly
    /// once per `register`.
    pub(crate) fn deregister(&self, id: u64) -> (Ended, Option<Entry>) {
        let mut s = self.lock((id as usize) & (SHARDS - 1));
        let entry = s.live.remove(&id);
        let (closing, forced) = (s.closing, s.forced);
        if closing && !forced && !s.stopped {
            s.graceful += 1;
        }
        drop(s);
        if !closing {
            return (Ended::BeforeDrain, entry);
        }
        let ended = if forced {
            Ended::Forced
        } else {
            Ended::Gracefully
        };
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
        (ended, entry)
    }

    /// Streams open now.
    pub(crate) fn active(&self) -> u64 {
        (0..SHARDS).map(|i| self.lock(i).live.len() as u64).sum()
    }

    /// Marks the start of `Closing`; returns the streams open at that moment (each shard's at
    /// the moment its flag was set). Called once.
    pub(crate) fn close(&self) -> u64 {
        let n = self.flag_each(|s| s.closing = true);
        self.open.fetch_add(n as i64, Ordering::AcqRel);
        self.closed.store(true, Ordering::Release);
        if self.open.load(Ordering::Acquire) == 0 {
            // Already empty: wake `wait_idle`, which was waiting for the closing flag.
            self.idle.notify_waiters();
        }
        n
    }

    /// Marks the grace deadline; returns the streams still open (the force-closed ones).
    pub(crate) fn force(&self) -> u64 {
        self.flag_each(|s| {
            if !s.forced && !s.stopped {
                s.forced = true;
                s.forced_n += s.live.len() as u64;
            }
        })
    }

    /// Freezes the counts for the report: streams still open and not yet counted (no deadline
    /// passed) count as force-closed; nothing registered or ended later changes the counts.
    pub(crate) fn stop(&self) -> Counts {
        let mut c = Counts::default();
        for i in 0..SHARDS {
            let mut s = self.lock(i);
            if !s.stopped {
                if !s.forced {
                    s.forced_n += s.live.len() as u64;
                }
                s.stopped = true;
            }
            c.late += s.late;
            c.graceful += s.graceful;
            c.forced += s.forced_n;
        }
        c
    }

    /// Sets a drain flag in each shard under its lock; returns the streams each shard held at
    /// that moment.
    fn flag_each(&self, set: impl Fn(&mut ShardState)) -> u64 {
        (0..SHARDS)
            .map(|i| {
                let mut s = self.lock(i);
                set(&mut s);
                s.live.len() as u64
            })
            .sum()
    }

    /// The counts so far (final once [`stop`](Self::stop) has run).
    #[cfg(test)]
    pub(crate) fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for i in 0..SHARDS {
            let s = self.lock(i);
            c.late += s.late;
            c.graceful += s.graceful;
            c.forced += s.forced_n;
        }
        c
    }

    /// Closing has begun and no stream is open: one load of one word (after the flag), so
    /// a stream registered after the count first reached zero keeps it false.
    fn is_idle(&self) -> bool {
        self.closed.load(Ordering::Acquire) && self.open.load(Ordering::Acquire) == 0
    }

    /// Resolves once closing has begun and no stream is open (checked, not assumed: a stream
    /// registered after the count first reached zero keeps it waiting). Any number of callers
    /// may wait at once.
    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a wake between the check and the await is kept.
            notified.as_mut().enable();
            if self.is_idle() {
                return;
            }
            notified.await;
        }
    }

    /// Calls `f` for every live stream (for logging; locks one shard at a time).
    pub(crate) fn for_each(&self, mut f: impl FnMut(u64, &Entry)) {
        for i in 0..SHARDS {
            for (id, e) in self.lock(i).live.iter() {
                f(*id, e);
            }
        }
    }
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
        assert_eq!(r.counts().late, 1);
        assert_eq!(r.deregister(b).0, Ended::Gracefully);
        assert_eq!(r.force(), 2);
        assert_eq!(r.deregister(c).0, Ended::Forced);
        assert_eq!(r.deregister(d).0, Ended::Forced);
        // Opened after the deadline: late and forced.
        let e = r.register(entry());
        let c = r.stop();
        assert_eq!(
            c,
            Counts {
                late: 2,
                graceful: 1,
                forced: 3
            }
        );
        // Frozen: later streams change nothing.
        r.deregister(e);
        let f = r.register(entry());
        r.deregister(f);
        assert_eq!(r.counts(), c);
        assert_eq!(r.active(), 0);
    }

    #[tokio::test]
    async fn streams_open_at_stop_without_a_deadline_count_as_forced() {
        let r = Registry::new();
        let a = r.register(entry());
        assert_eq!(r.close(), 1);
        r.deregister(a);
        // A late stream (an exempt route) still open when the drain stops.
        let _b = r.register(entry());
        assert_eq!(
            r.stop(),
            Counts {
                late: 1,
                graceful: 1,
                forced: 1
            }
        );
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
    #[tokio::test]
    async fn every_waiter_of_wait_idle_wakes() {
        let r = Arc::new(Registry::new());
        let a = r.register(entry());
        let mut waiters: Vec<_> = (0..3)
            .map(|_| {
                let r = r.clone();
                tokio_test::task::spawn(async move { r.wait_idle().await })
            })
            .collect();
        r.close();
        for w in &mut waiters {
            tokio_test::assert_pending!(w.poll());
        }
        r.deregister(a);
        for w in &mut waiters {
            assert!(w.is_woken());
            tokio_test::assert_ready!(w.poll());
        }
    }

    /// Deregisters `ids` from threads taking `chunk` each; every one must end as `expected`.
    fn deregister_from_threads(r: &Registry, ids: &[u64], chunk: usize, expected: Ended) {
        std::thread::scope(|s| {
            for chunk in ids.chunks(chunk) {
                s.spawn(move || {
                    for id in chunk {
                        assert_eq!(r.deregister(*id).0, expected);
                    }
                });
            }
        });
    }

    #[test]
    fn streams_of_many_threads_are_counted_exactly() {
        // Each thread registers in its own shard and ends some of its streams on other
        // threads; the buckets still add up stream by stream.
        let r = Arc::new(Registry::new());
        let ids: Vec<Vec<u64>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..100).map(|_| r.register(entry())).collect::<Vec<_>>()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let shards: std::collections::HashSet<u64> =
            ids.iter().map(|v| v[0] & (SHARDS as u64 - 1)).collect();
        // Threads take shards in turn (other tests' threads may take some in between).
        assert!(shards.len() > 1, "threads share one shard: {shards:?}");
        let all: Vec<u64> = ids.into_iter().flatten().collect();
        assert_eq!(r.active(), 800);
        // 200 end before closing, 300 after it (gracefully), 300 are left for the deadline.
        let (before, rest) = all.split_at(200);
        let (graceful, forced) = rest.split_at(300);
        deregister_from_threads(&r, before, 50, Ended::BeforeDrain);
        assert_eq!(r.close(), 600);
        deregister_from_threads(&r, graceful, 75, Ended::Gracefully);
        let late = std::thread::spawn({
            let r = r.clone();
            move || r.register(entry())
        })
        .join()
        .unwrap();
        assert_eq!((r.counts().late, r.active()), (1, 301));
        assert!(!r.is_idle());
        assert_eq!(r.force(), 301);
        for id in forced.iter().chain([&late]) {
            assert_eq!(r.deregister(*id).0, Ended::Forced);
        }
        let c = r.stop();
        assert_eq!(
            c,
            Counts {
                late: 1,
                graceful: 300,
                forced: 301
            }
        );
        assert_eq!(600 + c.late, c.graceful + c.forced);
        assert_eq!(r.active(), 0);
        assert!(r.is_idle());
    }
}
