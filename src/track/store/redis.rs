//! [`RedisStore`]: per-key stream limits shared by every process that uses one Redis.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Script, Value};
use metrics::Counter;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{ConnectionStore, Lease, LeaseInner, StoreError};
use crate::controller::CleanupSummary;

const SHARDS: usize = 16;

/// `KEYS[1]` = the key's sorted set; `ARGV` = member, limit, ttl ms, then members of this
/// instance whose release is still queued (removed first, so a release is effective at once).
/// Returns `{granted (0|1), redis now ms, leases held after the call}`.
const ACQUIRE_LUA: &str = r"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = KEYS[1]
local ttl = tonumber(ARGV[3])
for i = 4, #ARGV do redis.call('ZREM', key, ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local n = redis.call('ZCARD', key)
if n >= tonumber(ARGV[2]) then return {0, now, n} end
redis.call('ZADD', key, now + ttl, ARGV[1])
redis.call('PEXPIRE', key, ttl)
return {1, now, n + 1}
";

static ACQUIRE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ACQUIRE_LUA));

/// Per-key stream limits across every process sharing one Redis (feature `redis`).
///
/// Leases live in Redis sorted sets and expire by themselves unless this process's heartbeat
/// refreshes them, so a process that dies without cleaning up stops holding slots after the
/// lease TTL. See [`RedisStoreBuilder`] for the settings and their defaults.
///
/// Building the store does not connect: it starts while Redis is unreachable and (re)connects
/// by itself. While Redis is unreachable or slower than the acquire timeout, `acquire` returns a
/// [`StoreError`] and [`TrackLayer`](crate::track::TrackLayer) fails open (serve and count
/// `tower_drain_store_errors_total`, the default) or closed (`503`), as configured with
/// [`on_store_error`](crate::track::TrackLayer::on_store_error).
///
/// Clones share one connection, one lease table and one pair of background tasks (release,
/// heartbeat + sweep); the tasks stop when the last clone is dropped or after
/// [`shutdown`](ConnectionStore::shutdown).
///
/// # Data model
///
/// No counters. Each open stream holds a **lease**: a member `<instance-id>:<stream-id>` of the
/// sorted set `<prefix>:{<escaped key>}`, scored by the lease's expiry in Unix milliseconds of
/// the Redis clock. The instance id is random per store (so per process start): a restarted
/// process never reuses its predecessor's members. Every command touches exactly one key, and the
/// user key sits inside the hash tag, so Redis Cluster works.
///
/// - **acquire**: one `EVALSHA` (the script is loaded on `NOSCRIPT`, e.g. after a Redis restart)
///   that reads `TIME`, drops the key's expired leases, counts, adds the lease only under the
///   limit and moves the key's expiry.
/// - **release**: the lease's `Drop` hands `(key, member)` to one background task over a bounded
///   channel; the task sends one `ZREM` per key per batch. Until it has, the next acquire of
///   that key from this store removes the member in its script, so a release is effective at
///   once. When the channel is full the release
///   is counted in `tower_drain_store_errors_total` and the lease expires by its TTL.
/// - **heartbeat**: one background task sends, once per interval, one pipeline for all of this
///   store's live leases: `TIME`, then per key `ZADD key XX CH <score> <member>…` and
///   `PEXPIRE key <ttl>`. Each heartbeat writes a score never written before, so `ZADD XX CH`
///   counts every member still present ("unchanged" cannot happen); a shortfall means leases are gone (Redis restarted empty, failed over or was
///   flushed) and the missing keys are re-added at once, without a limit check.
/// - **sweep**: every sweep interval the same task `SCAN`s `<prefix>:{*` and removes expired
///   leases (`ZREMRANGEBYSCORE`) in batches.
/// - **shutdown**: [`ConnectionStore::shutdown`] stops the tasks and `ZREM`s every lease still
///   held, in batches grouped by key, until none remain or the iteration cap is reached.
///
/// # Example
///
/// ```no_run
/// use tower_drain::{DrainController, DrainStack};
/// use tower_drain::track::{ConnectionStore, RedisStore};
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let drain = DrainController::new();
/// let store = RedisStore::builder("redis://127.0.0.1:6379/")
///     .lease_ttl(std::time::Duration::from_secs(30))
///     .build()?;
/// let stack = DrainStack::new(drain.watch())
///     .store(store.clone())
///     .max_per_key(3)
///     .key_header(http::HeaderName::from_static("x-client-id"));
///
/// let lease = store.acquire("alice", 3).await?; // what TrackLayer does per request
/// assert!(lease.is_some());
/// # drop(stack); Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    handle: Arc<Handle>,
}

/// Builds a [`RedisStore`]; see [`RedisStore::builder`].
///
/// | setting | default |
/// |---|---|
/// | [`prefix`](Self::prefix) | `tower-drain` |
/// | [`lease_ttl`](Self::lease_ttl) | 30 s |
/// | [`heartbeat_interval`](Self::heartbeat_interval) | `lease_ttl / 3` |
/// | [`acquire_timeout`](Self::acquire_timeout) | 250 ms |
/// | [`command_timeout`](Self::command_timeout) | 2 s |
/// | [`release_queue`](Self::release_queue) | 10 000 |
/// | [`release_batch`](Self::release_batch) | 512 |
/// | [`sweep_interval`](Self::sweep_interval) | `lease_ttl` |
/// | [`sweep_batch`](Self::sweep_batch) | 500 |
/// | [`cleanup_batch`](Self::cleanup_batch) | 1 000 |
/// | [`cleanup_max_iterations`](Self::cleanup_max_iterations) | 1 000 |
/// | [`cleanup_timeout`](Self::cleanup_timeout) | 4 s |
///
/// ```no_run
/// # use std::time::Duration;
/// # #[tokio::main] async fn main() {
/// let store = tower_drain::track::RedisStore::builder("redis://127.0.0.1/")
///     .prefix("my-service:streams")
///     .lease_ttl(Duration::from_secs(20))
///     .acquire_timeout(Duration::from_millis(100))
///     .build()
///     .expect("valid settings");
/// # drop(store); }
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    ttl: Duration,
    heartbeat: Option<Duration>,
    acquire_timeout: Duration,
    command_timeout: Duration,
    release_queue: usize,
    release_batch: usize,
    sweep_interval: Option<Duration>,
    sweep_batch: usize,
    cleanup_batch: usize,
    cleanup_max_iterations: u32,
    cleanup_timeout: Duration,
}

impl RedisStore {
    /// A builder for a store on the Redis at `url` (`redis://[:password@]host[:port][/db]`,
    /// `rediss://…`, `redis+unix:///path`).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let store = tower_drain::track::RedisStore::builder("redis://127.0.0.1:6379/").build().unwrap();
    /// # drop(store); }
    /// ```
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            prefix: "tower-drain".to_owned(),
            ttl: Duration::from_secs(30),
            heartbeat: None,
            acquire_timeout: Duration::from_millis(250),
            command_timeout: Duration::from_secs(2),
            release_queue: 10_000,
            release_batch: 512,
            sweep_interval: None,
            sweep_batch: 500,
            cleanup_batch: 1_000,
            cleanup_max_iterations: 1_000,
            cleanup_timeout: Duration::from_secs(4),
        }
    }

    /// A store with the default settings; shorthand for `RedisStore::builder(url).build()`.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let store = tower_drain::track::RedisStore::new("redis://127.0.0.1/").unwrap();
    /// # drop(store); }
    /// ```
    pub fn new(url: impl Into<String>) -> Result<Self, StoreError> {
        Self::builder(url).build()
    }

    /// This store's instance id: random per store, the first half of each lease's member.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let store = tower_drain::track::RedisStore::new("redis://127.0.0.1/").unwrap();
    /// assert_eq!(store.instance_id().len(), 16);
    /// # }
    /// ```
    pub fn instance_id(&self) -> &str {
        &self.handle.shared.instance
    }

    /// The Redis key holding the leases of `key`: `<prefix>:{<key>}`, where every byte of `key`
    /// outside `[A-Za-z0-9_.~@:-]` is percent-encoded, so `{`, `}`, spaces or unicode can
    /// neither break the hash tag nor make two keys collide.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let store = tower_drain::track::RedisStore::new("redis://127.0.0.1/").unwrap();
    /// assert_eq!(store.redis_key("alice"), "tower-drain:{alice}");
    /// assert_eq!(store.redis_key("a}b c"), "tower-drain:{a%7Db%20c}");
    /// # }
    /// ```
    pub fn redis_key(&self, key: &str) -> String {
        self.handle.shared.redis_key(key)
    }

    /// Leases this process holds right now (granted and not yet dropped).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let store = tower_drain::track::RedisStore::new("redis://127.0.0.1/").unwrap();
    /// assert_eq!(store.held(), 0);
    /// # }
    /// ```
    pub fn held(&self) -> usize {
        self.handle.shared.table.live_count()
    }

    /// Released leases whose `ZREM` the release task has not yet had answered by Redis (an
    /// acquire of the same key from this store removes them first anyway).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let store = tower_drain::track::RedisStore::new("redis://127.0.0.1/").unwrap();
    /// assert_eq!(store.pending_releases(), 0);
    /// # }
    /// ```
    pub fn pending_releases(&self) -> usize {
        self.handle.shared.table.releasing_count()
    }

    /// Runs one heartbeat now, as the background task does every interval: one pipeline
    /// refreshing every live lease of this store, then re-adding any that Redis lost. Returns
    /// how many were re-added. Useful after a known failover, and in tests and measurements.
    ///
    /// ```no_run
    /// use tower_drain::track::{ConnectionStore, RedisStore};
    /// # #[tokio::main] async fn main() {
    /// let store = RedisStore::new("redis://127.0.0.1/").unwrap();
    /// let _lease = store.acquire("alice", 1).await.unwrap();
    /// assert_eq!(store.heartbeat_now().await, 0); // nothing was lost
    /// # }
    /// ```
    pub async fn heartbeat_now(&self) -> u64 {
        heartbeat(&self.handle.shared).await
    }

    /// Whether [`shutdown`](ConnectionStore::shutdown) has run: the background tasks are
    /// stopped and `acquire` fails.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let store = tower_drain::track::RedisStore::new("redis://127.0.0.1/").unwrap();
    /// assert!(!store.is_shut_down());
    /// # }
    /// ```
    pub fn is_shut_down(&self) -> bool {
        self.handle.shared.shut.load(Ordering::Acquire)
    }
}

impl RedisStoreBuilder {
    /// Prefix of every Redis key (default `tower-drain`); must not contain `{` or `}`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a lease lives without a heartbeat (default 30 s): a crashed process's slots
    /// free themselves after this. At least 10 ms.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How often the heartbeat refreshes this process's leases (default `lease_ttl / 3`); must
    /// be shorter than the TTL.
    pub fn heartbeat_interval(mut self, every: Duration) -> Self {
        self.heartbeat = Some(every);
        self
    }

    /// How long `acquire` may take before it fails with a [`StoreError`] (default 250 ms), so a
    /// slow or unreachable Redis cannot stall request handling.
    pub fn acquire_timeout(mut self, d: Duration) -> Self {
        self.acquire_timeout = d;
        self
    }

    /// Timeout of each background command: release, heartbeat, sweep, clean-up batch, and of
    /// each connection attempt (default 2 s).
    pub fn command_timeout(mut self, d: Duration) -> Self {
        self.command_timeout = d;
        self
    }

    /// Capacity of the release channel between dropped leases and the release task (default
    /// 10 000). When it is full, a release is counted as a store error and the lease expires
    /// by its TTL.
    pub fn release_queue(mut self, n: usize) -> Self {
        self.release_queue = n;
        self
    }

    /// At most this many releases per round trip of the release task (default 512).
    pub fn release_batch(mut self, n: usize) -> Self {
        self.release_batch = n;
        self
    }

    /// How often expired leases (of crashed processes) are swept (default `lease_ttl`);
    /// [`Duration::ZERO`] disables the sweep (acquire still ignores expired leases).
    pub fn sweep_interval(mut self, every: Duration) -> Self {
        self.sweep_interval = Some(every);
        self
    }

    /// Keys per `SCAN` page and per sweep pipeline (default 500).
    pub fn sweep_batch(mut self, n: usize) -> Self {
        self.sweep_batch = n;
        self
    }

    /// Leases released per round trip by the shutdown clean-up (default 1 000).
    pub fn cleanup_batch(mut self, n: usize) -> Self {
        self.cleanup_batch = n;
        self
    }

    /// Maximum number of round trips (iterations) of the shutdown clean-up (default 1 000);
    /// the summary says whether it was reached.
    pub fn cleanup_max_iterations(mut self, n: u32) -> Self {
        self.cleanup_max_iterations = n;
        self
    }

    /// Time budget of the shutdown clean-up (default 4 s, under the controller's 5 s clean-up
    /// timeout so the summary always reaches the report).
    pub fn cleanup_timeout(mut self, d: Duration) -> Self {
        self.cleanup_timeout = d;
        self
    }

    /// Validates the settings and starts the background tasks. Does not connect: the
    /// connection is made on first use and remade after failures.
    ///
    /// Fails on an invalid URL or setting, or when called outside a Tokio runtime.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let err = tower_drain::track::RedisStore::builder("redis://127.0.0.1/")
    ///     .prefix("bad{prefix}")
    ///     .build()
    ///     .unwrap_err();
    /// assert!(err.to_string().contains("prefix"));
    /// # }
    /// ```
    pub fn build(self) -> Result<RedisStore, StoreError> {
        let invalid = |what: &str| {
            Err(StoreError::new(format!(
                "invalid redis store setting: {what}"
            )))
        };
        if self.prefix.contains(['{', '}']) {
            return invalid("prefix must not contain `{` or `}`");
        }
        if self.ttl < Duration::from_millis(10) {
            return invalid("lease_ttl must be at least 10 ms");
        }
        let heartbeat = self.heartbeat.unwrap_or(self.ttl / 3);
        if heartbeat.is_zero() || heartbeat >= self.ttl {
            return invalid(
                "heartbeat_interval must be greater than zero and shorter than lease_ttl",
            );
        }
        if self.acquire_timeout.is_zero() || self.command_timeout.is_zero() {
            return invalid("acquire_timeout and command_timeout must be greater than zero");
        }
        if self.release_queue == 0
            || self.release_batch == 0
            || self.sweep_batch == 0
            || self.cleanup_batch == 0
            || self.cleanup_max_iterations == 0
        {
            return invalid(
                "queue, batch sizes and cleanup_max_iterations must be greater than zero",
            );
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| StoreError::with_source("RedisStore::build needs a Tokio runtime", e))?;
        let client = Client::open(self.url.as_str())
            .map_err(|e| StoreError::with_source("invalid redis url", e))?;
        let conn_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.command_timeout))
            .set_response_timeout(Some(self.command_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = {
            let _enter = runtime.enter();
            ConnectionManager::new_lazy_with_config(client, conn_cfg)
                .map_err(|e| StoreError::with_source("cannot create redis connection manager", e))?
        };
        let (tx, rx) = mpsc::channel(self.release_queue);
        let shared = Arc::new(Shared {
            instance: new_instance_id(),
            prefix: self.prefix,
            ttl_ms: self.ttl.as_millis().max(1) as i64,
            heartbeat,
            sweep: self.sweep_interval.unwrap_or(self.ttl),
            acquire_timeout: self.acquire_timeout,
            command_timeout: self.command_timeout,
            release_batch: self.release_batch,
            sweep_batch: self.sweep_batch,
            cleanup_batch: self.cleanup_batch,
            cleanup_max_iterations: self.cleanup_max_iterations,
            cleanup_timeout: self.cleanup_timeout,
            conn,
            next_id: AtomicU64::new(0),
            table: Table::new(),
            release_tx: tx,
            clock_offset: AtomicI64::new(i64::MIN),
            max_score: AtomicI64::new(0),
            shut: AtomicBool::new(false),
            cancel: CancellationToken::new(),
            last_warn_ms: AtomicI64::new(i64::MIN),
            store_errors: metrics::counter!(crate::metrics::STORE_ERRORS_TOTAL),
            stale_cleaned: metrics::counter!(crate::metrics::STALE_LEASES_CLEANED_TOTAL),
            tasks: Mutex::new(Vec::new()),
        });
        let release = runtime.spawn(release_task(shared.clone(), rx));
        let heartbeat = runtime.spawn(heartbeat_task(shared.clone()));
        *lock(&shared.tasks) = vec![release, heartbeat];
        tracing::debug!(instance = %shared.instance, prefix = %shared.prefix, "redis store started");
        Ok(RedisStore {
            handle: Arc::new(Handle { shared }),
        })
    }
}

/// Owned by the public clones only: when the last one goes, the background tasks stop.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

struct Shared {
    instance: String,
    prefix: String,
    ttl_ms: i64,
    heartbeat: Duration,
    sweep: Duration,
    acquire_timeout: Duration,
    command_timeout: Duration,
    release_batch: usize,
    sweep_batch: usize,
    cleanup_batch: usize,
    cleanup_max_iterations: u32,
    cleanup_timeout: Duration,
    conn: ConnectionManager,
    next_id: AtomicU64,
    table: Table,
    release_tx: mpsc::Sender<Release>,
    /// Redis clock minus local clock, in ms (`i64::MIN` until Redis has answered once).
    clock_offset: AtomicI64,
    /// Highest lease score this store has written; heartbeat scores are always above it, so
    /// `ZADD XX CH` changes (and counts) every member that still exists.
    max_score: AtomicI64,
    shut: AtomicBool,
    cancel: CancellationToken,
    last_warn_ms: AtomicI64,
    store_errors: Counter,
    stale_cleaned: Counter,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

struct Release {
    key: Arc<str>,
    id: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn local_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// 64 random bits from the std hasher's per-process random keys, the time, the pid and a
/// counter (two stores in one process differ too), as 16 hex digits.
fn new_instance_id() -> String {
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

fn escape_key(out: &mut String, key: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in key.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'@' | b':') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
}

impl Shared {
    fn redis_key(&self, key: &str) -> String {
        let mut s = String::with_capacity(self.prefix.len() + key.len() + 3);
        s.push_str(&self.prefix);
        s.push_str(":{");
        escape_key(&mut s, key);
        s.push('}');
        s
    }

    fn member(&self, id: u64) -> String {
        let mut m = String::with_capacity(self.instance.len() + 21);
        self.write_member(&mut m, id);
        m
    }

    /// Writes the member of lease `id` into `buf` (cleared first), to reuse one buffer.
    fn write_member<'b>(&self, buf: &'b mut String, id: u64) -> &'b str {
        use std::fmt::Write as _;
        buf.clear();
        buf.push_str(&self.instance);
        let _ = write!(buf, ":{id}");
        buf
    }

    fn note_redis_now(&self, redis_ms: i64) {
        self.clock_offset
            .store(redis_ms - local_ms(), Ordering::Relaxed);
    }

    /// The Redis clock as best known here.
    fn redis_now(&self) -> i64 {
        match self.clock_offset.load(Ordering::Relaxed) {
            i64::MIN => local_ms(),
            off => local_ms() + off,
        }
    }

    /// Counts a background failure and logs it at most once per heartbeat interval.
    fn fail(&self, what: &'static str, err: &dyn fmt::Display) {
        self.store_errors.increment(1);
        self.warn(what, err);
    }

    /// Logs a failure at most once per heartbeat interval (acquire failures are counted by
    /// `TrackLayer`, so only logged here).
    fn warn(&self, what: &'static str, err: &dyn fmt::Display) {
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

    /// A lease score (expiry) for a heartbeat: `now + ttl` on the Redis clock, and above every
    /// score written before, reserved atomically so two heartbeats never write the same one.
    fn next_score(&self) -> i64 {
        let want = self.redis_now() + self.ttl_ms;
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

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// The in-process lease table: live leases grouped by Redis key, plus releases still queued.

struct Table {
    shards: Box<[Mutex<HashMap<Arc<str>, Slots>>]>,
}

#[derive(Default)]
struct Slots {
    live: HashSet<u64>,
    /// Dropped leases whose `ZREM` is queued: the next acquire of this key removes them first.
    releasing: Vec<u64>,
}

impl Table {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<Arc<str>, Slots>> {
        let mut h: u32 = 0x811c_9dc5;
        for b in key.as_bytes() {
            h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
        }
        &self.shards[h as usize % SHARDS]
    }

    fn insert(&self, key: &Arc<str>, id: u64) {
        lock(self.shard(key))
            .entry(key.clone())
            .or_default()
            .live
            .insert(id);
    }

    /// Moves a live lease to "releasing" (when `queued`) or forgets it; false if it was not
    /// live (taken by shutdown).
    fn release(&self, key: &Arc<str>, id: u64, queued: bool) -> bool {
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
    fn released(&self, key: &Arc<str>, ids: &[u64]) {
        let mut map = lock(self.shard(key));
        if let Some(slots) = map.get_mut(key) {
            slots.releasing.retain(|id| !ids.contains(id));
            if slots.releasing.is_empty() && slots.live.is_empty() {
                map.remove(key);
            }
        }
    }

    fn releasing(&self, key: &str) -> Vec<u64> {
        lock(self.shard(key))
            .get(key)
            .map(|s| s.releasing.clone())
            .unwrap_or_default()
    }

    fn releasing_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| lock(s).values().map(|v| v.releasing.len()).sum::<usize>())
            .sum()
    }

    fn live_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| lock(s).values().map(|v| v.live.len()).sum::<usize>())
            .sum()
    }

    /// Live leases grouped by key (for the heartbeat).
    fn snapshot(&self) -> Vec<(Arc<str>, Vec<u64>)> {
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

    fn snapshot_key(&self, key: &Arc<str>) -> Vec<u64> {
        lock(self.shard(key))
            .get(key)
            .map(|s| s.live.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Takes every live lease out of the table (for the shutdown clean-up): a lease dropped
    /// afterwards finds nothing to release.
    fn take_all(&self) -> Vec<(Arc<str>, Vec<u64>)> {
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

// ---------------------------------------------------------------------------------------------
// Acquire and release.

/// Future returned by [`RedisStore::acquire`](ConnectionStore::acquire): one `EVALSHA`,
/// bounded by the acquire timeout.
#[must_use = "futures do nothing unless polled"]
pub struct AcquireFuture {
    inner: Pin<Box<dyn Future<Output = Result<Option<Lease>, StoreError>> + Send>>,
}

impl Future for AcquireFuture {
    type Output = Result<Option<Lease>, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for AcquireFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcquireFuture").finish_non_exhaustive()
    }
}

/// If an acquire is abandoned (timeout, client gone) after its script may have run, queue a
/// `ZREM` of its member so the slot does not stay taken until the TTL.
struct InFlight {
    shared: Arc<Shared>,
    key: Arc<str>,
    id: u64,
    armed: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.shared.release_tx.try_send(Release {
                key: self.key.clone(),
                id: self.id,
            });
        }
    }
}

impl ConnectionStore for RedisStore {
    type Future = AcquireFuture;

    fn acquire(&self, key: &str, limit: u32) -> Self::Future {
        let shared = self.handle.shared.clone();
        let key: Arc<str> = Arc::from(shared.redis_key(key));
        AcquireFuture {
            inner: Box::pin(acquire(shared, key, limit)),
        }
    }

    fn shutdown(&self) -> Pin<Box<dyn Future<Output = Option<CleanupSummary>> + Send>> {
        let shared = self.handle.shared.clone();
        Box::pin(async move { Some(cleanup(shared).await) })
    }
}

async fn acquire(
    shared: Arc<Shared>,
    key: Arc<str>,
    limit: u32,
) -> Result<Option<Lease>, StoreError> {
    if shared.shut.load(Ordering::Acquire) {
        return Err(StoreError::new("redis store is shut down"));
    }
    if limit == 0 {
        return Ok(None);
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let mut inv = ACQUIRE_SCRIPT.key(&*key);
    inv.arg(shared.member(id)).arg(limit).arg(shared.ttl_ms);
    for pending in shared.table.releasing(&key) {
        inv.arg(shared.member(pending));
    }
    let mut guard = InFlight {
        shared: shared.clone(),
        key: key.clone(),
        id,
        armed: true,
    };
    let mut conn = shared.conn();
    let reply = timeout(
        shared.acquire_timeout,
        inv.invoke_async::<(i64, i64, i64)>(&mut conn),
    )
    .await;
    let (granted, now, _held) = match reply {
        Err(_) => {
            let e = StoreError::new(format!(
                "redis acquire timed out after {} ms",
                shared.acquire_timeout.as_millis()
            ));
            shared.warn("acquire", &e);
            return Err(e);
        }
        Ok(Err(e)) => {
            shared.warn("acquire", &e);
            return Err(StoreError::with_source("redis acquire failed", e));
        }
        Ok(Ok(r)) => r,
    };
    shared.note_redis_now(now);
    if granted != 1 {
        guard.armed = false;
        return Ok(None);
    }
    shared
        .max_score
        .fetch_max(now + shared.ttl_ms, Ordering::Relaxed);
    if shared.shut.load(Ordering::Acquire) {
        // Shutdown began while the script ran: the guard queues the ZREM (or the lease expires).
        return Err(StoreError::new("redis store is shut down"));
    }
    shared.table.insert(&key, id);
    guard.armed = false;
    Ok(Some(Lease::from_inner(LeaseInner::Redis(RedisLease {
        shared,
        key,
        id,
    }))))
}

/// A granted Redis lease; dropping it queues its release.
pub(crate) struct RedisLease {
    shared: Arc<Shared>,
    key: Arc<str>,
    id: u64,
}

impl Drop for RedisLease {
    fn drop(&mut self) {
        let s = &self.shared;
        // Mark it releasing before queueing, so an acquire racing with the release task
        // already removes it.
        if !s.table.release(&self.key, self.id, true) {
            return; // taken by the shutdown clean-up
        }
        let msg = Release {
            key: self.key.clone(),
            id: self.id,
        };
        match s.release_tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(m)) => {
                s.table.released(&m.key, &[m.id]);
                s.fail(
                    "release (queue full; the lease will expire by its TTL)",
                    &"channel full",
                );
            }
            Err(mpsc::error::TrySendError::Closed(m)) => {
                // The store is gone or shut down: nothing will heartbeat it, it expires by TTL.
                s.table.released(&m.key, &[m.id]);
            }
        }
    }
}

async fn release_task(shared: Arc<Shared>, mut rx: mpsc::Receiver<Release>) {
    let mut batch = Vec::with_capacity(shared.release_batch);
    loop {
        let first = tokio::select! {
            biased;
            r = rx.recv() => match r { Some(r) => r, None => break },
            _ = shared.cancel.cancelled() => break,
        };
        batch.push(first);
        while batch.len() < shared.release_batch {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        flush_releases(&shared, &mut batch).await;
    }
    // Stopped (store dropped or shut down): send what is already queued, once.
    rx.close();
    while let Ok(r) = rx.try_recv() {
        batch.push(r);
        if batch.len() >= shared.release_batch {
            flush_releases(&shared, &mut batch).await;
        }
    }
    flush_releases(&shared, &mut batch).await;
}

async fn flush_releases(shared: &Shared, batch: &mut Vec<Release>) {
    if batch.is_empty() {
        return;
    }
    let mut by_key: HashMap<Arc<str>, Vec<u64>> = HashMap::new();
    for r in batch.drain(..) {
        by_key.entry(r.key).or_default().push(r.id);
    }
    let mut pipe = ::redis::pipe();
    let mut buf = String::new();
    for (key, ids) in &by_key {
        let cmd = pipe.cmd("ZREM").arg(&**key);
        for id in ids {
            cmd.arg(shared.write_member(&mut buf, *id));
        }
        cmd.ignore();
    }
    let mut conn = shared.conn();
    match timeout(shared.command_timeout, pipe.exec_async(&mut conn)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => shared.fail("release", &e),
        Err(_) => shared.fail("release", &"timed out"),
    }
    for (key, ids) in &by_key {
        shared.table.released(key, ids);
    }
}

// ---------------------------------------------------------------------------------------------
// Heartbeat and sweep.

async fn heartbeat_task(shared: Arc<Shared>) {
    // Warm the connection and the script cache; failures here are not errors yet.
    let mut conn = shared.conn();
    let _ = timeout(
        shared.command_timeout,
        ACQUIRE_SCRIPT.prepare_invoke().load_async(&mut conn),
    )
    .await;
    let start = Instant::now();
    let mut beat = tokio::time::interval_at(start + shared.heartbeat, shared.heartbeat);
    beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let sweep_every = if shared.sweep.is_zero() {
        Duration::from_secs(86_400 * 365)
    } else {
        shared.sweep
    };
    let mut sweep = tokio::time::interval_at(start + sweep_every, sweep_every);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => break,
            _ = beat.tick() => {
                tokio::select! {
                    _ = shared.cancel.cancelled() => break,
                    _ = heartbeat(&shared) => {}
                }
            }
            _ = sweep.tick(), if !shared.sweep.is_zero() => {
                tokio::select! {
                    _ = shared.cancel.cancelled() => break,
                    _ = sweep_expired(&shared) => {}
                }
            }
        }
    }
}

/// One heartbeat: one pipeline refreshing every live lease; returns how many leases were
/// found missing and re-added.
async fn heartbeat(shared: &Shared) -> u64 {
    let leases = shared.table.snapshot();
    if leases.is_empty() {
        return 0;
    }
    let score = shared.next_score();
    let mut pipe = ::redis::pipe();
    pipe.cmd("TIME");
    let mut buf = String::new();
    for (key, ids) in &leases {
        let cmd = pipe.cmd("ZADD").arg(&**key).arg("XX").arg("CH");
        for id in ids {
            cmd.arg(score).arg(shared.write_member(&mut buf, *id));
        }
        // Its reply is not ignored (`ignore` keeps a set of indices): it is skipped below.
        pipe.cmd("PEXPIRE").arg(&**key).arg(shared.ttl_ms);
    }
    let mut conn = shared.conn();
    let values: Vec<Value> =
        match timeout(shared.command_timeout, pipe.query_async(&mut conn)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                shared.fail("heartbeat", &e);
                return 0;
            }
            Err(_) => {
                shared.fail("heartbeat", &"timed out");
                return 0;
            }
        };
    let mut it = values.into_iter();
    if let Some(Ok((secs, micros))) = it.next().map(::redis::from_redis_value::<(i64, i64)>) {
        shared.note_redis_now(secs * 1000 + micros / 1000);
    }
    // Every heartbeat writes a score never written before, so `CH` counts every member that
    // still exists ("unchanged" cannot happen): a shortfall means leases were lost.
    let mut missing: Vec<&Arc<str>> = Vec::new();
    for ((key, ids), v) in leases.iter().zip(it.step_by(2)) {
        let changed = ::redis::from_redis_value::<i64>(v).unwrap_or(0);
        if (changed as usize) < ids.len() {
            missing.push(key);
        }
    }
    if missing.is_empty() {
        return 0;
    }
    readd(shared, &missing).await
}

/// Re-adds this process's live leases of `keys` (without a limit check: they are already
/// serving), after Redis lost them.
async fn readd(shared: &Shared, keys: &[&Arc<str>]) -> u64 {
    let score = shared.next_score();
    let mut pipe = ::redis::pipe();
    let mut count = 0u64;
    for key in keys {
        // Fresh from the table: a lease dropped since the heartbeat's snapshot is not re-added.
        let ids = shared.table.snapshot_key(key);
        if ids.is_empty() {
            continue;
        }
        let cmd = pipe.cmd("ZADD").arg(&***key);
        for id in &ids {
            cmd.arg(score).arg(shared.member(*id));
        }
        cmd.ignore();
        pipe.cmd("PEXPIRE").arg(&***key).arg(shared.ttl_ms).ignore();
        count += ids.len() as u64;
    }
    if count == 0 {
        return 0;
    }
    let mut conn = shared.conn();
    match timeout(shared.command_timeout, pipe.exec_async(&mut conn)).await {
        Ok(Ok(())) => {
            tracing::warn!(
                instance = %shared.instance,
                leases = count,
                keys = keys.len(),
                "tower-drain redis store: leases were missing from Redis (restart, failover or flush); re-added them"
            );
            count
        }
        Ok(Err(e)) => {
            shared.fail("re-adding lost leases", &e);
            0
        }
        Err(_) => {
            shared.fail("re-adding lost leases", &"timed out");
            0
        }
    }
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Removes expired leases (of any process) under this prefix, in batches; returns how many.
async fn sweep_expired(shared: &Shared) -> u64 {
    let mut conn = shared.conn();
    let pattern = format!("{}:{{*", glob_escape(&shared.prefix));
    let now: i64 = match timeout(
        shared.command_timeout,
        ::redis::cmd("TIME").query_async::<(i64, i64)>(&mut conn),
    )
    .await
    {
        Ok(Ok((s, us))) => {
            let now = s * 1000 + us / 1000;
            shared.note_redis_now(now);
            now
        }
        Ok(Err(e)) => {
            shared.fail("sweep", &e);
            return 0;
        }
        Err(_) => {
            shared.fail("sweep", &"timed out");
            return 0;
        }
    };
    let mut cursor: u64 = 0;
    let mut removed = 0u64;
    loop {
        let mut scan = ::redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(shared.sweep_batch)
            .arg("TYPE")
            .arg("zset");
        let page = scan.query_async::<(u64, Vec<String>)>(&mut conn);
        let (next, keys) = match timeout(shared.command_timeout, page).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                shared.fail("sweep", &e);
                break;
            }
            Err(_) => {
                shared.fail("sweep", &"timed out");
                break;
            }
        };
        if !keys.is_empty() {
            let mut pipe = ::redis::pipe();
            for k in &keys {
                pipe.cmd("ZREMRANGEBYSCORE").arg(k).arg("-inf").arg(now);
            }
            match timeout(
                shared.command_timeout,
                pipe.query_async::<Vec<i64>>(&mut conn),
            )
            .await
            {
                Ok(Ok(n)) => removed += n.iter().map(|&x| x.max(0) as u64).sum::<u64>(),
                Ok(Err(e)) => {
                    shared.fail("sweep", &e);
                    break;
                }
                Err(_) => {
                    shared.fail("sweep", &"timed out");
                    break;
                }
            }
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    if removed > 0 {
        shared.stale_cleaned.increment(removed);
        tracing::info!(removed, "tower-drain redis store: swept expired leases");
    }
    removed
}

// ---------------------------------------------------------------------------------------------
// Shutdown clean-up.

async fn cleanup(shared: Arc<Shared>) -> CleanupSummary {
    let started = Instant::now();
    let deadline = started + shared.cleanup_timeout;
    shared.shut.store(true, Ordering::Release);
    // Stop the heartbeat and let the release task send what is queued, concurrently.
    shared.cancel.cancel();
    let tasks = std::mem::take(&mut *lock(&shared.tasks));

    let mut queue: VecDeque<(Arc<str>, Vec<u64>)> = shared.table.take_all().into();
    let before: u64 = queue.iter().map(|(_, ids)| ids.len() as u64).sum();
    let mut cleaned = 0u64;
    let mut iterations = 0u32;
    let mut conn = shared.conn();
    while !queue.is_empty() && iterations < shared.cleanup_max_iterations {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        iterations += 1;
        // One batch: up to `cleanup_batch` members, one ZREM per key.
        let mut batch: Vec<(Arc<str>, Vec<u64>)> = Vec::new();
        let mut n = 0;
        while n < shared.cleanup_batch {
            let Some((key, mut ids)) = queue.pop_front() else {
                break;
            };
            let room = shared.cleanup_batch - n;
            if ids.len() > room {
                let rest = ids.split_off(room);
                queue.push_front((key.clone(), rest));
            }
            n += ids.len();
            batch.push((key, ids));
        }
        let mut pipe = ::redis::pipe();
        for (key, ids) in &batch {
            let cmd = pipe.cmd("ZREM").arg(&**key);
            for id in ids {
                cmd.arg(shared.member(*id));
            }
        }
        let budget = shared.command_timeout.min(deadline - now);
        match timeout(budget, pipe.query_async::<Vec<i64>>(&mut conn)).await {
            Ok(Ok(removed)) => cleaned += removed.iter().map(|&x| x.max(0) as u64).sum::<u64>(),
            failed => {
                match failed {
                    Ok(Err(e)) => shared.fail("shutdown clean-up", &e),
                    _ => shared.fail("shutdown clean-up", &"timed out"),
                }
                // Put the batch back and retry after a short pause.
                for item in batch.into_iter().rev() {
                    queue.push_front(item);
                }
                let pause = Duration::from_millis(50);
                if Instant::now() + pause >= deadline {
                    break;
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
    let after: u64 = queue.iter().map(|(_, ids)| ids.len() as u64).sum();
    let reached = after > 0 && iterations >= shared.cleanup_max_iterations;
    // Give the release task a moment to send what it already had queued.
    for t in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = timeout(left, t).await;
    }
    shared.stale_cleaned.increment(cleaned);
    let summary = CleanupSummary::new(
        cleaned,
        iterations,
        before,
        after,
        started.elapsed(),
        reached,
    );
    if after > 0 {
        tracing::warn!(
            before, cleaned, after, iterations, max_iterations_reached = reached,
            "tower-drain redis store: shutdown clean-up left leases behind (they expire by their TTL)"
        );
    } else {
        tracing::info!(
            before,
            cleaned,
            iterations,
            "tower-drain redis store: shutdown clean-up done"
        );
    }
    summary
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.handle.shared;
        f.debug_struct("RedisStore")
            .field("instance", &s.instance)
            .field("prefix", &s.prefix)
            .field("lease_ttl_ms", &s.ttl_ms)
            .field("heartbeat", &s.heartbeat)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(k: &str) -> String {
        let mut s = String::new();
        escape_key(&mut s, k);
        s
    }

    #[test]
    fn escaping_is_injective_and_keeps_the_tag_closed() {
        let keys = [
            "a", "a}", "a%7D", "{a}", "a b", "a%20b", "ü", "%C3%BC", "", "-_.~@:",
        ];
        let escaped: HashSet<String> = keys.iter().map(|k| key_of(k)).collect();
        assert_eq!(escaped.len(), keys.len());
        for k in &escaped {
            assert!(!k.contains(['{', '}', ' ']), "{k}");
        }
        assert_eq!(key_of("a}b c"), "a%7Db%20c");
        assert_eq!(key_of("ü"), "%C3%BC");
    }

    #[test]
    fn instance_ids_differ() {
        let ids: HashSet<String> = (0..1000).map(|_| new_instance_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|i| i.len() == 16));
    }

    #[test]
    fn table_release_paths() {
        let t = Table::new();
        let k: Arc<str> = Arc::from("k");
        t.insert(&k, 1);
        t.insert(&k, 2);
        assert_eq!(t.live_count(), 2);
        assert!(t.release(&k, 1, true));
        assert!(!t.release(&k, 1, true), "released once");
        assert_eq!(t.releasing("k"), vec![1]);
        t.released(&k, &[1]);
        assert!(t.releasing("k").is_empty());
        let all = t.take_all();
        assert_eq!(all.len(), 1);
        assert!(!t.release(&k, 2, true), "taken by shutdown");
        assert!(lock(t.shard("k")).is_empty());
    }

    #[test]
    fn build_rejects_bad_settings_and_needs_a_runtime() {
        assert!(
            RedisStore::builder("redis://127.0.0.1/").build().is_err(),
            "no runtime"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let b = || RedisStore::builder("redis://127.0.0.1:1/");
            assert!(b().prefix("a{b").build().is_err());
            assert!(b().lease_ttl(Duration::from_millis(1)).build().is_err());
            assert!(b()
                .heartbeat_interval(Duration::from_secs(30))
                .build()
                .is_err());
            assert!(b().cleanup_batch(0).build().is_err());
            assert!(RedisStore::builder("nonsense://x").build().is_err());
            assert!(b().build().is_ok(), "builds without a reachable Redis");
        });
    }
}
