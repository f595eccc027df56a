//! The background work: the release task, the heartbeat (with re-adds of lost leases) and the
//! sweep of expired leases. The heartbeat and the sweep run as separate tasks, so a long
//! `SCAN` never holds up a heartbeat.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ::redis::Value;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant, MissedTickBehavior};

use super::conn::{by_slot, run_all};
use super::lease::preload;
use super::shared::{Op, Release, Shared};

pub(super) type Leases = Vec<(Arc<str>, Vec<u64>)>;

/// Points inside a heartbeat where a test can step in, to order a release against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// The heartbeat has read the live leases and not yet sent its pipeline.
    Snapshot,
    /// The re-add has read the live leases of the keys that lost some and not yet sent.
    ReaddSnapshot,
}

// ---------------------------------------------------------------------------------------------
// Releases.

pub(super) async fn release_task(shared: Arc<Shared>, mut rx: mpsc::Receiver<Release>) {
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

async fn flush_releases(shared: &Arc<Shared>, batch: &mut Vec<Release>) {
    if batch.is_empty() {
        return;
    }
    let mut by_key: HashMap<Arc<str>, Vec<u64>> = HashMap::new();
    for r in batch.drain(..) {
        by_key.entry(r.key).or_default().push(r.id);
    }
    let keys: Leases = by_key.into_iter().collect();
    let _order = shared.order.lock().await;
    let groups = by_slot(shared.conn.is_cluster(), keys.clone());
    let sends = groups.into_iter().map(|(_, group)| {
        let shared = shared.clone();
        async move {
            let mut pipe = ::redis::pipe();
            let mut buf = String::new();
            for (key, ids) in &group {
                let cmd = pipe.cmd("ZREM").arg(&**key);
                for id in ids {
                    cmd.arg(shared.write_member(&mut buf, *id));
                }
            }
            pipe.ignore_errors();
            let mut conn = shared.conn();
            match timeout(
                shared.command_timeout,
                pipe.query_async::<Vec<Value>>(&mut conn),
            )
            .await
            {
                Ok(Ok(replies)) => {
                    if let Some(e) = first_error(&replies) {
                        shared.fail(Op::Release, "release", &e);
                    }
                }
                Ok(Err(e)) => shared.fail(Op::Release, "release", &e),
                Err(_) => shared.fail(Op::Release, "release", &"timed out"),
            }
        }
    });
    run_all(sends.collect()).await;
    for (key, ids) in &keys {
        shared.table.released(key, ids);
    }
}

fn first_error(replies: &[Value]) -> Option<String> {
    replies.iter().find_map(|v| match v {
        Value::ServerError(e) => Some(e.to_string()),
        _ => None,
    })
}

// ---------------------------------------------------------------------------------------------
// Heartbeat.

pub(super) async fn heartbeat_task(shared: Arc<Shared>) {
    preload(&shared).await;
    let start = Instant::now();
    let mut beat = tokio::time::interval_at(start + shared.heartbeat, shared.heartbeat);
    beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
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
        }
    }
}

/// One heartbeat: refreshes every live lease (one pipeline on a single node, one per hash slot
/// on a cluster, sent concurrently); returns how many leases were found missing and re-added.
pub(super) async fn heartbeat(shared: &Arc<Shared>) -> u64 {
    heartbeat_with(shared, |_| async {}).await
}

/// [`heartbeat`], calling `hook` at each [`Step`].
pub(super) async fn heartbeat_with<H, F>(shared: &Arc<Shared>, mut hook: H) -> u64
where
    H: FnMut(Step) -> F,
    F: Future<Output = ()>,
{
    let leases = shared.table.snapshot();
    if leases.is_empty() {
        return 0;
    }
    hook(Step::Snapshot).await;
    let groups = by_slot(shared.conn.is_cluster(), leases);
    let beats = groups
        .into_iter()
        .map(|(slot, group)| beat_group(shared.clone(), slot, group));
    let missing: Vec<Arc<str>> = run_all(beats.collect())
        .await
        .into_iter()
        .flatten()
        .collect();
    if missing.is_empty() {
        return 0;
    }
    readd(shared, missing, &mut hook).await
}

/// Refreshes one group's leases: `ZADD key XX CH <score> <member>…` and `PEXPIRE key ttl GT`
/// per key, then `TIME` (from the node owning the group's slot). Returns the keys that lost
/// leases. A key whose command fails on its own (a foreign key of the wrong type) is counted as
/// a heartbeat error and skipped; the other keys are refreshed as usual.
async fn beat_group(shared: Arc<Shared>, slot: u16, group: Leases) -> Vec<Arc<str>> {
    let score = shared.next_score(slot);
    let gt = !shared.legacy_expire.load(Ordering::Relaxed);
    let mut pipe = ::redis::pipe();
    let mut buf = String::new();
    for (key, ids) in &group {
        let cmd = pipe.cmd("ZADD").arg(&**key).arg("XX").arg("CH");
        for id in ids {
            cmd.arg(score).arg(shared.write_member(&mut buf, *id));
        }
        let exp = pipe.cmd("PEXPIRE").arg(&**key).arg(shared.ttl_ms);
        if gt {
            exp.arg("GT");
        }
    }
    pipe.cmd("TIME");
    pipe.ignore_errors();
    let mut conn = shared.conn();
    let values: Vec<Value> =
        match timeout(shared.command_timeout, pipe.query_async(&mut conn)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                shared.fail(Op::Heartbeat, "heartbeat", &e);
                return Vec::new();
            }
            Err(_) => {
                shared.fail(Op::Heartbeat, "heartbeat", &"timed out");
                return Vec::new();
            }
        };
    if let Some(Ok((secs, micros))) = values
        .last()
        .map(::redis::from_redis_value_ref::<(i64, i64)>)
    {
        shared.clock.note(slot, secs * 1000 + micros / 1000);
    }
    // Every heartbeat writes a score never written before, so `CH` counts every member that
    // still exists ("unchanged" cannot happen): a shortfall means leases were lost.
    let mut missing = Vec::new();
    for ((key, ids), replies) in group.iter().zip(values.chunks(2)) {
        match &replies[0] {
            Value::Int(changed) => {
                // Leases released since the snapshot may be gone for that reason alone.
                let released = ids.len() - shared.table.count_live(key, ids);
                if (*changed).max(0) as usize + released < ids.len() {
                    missing.push(key.clone());
                }
            }
            Value::ServerError(e) => {
                shared.fail(Op::Heartbeat, "heartbeat of one key", &e.to_string());
            }
            _ => {}
        }
        if let Some(Value::ServerError(e)) = replies.get(1) {
            note_expire_error(&shared, &e.to_string());
        }
    }
    missing
}

/// Whether an error answer to `PEXPIRE key ttl GT` means the server predates Redis 7.
pub(super) fn gt_unsupported(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("wrong number of arguments") || m.contains("syntax") || m.contains("unsupported")
}

fn note_expire_error(shared: &Shared, message: &str) {
    if gt_unsupported(message) {
        if !shared.legacy_expire.swap(true, Ordering::Relaxed) {
            tracing::info!(
                "tower-drain redis store: PEXPIRE GT unsupported (Redis < 7), using plain PEXPIRE"
            );
        }
    } else {
        shared.fail(Op::Heartbeat, "heartbeat expiry of one key", &message);
    }
}

/// Re-adds this process's live leases of `keys` (without a limit check: they are already
/// serving), after Redis lost them.
async fn readd<H, F>(shared: &Arc<Shared>, keys: Vec<Arc<str>>, hook: &mut H) -> u64
where
    H: FnMut(Step) -> F,
    F: Future<Output = ()>,
{
    // Releases wait while a re-add runs, so none lands before a re-add of the lease it
    // releases; a lease released before this point is no longer live and is skipped.
    let _order = shared.order.lock().await;
    let mut leases: Leases = Vec::new();
    for key in keys {
        // Fresh from the table: a lease dropped since the heartbeat's snapshot is not re-added.
        let ids = shared.table.snapshot_key(&key);
        if !ids.is_empty() {
            leases.push((key, ids));
        }
    }
    let count: u64 = leases.iter().map(|(_, ids)| ids.len() as u64).sum();
    if count == 0 {
        return 0;
    }
    hook(Step::ReaddSnapshot).await;
    let n_keys = leases.len();
    let groups = by_slot(shared.conn.is_cluster(), leases);
    let sends = groups
        .into_iter()
        .map(|(slot, group)| readd_group(shared.clone(), slot, group));
    let added: u64 = run_all(sends.collect()).await.into_iter().sum();
    if added > 0 {
        tracing::warn!(
            instance = %shared.instance,
            leases = added,
            keys = n_keys,
            "tower-drain redis store: leases were missing from Redis (restart, failover or flush); re-added them"
        );
    }
    added
}

async fn readd_group(shared: Arc<Shared>, slot: u16, group: Leases) -> u64 {
    let score = shared.next_score(slot);
    let legacy = shared.legacy_expire.load(Ordering::Relaxed);
    let mut pipe = ::redis::pipe();
    let mut count = 0;
    for (key, ids) in &group {
        let cmd = pipe.cmd("ZADD").arg(&**key);
        for id in ids {
            cmd.arg(score).arg(shared.member(*id));
        }
        count += ids.len() as u64;
        if legacy {
            pipe.cmd("PEXPIRE").arg(&**key).arg(shared.ttl_ms);
        } else {
            // Set the expiry on a key created here, else only move it later.
            pipe.cmd("PEXPIRE").arg(&**key).arg(shared.ttl_ms).arg("NX");
            pipe.cmd("PEXPIRE").arg(&**key).arg(shared.ttl_ms).arg("GT");
        }
    }
    pipe.ignore_errors();
    let mut conn = shared.conn();
    match timeout(
        shared.command_timeout,
        pipe.query_async::<Vec<Value>>(&mut conn),
    )
    .await
    {
        Ok(Ok(replies)) => {
            if let Some(e) = first_error(&replies) {
                shared.fail(Op::Heartbeat, "re-adding lost leases", &e);
                0
            } else {
                count
            }
        }
        Ok(Err(e)) => {
            shared.fail(Op::Heartbeat, "re-adding lost leases", &e);
            0
        }
        Err(_) => {
            shared.fail(Op::Heartbeat, "re-adding lost leases", &"timed out");
            0
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sweep.

pub(super) async fn sweep_task(shared: Arc<Shared>) {
    let mut sweep = tokio::time::interval_at(Instant::now() + shared.sweep, shared.sweep);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => break,
            _ = sweep.tick() => {
                tokio::select! {
                    _ = shared.cancel.cancelled() => break,
                    _ = sweep_expired(&shared) => {}
                }
            }
        }
    }
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
        let removed = super::cluster::sweep_primaries(shared).await;
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

impl NodeLink for super::conn::Conn {
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
