//! One connection type for a single node and a cluster, hash slots, and routing a pipeline.

use std::future::Future;

use ::redis::aio::{ConnectionLike, ConnectionManager};
use ::redis::{Cmd, Pipeline, RedisFuture, Value};

/// A connection to a single node (reconnecting `ConnectionManager`) or to a cluster (the
/// `redis` crate's async cluster client, which follows `MOVED` / `ASK` and refreshes its slot
/// map after failovers).
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    #[cfg(feature = "redis-cluster")]
    Cluster(::redis::cluster_async::ClusterConnection),
}

impl Conn {
    pub(super) fn is_cluster(&self) -> bool {
        match self {
            Conn::Single(_) => false,
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(_) => true,
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag, modulo 16384.
pub(super) fn slot_of(key: &str) -> u16 {
    let b = key.as_bytes();
    let tagged = b.iter().position(|&c| c == b'{').and_then(|open| {
        let rest = &b[open + 1..];
        rest.iter()
            .position(|&c| c == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    crc16(tagged.unwrap_or(b)) % 16_384
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Runs the futures concurrently (one task each when there are several) and returns their
/// outputs in order.
pub(super) async fn run_all<F>(futures: Vec<F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    if futures.len() <= 1 {
        let mut out = Vec::with_capacity(1);
        for f in futures {
            out.push(f.await);
        }
        return out;
    }
    let n = futures.len();
    let mut set = tokio::task::JoinSet::new();
    for (i, f) in futures.into_iter().enumerate() {
        set.spawn(async move { (i, f.await) });
    }
    let mut out: Vec<Option<F::Output>> = (0..n).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, v)) => out[i] = Some(v),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
    out.into_iter().flatten().collect()
}

/// How a sweep reaches one node: a plain connection, or a cluster connection with every
/// command pinned to one primary.
pub(super) trait NodeLink: Send {
    fn query<'a>(
        &'a mut self,
        cmd: ::redis::Cmd,
    ) -> std::pin::Pin<Box<dyn Future<Output = ::redis::RedisResult<Value>> + Send + 'a>>;
    fn query_pipe<'a>(
        &'a mut self,
        pipe: ::redis::Pipeline,
        count: usize,
    ) -> std::pin::Pin<Box<dyn Future<Output = ::redis::RedisResult<Vec<Value>>> + Send + 'a>>;
}

impl NodeLink for Conn {
    fn query<'a>(
        &'a mut self,
        cmd: ::redis::Cmd,
    ) -> std::pin::Pin<Box<dyn Future<Output = ::redis::RedisResult<Value>> + Send + 'a>> {
        Box::pin(async move { cmd.query_async(self).await })
    }

    fn query_pipe<'a>(
        &'a mut self,
        pipe: ::redis::Pipeline,
        _count: usize,
    ) -> std::pin::Pin<Box<dyn Future<Output = ::redis::RedisResult<Vec<Value>>> + Send + 'a>> {
        Box::pin(async move { pipe.query_async(self).await })
    }
}

/// Where one pipeline goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Route {
    /// By its keys: the single node, or on a cluster the node owning the slot of the keys (all
    /// in one slot); `MOVED` / `ASK` are followed.
    Keys,
    /// A cluster primary by address: the pipeline may span every slot that node serves.
    #[cfg(feature = "redis-cluster")]
    Node { host: String, port: u16 },
}

impl Conn {
    /// Sends `pipe` (`count` commands) along `route`.
    pub(super) async fn query_routed(
        &mut self,
        route: &Route,
        pipe: Pipeline,
        count: usize,
    ) -> ::redis::RedisResult<Vec<Value>> {
        match (route, self) {
            #[cfg(feature = "redis-cluster")]
            (Route::Node { host, port }, Conn::Cluster(c)) => {
                let to = ::redis::cluster_routing::SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                };
                c.route_pipeline(pipe, 0, count, to).await
            }
            (_, conn) => {
                let _ = count;
                pipe.query_async(conn).await
            }
        }
    }
}

/// Which primary serves each hash slot, as last read from the cluster (`CLUSTER SLOTS`), and
/// when; a node pipeline that fails clears it.
#[derive(Default)]
pub(super) struct SlotMap {
    inner: std::sync::Mutex<Option<(std::time::Instant, std::sync::Arc<SlotOwners>)>>,
}

/// `owner[slot]` indexes `nodes` (`u16::MAX`: no primary known).
#[cfg_attr(not(feature = "redis-cluster"), allow(dead_code))]
pub(super) struct SlotOwners {
    pub(super) owner: Box<[u16]>,
    pub(super) nodes: Vec<(String, u16)>,
}

#[cfg_attr(not(feature = "redis-cluster"), allow(dead_code))]
impl SlotMap {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<(std::time::Instant, std::sync::Arc<SlotOwners>)>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The map if it was read less than `max_age` ago.
    pub(super) fn get(&self, max_age: std::time::Duration) -> Option<std::sync::Arc<SlotOwners>> {
        match &*self.lock() {
            Some((at, map)) if at.elapsed() < max_age => Some(map.clone()),
            _ => None,
        }
    }

    pub(super) fn set(&self, map: std::sync::Arc<SlotOwners>) {
        *self.lock() = Some((std::time::Instant::now(), map));
    }

    pub(super) fn clear(&self) {
        *self.lock() = None;
    }
}
