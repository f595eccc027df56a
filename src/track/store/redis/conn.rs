//! One connection type for a single node and a cluster, and the grouping that keeps every
//! pipeline inside one hash slot.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

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

/// Splits per-key work into the groups one pipeline may carry: everything in one group on a
/// single node, one group per hash slot on a cluster (a cluster pipeline must stay in one slot).
/// Returns the groups with their slot (0 on a single node).
pub(super) fn by_slot<T>(
    cluster: bool,
    items: Vec<(Arc<str>, T)>,
) -> Vec<(u16, Vec<(Arc<str>, T)>)> {
    if !cluster {
        return if items.is_empty() {
            Vec::new()
        } else {
            vec![(0, items)]
        };
    }
    let mut groups: HashMap<u16, Vec<(Arc<str>, T)>> = HashMap::new();
    for (key, v) in items {
        groups.entry(slot_of(&key)).or_default().push((key, v));
    }
    groups.into_iter().collect()
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
