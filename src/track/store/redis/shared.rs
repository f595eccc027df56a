//! State shared by the store's clones, its leases and its background tasks.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::Counter;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::conn::{slot_of, Conn, SlotMap};
use super::table::Table;

/// Bytes of a user key kept as they are in its Redis key; every other byte is percent-encoded.
const ESCAPED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'@')
    .remove(b':');

pub(super) struct Shared {
    /// Cancelled at shutdown: stops the background tasks (see `tasks`).
    pub(super) cancel: CancellationToken,
    pub(super) shut: AtomicBool,
    pub(super) tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    pub(super) instance: String,
    pub(super) prefix: String,
    pub(super) ttl_ms: i64,
    pub(super) heartbeat: Duration,
    pub(super) sweep: Duration,
    pub(super) acquire_timeout: Duration,
    pub(super) command_timeout: Duration,
    pub(super) release_batch: usize,
    pub(super) sweep_batch: usize,
    pub(super) cleanup_batch: usize,
    pub(super) cleanup_max_iterations: u32,
    pub(super) cleanup_timeout: Duration,
    pub(super) conn: Conn,
    /// The cluster's slot map (unused on a single node).
    pub(super) slot_map: SlotMap,
    pub(super) next_id: AtomicU64,
    pub(super) table: Table,
    pub(super) release_tx: mpsc::Sender<Release>,
    pub(super) clock: Clock,
    /// Highest lease score this store has written; heartbeat scores are always above it, so
    /// `ZADD XX CH` changes (and counts) every member that still exists.
    pub(super) max_score: AtomicI64,
    /// Set once a server rejected `PEXPIRE … GT` (Redis < 7): plain `PEXPIRE` from then on.
    pub(super) legacy_expire: AtomicBool,
    /// Held while releases are sent and while lost leases are re-added, so a re-add never
    /// lands after the release of a lease it read as live.
    pub(super) order: tokio::sync::Mutex<()>,
    pub(super) last_warn_ms: AtomicI64,
    pub(super) errors: OpErrors,
    pub(super) stale_cleaned: Counter,
}

/// A release queued for the release task.
pub(super) struct Release {
    pub(super) key: Arc<str>,
    pub(super) id: u64,
}

/// The background operations whose failures count in `tower_drain_store_errors_total{op}`
/// (acquire failures are counted by `TrackLayer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Release,
    Heartbeat,
    Sweep,
    Cleanup,
}

pub(super) struct OpErrors {
    release: Counter,
    heartbeat: Counter,
    sweep: Counter,
    cleanup: Counter,
}

impl OpErrors {
    pub(super) fn new() -> Self {
        let c =
            |op: &'static str| metrics::counter!(crate::metrics::STORE_ERRORS_TOTAL, "op" => op);
        Self {
            release: c("release"),
            heartbeat: c("heartbeat"),
            sweep: c("sweep"),
            cleanup: c("cleanup"),
        }
    }

    fn get(&self, op: Op) -> &Counter {
        match op {
            Op::Release => &self.release,
            Op::Heartbeat => &self.heartbeat,
            Op::Sweep => &self.sweep,
            Op::Cleanup => &self.cleanup,
        }
    }
}

/// Redis clock minus local clock, in ms: one entry for a single node, one per hash slot on a
/// cluster (each slot's primary has its own clock). `i64::MIN` until Redis has answered.
pub(super) struct Clock {
    offsets: Box<[AtomicI64]>,
}

impl Clock {
    pub(super) fn new(cluster: bool) -> Self {
        let n = if cluster { 16_384 } else { 1 };
        Self {
            offsets: (0..n).map(|_| AtomicI64::new(i64::MIN)).collect(),
        }
    }

    fn entry(&self, slot: u16) -> &AtomicI64 {
        &self.offsets[usize::from(slot) % self.offsets.len()]
    }

    pub(super) fn note(&self, slot: u16, redis_ms: i64) {
        self.entry(slot)
            .store(redis_ms - local_ms(), Ordering::Relaxed);
    }

    /// The clock of the node owning `slot`, as best known here.
    pub(super) fn now(&self, slot: u16) -> i64 {
        match self.entry(slot).load(Ordering::Relaxed) {
            i64::MIN => local_ms(),
            off => local_ms() + off,
        }
    }
}

pub(super) fn local_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// 64 random bits from the std hasher's per-process random keys, the time, the pid and a
/// counter (two stores in one process differ too), as 16 hex digits.
pub(super) fn new_instance_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.write_u64(SEQ.fetch_add(1, Ordering::Relaxed));
    format!("{:016x}", h.finish())
}

/// Appends `key` with every byte outside `[A-Za-z0-9_.~@:-]` percent-encoded (upper-case hex).
pub(super) fn escape_key(out: &mut String, key: &str) {
    out.extend(percent_encoding::utf8_percent_encode(key, ESCAPED));
}

impl Shared {
    /// Runs `round` every `period`, the first time one `period` from now, until the store
    /// shuts down (which also abandons a round under way).
    pub(super) async fn every<F: Future>(&self, period: Duration, mut round: impl FnMut() -> F) {
        let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                _ = ticks.tick() => {
                    tokio::select! {
                        _ = self.cancel.cancelled() => break,
                        _ = round() => {}
                    }
                }
            }
        }
    }

    pub(super) fn redis_key(&self, key: &str) -> String {
        let mut s = String::with_capacity(self.prefix.len() + key.len() + 3);
        s.push_str(&self.prefix);
        s.push_str(":{");
        escape_key(&mut s, key);
        s.push('}');
        s
    }

    pub(super) fn member(&self, id: u64) -> String {
        let mut m = String::with_capacity(self.instance.len() + 21);
        self.write_member(&mut m, id);
        m
    }

    /// Writes the member of lease `id` into `buf` (cleared first), to reuse one buffer.
    pub(super) fn write_member<'b>(&self, buf: &'b mut String, id: u64) -> &'b str {
        use std::fmt::Write as _;
        buf.clear();
        buf.push_str(&self.instance);
        let _ = write!(buf, ":{id}");
        buf
    }

    /// The hash slot of a Redis key (0 on a single node, where there is one clock).
    pub(super) fn slot(&self, key: &str) -> u16 {
        if self.conn.is_cluster() {
            slot_of(key)
        } else {
            0
        }
    }

    /// Counts a background failure of `op` and logs it at most once per heartbeat interval.
    pub(super) fn fail(&self, op: Op, what: &'static str, err: &dyn fmt::Display) {
        self.errors.get(op).increment(1);
        self.warn(what, err);
    }

    /// Logs a failure at most once per heartbeat interval (acquire failures are counted by
    /// `TrackLayer`, so only logged here).
    pub(super) fn warn(&self, what: &'static str, err: &dyn fmt::Display) {
        let now = local_ms();
        let last = self.last_warn_ms.load(Ordering::Relaxed);
        let every = self.heartbeat.as_millis() as i64;
        if (last == i64::MIN || now - last >= every)
            && self
                .last_warn_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(error = %err, instance = %self.instance, "tower-drain redis store: {what} failed");
        }
    }

    /// A lease score (expiry) for a heartbeat of a key in `slot`: `now + ttl` on the clock of
    /// the node owning it, and above every score written before, reserved atomically so two
    /// heartbeats never write the same one.
    pub(super) fn next_score(&self, slot: u16) -> i64 {
        let want = self.clock.now(slot).saturating_add(self.ttl_ms);
        let mut cur = self.max_score.load(Ordering::Relaxed);
        loop {
            let next = want.max(cur + 1);
            match self.max_score.compare_exchange_weak(
                cur,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Adds the settings a `Debug` of the store shows to `d`.
    pub(super) fn debug_settings<'a, 'b, 'c>(
        &self,
        d: &'a mut fmt::DebugStruct<'b, 'c>,
    ) -> &'a mut fmt::DebugStruct<'b, 'c> {
        d.field("instance", &self.instance)
            .field("prefix", &self.prefix)
            .field("lease_ttl_ms", &self.ttl_ms)
            .field("heartbeat", &self.heartbeat)
    }

    pub(super) fn conn(&self) -> Conn {
        self.conn.clone()
    }
}
