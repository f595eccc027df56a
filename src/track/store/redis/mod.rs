//! [`RedisStore`]: per-key stream limits shared by every process that uses one Redis or one
//! Redis Cluster. What is supported (single node, cluster, TLS; not Sentinel) is documented on
//! [`RedisStore`].

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
