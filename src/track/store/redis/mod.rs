//! [`RedisStore`]: per-key stream limits shared by every process that uses one Redis or one
//! Redis Cluster.
//!
//! # What is supported
//!
//! | deployment | support |
//! |---|---|
//! | single node (`redis://`, `redis+unix://`) | yes (feature `redis`) |
//! | Redis Cluster, Valkey cluster, ElastiCache / Memorystore in cluster mode | yes, with [`RedisStore::cluster_builder`] (feature `redis-cluster`) |
//! | TLS (`rediss://`) | yes, with feature `redis-tls-rustls` (rustls; installs the *ring* crypto provider unless the application installed one) or `redis-tls-native` (the platform's TLS library, OpenSSL on Linux); a private CA through `tls_root_certificate` |
//! | Sentinel | no (see below) |
//!
//! **Cluster.** Acquire is one script call on one key. Releases, heartbeats, re-adds of lost
//! leases and the shutdown clean-up send one pipeline per primary (from a fresh `CLUSTER SLOTS`
//! each time), all concurrently; a per-node pipeline that fails as a whole because a slot moved
//! is sent again as one pipeline per hash slot, routed by key. The sweep runs on every primary. `MOVED` and `ASK` during resharding and failover are
//! followed by the cluster client, not counted as failures. During a failover election the
//! slots of the failed primary are unreachable: acquires on them fail (and the track layer
//! fails open or closed as configured); the first heartbeat after the election re-adds the
//! leases the promoted replica had not received.
//!
//! **Clocks.** A lease's score is an expiry time on the clock of the node owning its key: the
//! acquire script reads that node's `TIME`, and each heartbeat pipeline carries `TIME` from that
//! node, which sets the per-slot clock offset used for the next heartbeat's scores. Because one
//! heartbeat writes one score above every score written before (so that `ZADD XX CH` counts
//! every present member), a lease on a node whose clock is behind the fastest node's lives up
//! to that skew longer than `lease_ttl`, never shorter. Keep the nodes' clocks synchronised
//! (NTP keeps them within milliseconds); a skew of `s` lets a crashed process's slots outlive
//! it by at most `lease_ttl + s`.
//!
//! **Sentinel is not supported.** The `redis` crate (1.x) resolves a Sentinel master once into a
//! plain connection; nothing re-resolves it when the connection drops, and a demoted master
//! keeps accepting connections as a read-only replica, so after a failover the store would
//! keep talking to the old master (every write failing) until restarted. Use a cluster, or a
//! single endpoint that follows the master (a managed service's primary endpoint, a proxy).

mod builder;
mod cleanup;
#[cfg(feature = "redis-cluster")]
mod cluster;
mod conn;
mod lease;
mod route;
mod shared;
mod store;
mod sweep;
mod table;
mod tasks;
#[cfg(test)]
mod tests;

pub use self::builder::RedisStoreBuilder;
pub use self::lease::AcquireFuture;
pub(crate) use self::lease::RedisLease;
pub use self::store::RedisStore;
