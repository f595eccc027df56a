//! Groups per-key work into pipelines that a single node or a cluster accepts, and sends them.
//!
//! Single node: one pipeline. Cluster: one pipeline per primary, addressed by the slot map from
//! `CLUSTER SLOTS` (read again when older than a second or after a failure): a cluster node runs
//! commands of every slot it serves; the `redis` crate only refuses cross-slot pipelines it
//! routes by key. A per-node pipeline that fails as a whole (a slot
//! moved meanwhile: `MOVED` / `ASK`) is sent again as one pipeline per hash slot, routed by key,
//! which follows the redirections. Without a slot map, it goes per slot at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ::redis::{Pipeline, RedisError, Value};
use tokio::time::timeout;

#[cfg(feature = "redis-cluster")]
use super::conn::SlotOwners;
use super::conn::{run_all, slot_of, Route};
use super::shared::Shared;

/// Per-key work: a Redis key and what to send for it.
pub(super) type Items<T> = Vec<(Arc<str>, T)>;

/// The outcome of one pipeline: its items, the slot whose node clock its `TIME` (if any) is,
/// and the replies (per command, errors included) or why the round trip failed.
pub(super) struct Sent<T> {
    pub(super) items: Items<T>,
    pub(super) slot: u16,
    pub(super) replies: Result<Vec<Value>, String>,
}

struct Group<T> {
    route: Route,
    slot: u16,
    items: Items<T>,
}

fn per_slot<T>(items: Items<T>) -> Vec<Group<T>> {
    let mut by_slot: HashMap<u16, Items<T>> = HashMap::new();
    for (key, v) in items {
        by_slot.entry(slot_of(&key)).or_default().push((key, v));
    }
    by_slot
        .into_iter()
        .map(|(slot, items)| Group {
            route: Route::Keys,
            slot,
            items,
        })
        .collect()
}

async fn plan<T>(shared: &Shared, items: Items<T>) -> Vec<Group<T>> {
    if items.is_empty() {
        return Vec::new();
    }
    if !shared.conn.is_cluster() {
        return vec![Group {
            route: Route::Keys,
            slot: 0,
            items,
        }];
    }
    #[cfg(feature = "redis-cluster")]
    if let Some(map) = owners(shared).await {
        let mut by_node: HashMap<u16, Items<T>> = HashMap::new();
        let mut unmapped = Vec::new();
        for (key, v) in items {
            match map.owner[usize::from(slot_of(&key))] {
                u16::MAX => unmapped.push((key, v)),
                i => by_node.entry(i).or_default().push((key, v)),
            }
        }
        let mut groups = per_slot(unmapped);
        for (i, items) in by_node {
            let slot = slot_of(&items[0].0);
            let (host, port) = map.nodes[usize::from(i)].clone();
            groups.push(Group {
                route: Route::Node { host, port },
                slot,
                items,
            });
        }
        return groups;
    }
    per_slot(items)
}

/// How long a slot map read from the cluster is used before it is read again.
#[cfg(feature = "redis-cluster")]
const SLOT_MAP_AGE: Duration = Duration::from_secs(1);

/// The slot map: cached, or read again with `CLUSTER SLOTS`.
#[cfg(feature = "redis-cluster")]
async fn owners(shared: &Shared) -> Option<Arc<SlotOwners>> {
    if let Some(map) = shared.slot_map.get(SLOT_MAP_AGE) {
        return Some(map);
    }
    let ranges = super::cluster::slot_map(shared).await.ok()?;
    let mut owner = vec![u16::MAX; 16_384].into_boxed_slice();
    let mut nodes: Vec<(String, u16)> = Vec::new();
    for r in ranges {
        let i = match nodes.iter().position(|n| n.0 == r.host && n.1 == r.port) {
            Some(i) => i,
            None => {
                nodes.push((r.host, r.port));
                nodes.len() - 1
            }
        };
        for s in r.start..=r.end.min(16_383) {
            owner[usize::from(s)] = i as u16;
        }
    }
    let map = Arc::new(SlotOwners { owner, nodes });
    shared.slot_map.set(map.clone());
    Some(map)
}

/// Builds one pipeline per group with `build(shared, slot, items)` and sends them all
/// concurrently, each bounded by `limit`. `build` must put every key command before any
/// keyless one (a cluster routes a pipeline by its first key).
pub(super) async fn send_all<T, B>(
    shared: &Arc<Shared>,
    items: Items<T>,
    limit: Duration,
    build: B,
) -> Vec<Sent<T>>
where
    T: Send + 'static,
    B: Fn(&Shared, u16, &Items<T>) -> Pipeline + Clone + Send + Sync + 'static,
{
    let groups = plan(shared, items).await;
    let sends = groups.into_iter().map(|g| {
        let (shared, build) = (shared.clone(), build.clone());
        async move {
            let pipe = build(&shared, g.slot, &g.items);
            let count = pipe.cmd_iter().count();
            let mut conn = shared.conn();
            let replies = match timeout(limit, conn.query_routed(&g.route, pipe, count)).await {
                Ok(r) => r.map_err(|e: RedisError| e.to_string()),
                Err(_) => Err("timed out".to_owned()),
            };
            (g, replies)
        }
    });
    let mut out = Vec::new();
    let mut again = Vec::new();
    for (g, replies) in run_all(sends.collect()).await {
        if replies.is_err() && g.route != Route::Keys {
            // The map may be stale (a slot moved): read it again next time.
            shared.slot_map.clear();
            again.extend(g.items);
        } else {
            out.push(Sent {
                items: g.items,
                slot: g.slot,
                replies,
            });
        }
    }
    if !again.is_empty() {
        let sends = per_slot(again).into_iter().map(|g| {
            let (shared, build) = (shared.clone(), build.clone());
            async move {
                let pipe = build(&shared, g.slot, &g.items);
                let mut conn = shared.conn();
                let replies = match timeout(limit, pipe.query_async::<Vec<Value>>(&mut conn)).await
                {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("timed out".to_owned()),
                };
                Sent {
                    items: g.items,
                    slot: g.slot,
                    replies,
                }
            }
        });
        out.extend(run_all(sends.collect()).await);
    }
    out
}
