//! The sweep: removes expired leases of any process under this prefix, on every primary, in
//! a task of its own so that a long `SCAN` never delays a heartbeat.

use std::sync::Arc;

use ::redis::Value;
use tokio::time::timeout;

use super::conn::NodeLink;
use super::shared::{Op, Shared};

pub(super) async fn sweep_task(shared: Arc<Shared>) {
    shared.every(shared.sweep, || sweep_expired(&shared)).await;
}

pub(super) fn sweep_pattern(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 4);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push_str(":{*");
    out
}

/// Removes expired leases (of any process) under this prefix, on every primary; returns how
/// many.
pub(super) async fn sweep_expired(shared: &Arc<Shared>) -> u64 {
    #[cfg(feature = "redis-cluster")]
    if shared.conn.is_cluster() {
        let removed = sweep_primaries(shared).await;
        note_swept(shared, removed);
        return removed;
    }
    let removed = sweep_node(shared, shared.conn()).await;
    note_swept(shared, removed);
    removed
}

fn note_swept(shared: &Shared, removed: u64) {
    if removed > 0 {
        shared.stale_cleaned.increment(removed);
        tracing::info!(removed, "tower-drain redis store: swept expired leases");
    }
}

/// Sweeps the keys of one node: `TIME` there, then `SCAN … TYPE zset` pages, each followed by
/// one pipeline of `ZREMRANGEBYSCORE key -inf <now>` for the page's keys.
pub(super) async fn sweep_node<L: NodeLink>(shared: &Shared, mut link: L) -> u64 {
    let pattern = sweep_pattern(&shared.prefix);
    let now = match timeout(shared.command_timeout, link.query(::redis::cmd("TIME"))).await {
        Ok(Ok(v)) => match ::redis::from_redis_value::<(i64, i64)>(v).map_err(|e| e.to_string()) {
            Ok((s, us)) => s * 1000 + us / 1000,
            Err(e) => {
                shared.fail(Op::Sweep, "sweep", &e);
                return 0;
            }
        },
        Ok(Err(e)) => {
            shared.fail(Op::Sweep, "sweep", &e);
            return 0;
        }
        Err(_) => {
            shared.fail(Op::Sweep, "sweep", &"timed out");
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
        let page = match timeout(shared.command_timeout, link.query(scan)).await {
            Ok(Ok(v)) => {
                ::redis::from_redis_value::<(u64, Vec<String>)>(v).map_err(|e| e.to_string())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => {
                shared.fail(Op::Sweep, "sweep", &"timed out");
                break;
            }
        };
        let (next, keys) = match page {
            Ok(r) => r,
            Err(e) => {
                shared.fail(Op::Sweep, "sweep", &e);
                break;
            }
        };
        if !keys.is_empty() {
            let mut pipe = ::redis::pipe();
            for k in &keys {
                pipe.cmd("ZREMRANGEBYSCORE").arg(k).arg("-inf").arg(now);
            }
            pipe.ignore_errors();
            match timeout(shared.command_timeout, link.query_pipe(pipe, keys.len())).await {
                // A key that moved to another node meanwhile answers MOVED: the next sweep
                // there takes it.
                Ok(Ok(n)) => {
                    removed += n
                        .iter()
                        .map(|v| match v {
                            Value::Int(x) => (*x).max(0) as u64,
                            _ => 0,
                        })
                        .sum::<u64>()
                }
                Ok(Err(e)) => {
                    shared.fail(Op::Sweep, "sweep", &e);
                    break;
                }
                Err(_) => {
                    shared.fail(Op::Sweep, "sweep", &"timed out");
                    break;
                }
            }
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    removed
}

/// Sweeps every primary concurrently; returns how many expired leases were removed.
#[cfg(feature = "redis-cluster")]
async fn sweep_primaries(shared: &Arc<Shared>) -> u64 {
    let links = match super::cluster::primary_links(shared).await {
        Ok(l) => l,
        Err(e) => {
            shared.fail(Op::Sweep, "sweep (listing the primaries)", &e);
            return 0;
        }
    };
    let sweeps = links.into_iter().map(|link| {
        let shared = shared.clone();
        async move { sweep_node(&shared, link).await }
    });
    super::conn::run_all(sweeps.collect())
        .await
        .into_iter()
        .sum()
}
