//! The store's public face: [`RedisStore`] and its [`ConnectionStore`] implementation.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::cleanup::cleanup;
use super::lease::AcquireFuture;
use super::shared::Shared;
use super::tasks::heartbeat;
use crate::controller::CleanupSummary;
use crate::track::store::ConnectionStore;
#[cfg(doc)]
use crate::track::store::StoreError;

/// Per-key stream limits across every process sharing one Redis (feature `redis`).
///
/// Leases live in Redis sorted sets and expire by themselves unless this process's heartbeat
/// refreshes them, so a process that dies without cleaning up stops holding slots after the
/// lease TTL. See [`RedisStoreBuilder`](super::RedisStoreBuilder) for the settings and their
/// defaults.
///
/// Building the store does not connect: it starts while Redis is unreachable and (re)connects
/// by itself. While Redis is unreachable or slower than the acquire timeout, `acquire` returns a
/// [`StoreError`] and [`TrackLayer`](crate::track::TrackLayer) fails open (serve and count
/// `tower_drain_store_errors_total`, the default) or closed (`503`), as configured with
/// [`on_store_error`](crate::track::TrackLayer::on_store_error).
///
/// Clones share one connection, one lease table and the background tasks (release, heartbeat,
/// sweep: three independent tasks, so a long sweep never delays a heartbeat); the tasks stop
/// when the last clone is dropped or after [`shutdown`](ConnectionStore::shutdown).
///
/// # Data model
///
/// No counters. Each open stream holds a **lease**: a member `<instance-id>:<stream-id>` of the
/// sorted set `<prefix>:{<escaped key>}`, scored by the lease's expiry in Unix milliseconds of
/// the Redis clock. The instance id is random per store (so per process start): a restarted
/// process never reuses its predecessor's members. Every command touches exactly one key, the
/// user key sits inside the hash tag, and on a cluster every pipeline goes to the node serving
/// all of its keys.
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
/// # Deployments
///
/// | deployment | support |
/// |---|---|
/// | single node (`redis://`, `redis+unix://`) | yes (feature `redis`) |
/// | Redis Cluster, Valkey cluster, ElastiCache / Memorystore in cluster mode | yes, with `RedisStore::cluster_builder` (feature `redis-cluster`) |
/// | TLS (`rediss://`) | yes, with feature `redis-tls-rustls` (rustls; installs the *ring* crypto provider unless the application installed one) or `redis-tls-native` (the platform's TLS library, OpenSSL on Linux); a private CA through `tls_root_certificate` |
/// | Sentinel | no (see below) |
///
/// **Cluster.** Acquire is one script call on one key. Releases, heartbeats, re-adds of lost
/// leases and the shutdown clean-up send one pipeline per primary (from a fresh `CLUSTER SLOTS`
/// each time), all concurrently; a per-node pipeline that fails as a whole because a slot moved
/// is sent again as one pipeline per hash slot, routed by key. The sweep runs on every
/// primary. `MOVED` and `ASK` during resharding and failover are followed by the cluster
/// client, not counted as failures. During a failover election the
/// slots of the failed primary are unreachable: acquires on them fail (and the track layer
/// fails open or closed as configured); the first heartbeat after the election re-adds the
/// leases the promoted replica had not received.
///
/// **Clocks.** A lease's score is an expiry time on the clock of the node owning its key: the
/// acquire script reads that node's `TIME`, and each heartbeat pipeline carries `TIME` from that
/// node, which sets the per-slot clock offset used for the next heartbeat's scores. Because one
/// heartbeat writes one score above every score written before (so that `ZADD XX CH` counts
/// every present member), a lease on a node whose clock is behind the fastest node's lives up
/// to that skew longer than `lease_ttl`, never shorter (but for the round trip that the clock
/// offset is measured over). The processes' own clocks do not matter. Keep the nodes' clocks synchronised
/// (NTP keeps them within milliseconds); a skew of `s` lets a crashed process's slots outlive
/// it by at most `lease_ttl + s`.
///
/// **Sentinel is not supported.** The `redis` crate (1.x) resolves a Sentinel master once into a
/// plain connection; nothing re-resolves it when the connection drops, and a demoted master
/// keeps accepting connections as a read-only replica, so after a failover the store would
/// keep talking to the old master (every write failing) until restarted. Use a cluster, or a
/// single endpoint that follows the master (a managed service's primary endpoint, a proxy).
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
/// let stack = DrainStack::new(drain.watch()).track(|t| {
///     t.store(store.clone())
///         .max_per_key(3)
///         .key_header(http::HeaderName::from_static("x-client-id"))
/// });
///
/// let lease = store.acquire("alice", 3).await?; // what TrackLayer does per request
/// assert!(lease.is_some());
/// # drop(stack); Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    pub(super) handle: Arc<Handle>,
}

/// Owned by the public clones only: when the last one goes, the background tasks stop.
pub(super) struct Handle {
    pub(super) shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

impl RedisStore {
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

    /// Runs one heartbeat now, as the background task does every interval: one pipeline (one
    /// per primary on a cluster) refreshing every live lease of this store, then re-adding any
    /// that Redis lost. Returns
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

impl ConnectionStore for RedisStore {
    type Future = AcquireFuture;

    fn acquire(&self, key: &str, limit: u32) -> Self::Future {
        let shared = self.handle.shared.clone();
        let key: Arc<str> = Arc::from(shared.redis_key(key));
        AcquireFuture::new(shared, key, limit)
    }

    fn shutdown(&self) -> Pin<Box<dyn Future<Output = Option<CleanupSummary>> + Send>> {
        let shared = self.handle.shared.clone();
        Box::pin(async move { Some(cleanup(shared).await) })
    }

    fn store_id(&self) -> Option<usize> {
        Some(Arc::as_ptr(&self.handle) as usize)
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.handle
            .shared
            .debug_settings(&mut f.debug_struct("RedisStore"))
            .finish_non_exhaustive()
    }
}
