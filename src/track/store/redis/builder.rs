//! [`RedisStoreBuilder`]: settings, their validation, and the start of the background tasks.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::Client;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::conn::{Conn, SlotMap};
use super::shared::{new_instance_id, Clock, OpErrors, Shared};
use super::store::{Handle, RedisStore};
use super::sweep::sweep_task;
use super::table::{lock, Table};
use super::tasks::{heartbeat_task, release_task};
use crate::controller::{at_most_max, setters, ConfigError};
use crate::track::store::StoreError;

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
    target: Target,
    tls_root: Option<Vec<u8>>,
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
        RedisStoreBuilder::with_target(Target::Single(url.into()))
    }

    /// A builder for a store on the Redis Cluster reached through the seed `nodes`
    /// (`redis://host:port` or `rediss://host:port` URLs; one reachable node is enough, the
    /// others are discovered). Feature `redis-cluster`.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let store = tower_drain::track::RedisStore::cluster_builder([
    ///     "redis://10.0.0.1:6379",
    ///     "redis://10.0.0.2:6379",
    /// ])
    /// .build()
    /// .unwrap();
    /// # drop(store); }
    /// ```
    #[cfg(feature = "redis-cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-cluster")))]
    pub fn cluster_builder<I, S>(nodes: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RedisStoreBuilder::with_target(Target::Cluster(nodes.into_iter().map(Into::into).collect()))
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
}

impl RedisStoreBuilder {
    fn with_target(target: Target) -> Self {
        Self {
            target,
            tls_root: None,
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
}

impl RedisStoreBuilder {
    setters! {
        /// Prefix of every Redis key (default `tower-drain`); must not contain `{` or `}`.
        ///
        /// ```
        /// let err = tower_drain::track::RedisStore::builder("redis://127.0.0.1/")
        ///     .prefix("my-service:{streams}")
        ///     .build()
        ///     .unwrap_err();
        /// assert_eq!(err.config().unwrap().setting(), "prefix");
        /// ```
        prefix(prefix: impl Into<String>) => prefix = prefix.into();

        /// How long a lease lives without a heartbeat (default 30 s): a crashed process's slots
        /// free themselves after this. At least 10 ms.
        ///
        /// ```
        /// use std::time::Duration;
        /// let err = tower_drain::track::RedisStore::builder("redis://127.0.0.1/")
        ///     .lease_ttl(Duration::from_millis(5))
        ///     .build()
        ///     .unwrap_err();
        /// assert_eq!(err.config().unwrap().setting(), "lease_ttl");
        /// ```
        lease_ttl(ttl: Duration) => ttl = ttl;

        /// How often the heartbeat refreshes this process's leases (default `lease_ttl / 3`); must
        /// be shorter than the TTL.
        ///
        /// ```
        /// use std::time::Duration;
        /// let err = tower_drain::track::RedisStore::builder("redis://127.0.0.1/")
        ///     .heartbeat_interval(Duration::from_secs(30))
        ///     .build()
        ///     .unwrap_err();
        /// assert_eq!(err.config().unwrap().setting(), "heartbeat_interval");
        /// ```
        heartbeat_interval(every: Duration) => heartbeat = Some(every);

        /// How long `acquire` may take before it fails with a [`StoreError`] (default 250 ms), so a
        /// slow or unreachable Redis cannot stall request handling.
        ///
        /// ```
        /// use std::time::Duration;
        /// let err = tower_drain::track::RedisStore::builder("redis://127.0.0.1/")
        ///     .acquire_timeout(Duration::ZERO)
        ///     .build()
        ///     .unwrap_err();
        /// assert_eq!(err.config().unwrap().setting(), "acquire_timeout");
        /// ```
        acquire_timeout(d: Duration) => acquire_timeout = d;

        /// Timeout of each background command: release, heartbeat, sweep, clean-up batch, and of
        /// each connection attempt (default 2 s).
        ///
        /// ```
        /// use std::time::Duration;
        /// let err = tower_drain::track::RedisStore::builder("redis://127.0.0.1/")
        ///     .command_timeout(Duration::ZERO)
        ///     .build()
        ///     .unwrap_err();
        /// assert_eq!(err.config().unwrap().setting(), "command_timeout");
        /// ```
        command_timeout(d: Duration) => command_timeout = d;

        /// Capacity of the release channel between dropped leases and the release task (default
        /// 10 000). When it is full, a release is counted as a store error and the lease expires
        /// by its TTL.
        ///
        /// ```
        /// let err = tower_drain::track::RedisStore::builder("redis://127.0.0.1/")
        ///     .release_queue(0)
        ///     .build()
        ///     .unwrap_err();
        /// assert_eq!(err.config().unwrap().setting(), "release_queue");
        /// ```
        release_queue(n: usize) => release_queue = n;

        /// At most this many releases per round trip of the release task (default 512).
        ///
        /// ```
        /// let err = tower_drain::track::RedisStore::builder("redis://127.0.0.1/")
        ///     .release_batch(0)
        ///     .build()
        ///     .unwrap_err();
        /// assert_eq!(err.config().unwrap().setting(), "release_batch");
        /// ```
        release_batch(n: usize) => release_batch = n;

        /// How often expired leases (of crashed processes) are swept (default `lease_ttl`);
        /// [`Duration::ZERO`] disables the sweep (acquire still ignores expired leases).
        ///
        /// ```
        /// use std::time::Duration;
        /// use tower_drain::controller::MAX_DURATION;
        /// let err = tower_drain::track::RedisStore::builder("redis://127.0.0.1/")
        ///     .sweep_interval(MAX_DURATION + Duration::from_secs(1))
        ///     .build()
        ///     .unwrap_err();
        /// assert_eq!(err.config().unwrap().setting(), "sweep_interval");
        /// ```
        sweep_interval(every: Duration) => sweep_interval = Some(every);

        /// Keys per `SCAN` page and per sweep pipeline (default 500).
        ///
        /// ```
        /// let err = tower_drain::track::RedisStore::builder("redis://127.0.0.1/")
        ///     .sweep_batch(0)
        ///     .build()
        ///     .unwrap_err();
        /// assert_eq!(err.config().unwrap().setting(), "sweep_batch");
        /// ```
        sweep_batch(n: usize) => sweep_batch = n;

        /// Leases released per round trip by the shutdown clean-up (default 1 000).
        ///
        /// ```
        /// let err = tower_drain::track::RedisStore::builder("redis://127.0.0.1/")
        ///     .cleanup_batch(0)
        ///     .build()
        ///     .unwrap_err();
        /// assert_eq!(err.config().unwrap().setting(), "cleanup_batch");
        /// ```
        cleanup_batch(n: usize) => cleanup_batch = n;

        /// Maximum number of round trips (iterations) of the shutdown clean-up (default 1 000);
        /// the summary says whether it was reached.
        ///
        /// ```
        /// let err = tower_drain::track::RedisStore::builder("redis://127.0.0.1/")
        ///     .cleanup_max_iterations(0)
        ///     .build()
        ///     .unwrap_err();
        /// assert_eq!(err.config().unwrap().setting(), "cleanup_max_iterations");
        /// ```
        cleanup_max_iterations(n: u32) => cleanup_max_iterations = n;

        /// Time budget of the shutdown clean-up (default 4 s, under the controller's 5 s clean-up
        /// timeout so the summary always reaches the report).
        ///
        /// ```
        /// use std::time::Duration;
        /// use tower_drain::controller::MAX_DURATION;
        /// let err = tower_drain::track::RedisStore::builder("redis://127.0.0.1/")
        ///     .cleanup_timeout(MAX_DURATION + Duration::from_secs(1))
        ///     .build()
        ///     .unwrap_err();
        /// assert_eq!(err.config().unwrap().setting(), "cleanup_timeout");
        /// ```
        cleanup_timeout(d: Duration) => cleanup_timeout = d;

        /// Trusts the CA certificate `pem` (PEM) for `rediss://` connections instead of the system's
        /// root certificates, for a Redis whose certificate a private CA signed. Features
        /// `redis-tls-rustls` or `redis-tls-native`; on a cluster, `redis-tls-rustls` (with only
        /// `redis-tls-native`, `build` fails naming this setting).
        ///
        /// ```no_run
        /// # #[tokio::main] async fn main() {
        /// let ca = std::fs::read("/etc/redis/ca.pem").unwrap();
        /// let store = tower_drain::track::RedisStore::builder("rediss://redis.internal:6380/")
        ///     .tls_root_certificate(ca)
        ///     .build()
        ///     .unwrap();
        /// # drop(store); }
        /// ```
        #[cfg(any(feature = "redis-tls-rustls", feature = "redis-tls-native"))]
        #[cfg_attr(
            docsrs,
            doc(cfg(any(feature = "redis-tls-rustls", feature = "redis-tls-native")))
        )]
        tls_root_certificate(pem: impl Into<Vec<u8>>) => tls_root = Some(pem.into());
    }

    /// Validates the settings and starts the background tasks. Does not connect: the
    /// connection is made on first use and remade after failures.
    ///
    /// # Errors
    ///
    /// An invalid setting, checked first: the error's [`config`](StoreError::config) is a
    /// [`ConfigError`] naming it (a `prefix` with `{` or `}`, a duration over
    /// [`MAX_DURATION`](crate::controller::MAX_DURATION), a `lease_ttl` under 10 ms, a
    /// `heartbeat_interval` that is zero or not shorter than the TTL, a zero timeout, size,
    /// batch or iteration count, …). Then an invalid URL, or a call outside a Tokio runtime.
    ///
    /// ```
    /// let err = tower_drain::track::RedisStore::builder("redis://127.0.0.1/")
    ///     .prefix("bad{prefix}")
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(err.config().unwrap().setting(), "prefix");
    /// ```
    pub fn build(self) -> Result<RedisStore, StoreError> {
        let heartbeat = self.validate()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| StoreError::with_source("RedisStore::build needs a Tokio runtime", e))?;
        #[cfg(feature = "redis-tls-rustls")]
        install_rustls_provider();
        let conn = {
            let _enter = runtime.enter();
            connect(&self.target, self.command_timeout, self.tls_root.as_deref())?
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
            clock: Clock::new(conn.is_cluster()),
            conn,
            slot_map: SlotMap::default(),
            next_id: AtomicU64::new(0),
            table: Table::new(),
            release_tx: tx,
            max_score: AtomicI64::new(0),
            legacy_expire: AtomicBool::new(false),
            order: tokio::sync::Mutex::new(()),
            shut: AtomicBool::new(false),
            cancel: CancellationToken::new(),
            last_warn_ms: AtomicI64::new(i64::MIN),
            errors: OpErrors::new(),
            stale_cleaned: metrics::counter!(crate::metrics::STALE_LEASES_CLEANED_TOTAL),
            tasks: Mutex::new(Vec::new()),
        });
        let mut tasks = vec![
            runtime.spawn(release_task(shared.clone(), rx)),
            runtime.spawn(heartbeat_task(shared.clone())),
        ];
        if !shared.sweep.is_zero() {
            tasks.push(runtime.spawn(sweep_task(shared.clone())));
        }
        *lock(&shared.tasks) = tasks;
        tracing::debug!(instance = %shared.instance, prefix = %shared.prefix, "redis store started");
        Ok(RedisStore {
            handle: Arc::new(Handle { shared }),
        })
    }

    /// Checks every setting; returns the heartbeat interval.
    fn validate(&self) -> Result<Duration, ConfigError> {
        let zero = |setting: &'static str, is_zero: bool| {
            if is_zero {
                Err(ConfigError::new(setting, "must be greater than zero"))
            } else {
                Ok(())
            }
        };
        if self.prefix.contains(['{', '}']) {
            return Err(ConfigError::new("prefix", "must not contain `{` or `}`"));
        }
        for (setting, d) in [
            ("lease_ttl", Some(self.ttl)),
            ("heartbeat_interval", self.heartbeat),
            ("acquire_timeout", Some(self.acquire_timeout)),
            ("command_timeout", Some(self.command_timeout)),
            ("sweep_interval", self.sweep_interval),
            ("cleanup_timeout", Some(self.cleanup_timeout)),
        ] {
            if let Some(d) = d {
                at_most_max(setting, d)?;
            }
        }
        if self.ttl < Duration::from_millis(10) {
            return Err(ConfigError::new("lease_ttl", "must be at least 10 ms"));
        }
        let heartbeat = self.heartbeat.unwrap_or(self.ttl / 3);
        zero("heartbeat_interval", heartbeat.is_zero())?;
        if heartbeat >= self.ttl {
            return Err(ConfigError::new(
                "heartbeat_interval",
                "must be shorter than lease_ttl",
            ));
        }
        zero("acquire_timeout", self.acquire_timeout.is_zero())?;
        zero("command_timeout", self.command_timeout.is_zero())?;
        zero("release_queue", self.release_queue == 0)?;
        zero("release_batch", self.release_batch == 0)?;
        zero("sweep_batch", self.sweep_batch == 0)?;
        zero("cleanup_batch", self.cleanup_batch == 0)?;
        zero("cleanup_max_iterations", self.cleanup_max_iterations == 0)?;
        if let Target::Cluster(nodes) = &self.target {
            if nodes.is_empty() {
                return Err(ConfigError::new(
                    "cluster_builder",
                    "needs at least one seed node",
                ));
            }
            // The `redis` crate takes a cluster's root certificate through rustls only.
            if self.tls_root.is_some() && !cfg!(feature = "redis-tls-rustls") {
                return Err(ConfigError::new(
                    "tls_root_certificate",
                    "on a cluster needs the `redis-tls-rustls` feature",
                ));
            }
        }
        Ok(heartbeat)
    }
}

/// Where the store connects.
#[derive(Clone, Debug)]
enum Target {
    Single(String),
    #[cfg_attr(not(feature = "redis-cluster"), allow(dead_code))]
    Cluster(Vec<String>),
}

fn connect(
    target: &Target,
    command_timeout: Duration,
    tls_root: Option<&[u8]>,
) -> Result<Conn, StoreError> {
    match target {
        Target::Single(url) => {
            let client = match tls_root {
                #[cfg(any(feature = "redis-tls-rustls", feature = "redis-tls-native"))]
                Some(pem) => Client::build_with_tls(
                    url.as_str(),
                    ::redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem.to_vec()),
                    },
                ),
                _ => Client::open(url.as_str()),
            }
            .map_err(|e| StoreError::with_source("invalid redis url", e))?;
            let conn_cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(command_timeout))
                .set_response_timeout(Some(command_timeout))
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_millis(500));
            let manager =
                ConnectionManager::new_lazy_with_config(client, conn_cfg).map_err(|e| {
                    StoreError::with_source("cannot create redis connection manager", e)
                })?;
            Ok(Conn::Single(manager))
        }
        #[cfg(feature = "redis-cluster")]
        Target::Cluster(nodes) => super::cluster::connect(nodes, command_timeout, tls_root),
        #[cfg(not(feature = "redis-cluster"))]
        Target::Cluster(_) => Err(StoreError::new(
            "redis cluster needs the `redis-cluster` feature",
        )),
    }
}

/// rustls needs a process-wide crypto provider; install *ring* unless the application
/// installed one already (rustls cannot choose by itself when a build also enables aws-lc-rs).
#[cfg(feature = "redis-tls-rustls")]
#[allow(deprecated)] // ring's provider lacks post-quantum key exchange; fine for Redis.
fn install_rustls_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
