//! The release task and the heartbeat (with re-adds of lost leases). The sweep runs as a task
//! of its own (`sweep.rs`), so a long `SCAN` never holds up a heartbeat.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ::redis::Value;
use tokio::sync::mpsc;

use super::lease::preload;
use super::route::{send_all, Sent};
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
    let sent = send_all(shared, keys, shared.command_timeout, build_zrem).await;
    for s in sent {
        match &s.replies {
            Ok(replies) => {
                if let Some(e) = first_error(replies) {
                    shared.fail(Op::Release, "release", &e);
                }
            }
            Err(e) => shared.fail(Op::Release, "release", e),
        }
        for (key, ids) in &s.items {
            shared.table.released(key, ids);
        }
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
    shared.every(shared.heartbeat, || heartbeat(&shared)).await;
}

/// One heartbeat: refreshes every live lease (one pipeline on a single node, one per primary
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
    let sent = send_all(shared, leases, shared.command_timeout, build_beat).await;
    let mut missing: Vec<Arc<str>> = Vec::new();
    for s in sent {
        missing.extend(lost_keys(shared, s));
    }
    if missing.is_empty() {
        return 0;
    }
    readd(shared, missing, &mut hook).await
}

/// Per key `ZADD key XX CH <score> <member>…` and `PEXPIRE key ttl GT`, then `TIME` (from the
/// One `ZREM key member…` per key (the shutdown clean-up's and the release task's pipeline).
pub(super) fn build_zrem(shared: &Shared, _slot: u16, items: &Leases) -> ::redis::Pipeline {
    let mut pipe = ::redis::pipe();
    let mut buf = String::new();
    for (key, ids) in items {
        let cmd = pipe.cmd("ZREM").arg(&**key);
        for id in ids {
            cmd.arg(shared.write_member(&mut buf, *id));
        }
    }
    pipe.ignore_errors();
    pipe
}

/// node owning the keys).
fn build_beat(shared: &Shared, slot: u16, items: &Leases) -> ::redis::Pipeline {
    let score = shared.next_score(slot);
    let gt = !shared.legacy_expire.load(Ordering::Relaxed);
    let mut pipe = ::redis::pipe();
    let mut buf = String::new();
    for (key, ids) in items {
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
    pipe
}

/// The keys of one heartbeat pipeline that lost leases. A key whose command fails on its own
/// (a foreign key of the wrong type) is counted as a heartbeat error and skipped; the other
/// keys count as usual.
fn lost_keys(shared: &Shared, sent: Sent<Vec<u64>>) -> Vec<Arc<str>> {
    let values = match sent.replies {
        Ok(v) => v,
        Err(e) => {
            shared.fail(Op::Heartbeat, "heartbeat", &e);
            return Vec::new();
        }
    };
    if let Some(Ok((secs, micros))) = values
        .last()
        .map(::redis::from_redis_value_ref::<(i64, i64)>)
    {
        let now = secs * 1000 + micros / 1000;
        shared.clock.note(sent.slot, now);
        for (key, _) in &sent.items {
            shared.clock.note(shared.slot(key), now);
        }
    }
    // Every heartbeat writes a score never written before, so `CH` counts every member that
    // still exists ("unchanged" cannot happen): a shortfall means leases were lost.
    let mut missing = Vec::new();
    for ((key, ids), replies) in sent.items.iter().zip(values.chunks(2)) {
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
            note_expire_error(shared, &e.to_string());
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
    let sent = send_all(shared, leases, shared.command_timeout, build_readd).await;
    let mut added = 0;
    for s in sent {
        match s.replies {
            Ok(replies) => match first_error(&replies) {
                Some(e) => shared.fail(Op::Heartbeat, "re-adding lost leases", &e),
                None => added += s.items.iter().map(|(_, ids)| ids.len() as u64).sum::<u64>(),
            },
            Err(e) => shared.fail(Op::Heartbeat, "re-adding lost leases", &e),
        }
    }
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

/// Per key `ZADD key <score> <member>…` and the expiry: set on a key created here, else only
/// moved later (`NX`, then `GT`; a plain `PEXPIRE` before Redis 7).
fn build_readd(shared: &Shared, slot: u16, items: &Leases) -> ::redis::Pipeline {
    let score = shared.next_score(slot);
    let legacy = shared.legacy_expire.load(Ordering::Relaxed);
    let mut pipe = ::redis::pipe();
    for (key, ids) in items {
        let cmd = pipe.cmd("ZADD").arg(&**key);
        for id in ids {
            cmd.arg(score).arg(shared.member(*id));
        }
        if legacy {
            pipe.cmd("PEXPIRE").arg(&**key).arg(shared.ttl_ms);
        } else {
            pipe.cmd("PEXPIRE").arg(&**key).arg(shared.ttl_ms).arg("NX");
            pipe.cmd("PEXPIRE").arg(&**key).arg(shared.ttl_ms).arg("GT");
        }
    }
    pipe.ignore_errors();
    pipe
}
