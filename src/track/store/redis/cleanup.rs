//! The shutdown clean-up: release every lease this process still holds, in batches.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ::redis::Value;
use tokio::time::{timeout, Instant};

use super::route::send_all;
use super::shared::{Op, Shared};
use super::table::lock;
use super::tasks::{build_zrem, Leases};
use crate::controller::CleanupSummary;

/// Stops the background tasks and `ZREM`s every lease still held, `cleanup_batch` members per
/// round (one pipeline per primary on a cluster, sent concurrently), until none remain, the
/// iteration cap is reached or the time budget is spent.
pub(super) async fn cleanup(shared: Arc<Shared>) -> CleanupSummary {
    let started = Instant::now();
    let deadline = started + shared.cleanup_timeout;
    shared.shut.store(true, Ordering::Release);
    // Stop the heartbeat and the sweep, and let the release task send what is queued.
    shared.cancel.cancel();
    let tasks = std::mem::take(&mut *lock(&shared.tasks));

    let mut queue: VecDeque<(Arc<str>, Vec<u64>)> = shared.table.take_all().into();
    let before: u64 = queue.iter().map(|(_, ids)| ids.len() as u64).sum();
    let mut cleaned = 0u64;
    let mut iterations = 0u32;
    while !queue.is_empty() && iterations < shared.cleanup_max_iterations {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        iterations += 1;
        let batch = take_batch(&mut queue, shared.cleanup_batch);
        let budget = shared.command_timeout.min(deadline - now);
        let mut failed = false;
        for sent in send_all(&shared, batch, budget, build_zrem).await {
            match sent.replies {
                Ok(replies) => cleaned += removed(&shared, &replies),
                Err(e) => {
                    shared.fail(Op::Cleanup, "shutdown clean-up", &e);
                    failed = true;
                    for item in sent.items.into_iter().rev() {
                        queue.push_front(item);
                    }
                }
            }
        }
        if failed {
            // Retry the failed groups after a short pause.
            let pause = Duration::from_millis(50);
            if Instant::now() + pause >= deadline {
                break;
            }
            tokio::time::sleep(pause).await;
        }
    }
    let after: u64 = queue.iter().map(|(_, ids)| ids.len() as u64).sum();
    let reached = after > 0 && iterations >= shared.cleanup_max_iterations;
    // Give the release task a moment to send what it already had queued.
    for t in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = timeout(left, t).await;
    }
    shared.stale_cleaned.increment(cleaned);
    let summary = CleanupSummary::new(
        cleaned,
        iterations,
        before,
        after,
        started.elapsed(),
        reached,
    );
    if after > 0 {
        tracing::warn!(
            before, cleaned, after, iterations, max_iterations_reached = reached,
            "tower-drain redis store: shutdown clean-up left leases behind (they expire by their TTL)"
        );
    } else {
        tracing::info!(
            before,
            cleaned,
            iterations,
            "tower-drain redis store: shutdown clean-up done"
        );
    }
    summary
}

/// Up to `max` members from the front of the queue, splitting a key's list when needed.
fn take_batch(queue: &mut VecDeque<(Arc<str>, Vec<u64>)>, max: usize) -> Leases {
    let mut batch = Vec::new();
    let mut n = 0;
    while n < max {
        let Some((key, mut ids)) = queue.pop_front() else {
            break;
        };
        let room = max - n;
        if ids.len() > room {
            let rest = ids.split_off(room);
            queue.push_front((key.clone(), rest));
        }
        n += ids.len();
        batch.push((key, ids));
    }
    batch
}

/// Members the `ZREM`s removed; a key failing on its own (a foreign key of the wrong type)
/// holds nothing of ours and is counted as a clean-up error.
fn removed(shared: &Shared, replies: &[Value]) -> u64 {
    let mut n = 0;
    for r in replies {
        match r {
            Value::Int(x) => n += (*x).max(0) as u64,
            Value::ServerError(e) => {
                shared.fail(Op::Cleanup, "shutdown clean-up of one key", &e.to_string())
            }
            _ => {}
        }
    }
    n
}
