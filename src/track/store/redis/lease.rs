//! Acquire (one script call on one key) and the lease whose `Drop` queues its release.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use ::redis::Script;
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::shared::{Op, Release, Shared};
use crate::track::store::{Lease, LeaseInner, StoreError};

static ACQUIRE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("acquire.lua")));

/// Loads the acquire script (warms the script cache; a failure here is not an error yet).
pub(super) async fn preload(shared: &Shared) {
    let mut conn = shared.conn();
    let _ = timeout(
        shared.command_timeout,
        ACQUIRE_SCRIPT.prepare_invoke().load_async(&mut conn),
    )
    .await;
}

/// Future returned by [`RedisStore::acquire`](crate::track::ConnectionStore::acquire): one `EVALSHA`,
/// bounded by the acquire timeout.
#[must_use = "futures do nothing unless polled"]
pub struct AcquireFuture {
    inner: Pin<Box<dyn Future<Output = Result<Option<Lease>, StoreError>> + Send>>,
}

impl Future for AcquireFuture {
    type Output = Result<Option<Lease>, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for AcquireFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcquireFuture").finish_non_exhaustive()
    }
}

impl AcquireFuture {
    pub(super) fn new(shared: Arc<Shared>, key: Arc<str>, limit: u32) -> Self {
        Self {
            inner: Box::pin(acquire(shared, key, limit)),
        }
    }
}

/// If an acquire is abandoned (timeout, client gone) after its script may have run, queue a
/// `ZREM` of its member so the slot does not stay taken until the TTL.
struct InFlight {
    shared: Arc<Shared>,
    key: Arc<str>,
    id: u64,
    armed: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.shared.release_tx.try_send(Release {
                key: self.key.clone(),
                id: self.id,
            });
        }
    }
}

async fn acquire(
    shared: Arc<Shared>,
    key: Arc<str>,
    limit: u32,
) -> Result<Option<Lease>, StoreError> {
    if shared.shut.load(Ordering::Acquire) {
        return Err(StoreError::new("redis store is shut down"));
    }
    if limit == 0 {
        return Ok(None);
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let mut inv = ACQUIRE_SCRIPT.key(&*key);
    inv.arg(shared.member(id)).arg(limit).arg(shared.ttl_ms);
    for pending in shared.table.releasing(&key) {
        inv.arg(shared.member(pending));
    }
    let mut guard = InFlight {
        shared: shared.clone(),
        key: key.clone(),
        id,
        armed: true,
    };
    let mut conn = shared.conn();
    let reply = timeout(
        shared.acquire_timeout,
        inv.invoke_async::<(i64, i64, i64)>(&mut conn),
    )
    .await;
    let (granted, now, _held) = match reply {
        Err(_) => {
            let e = StoreError::new(format!(
                "redis acquire timed out after {} ms",
                shared.acquire_timeout.as_millis()
            ));
            shared.warn("acquire", &e);
            return Err(e);
        }
        Ok(Err(e)) => {
            shared.warn("acquire", &e);
            return Err(StoreError::with_source("redis acquire failed", e));
        }
        Ok(Ok(r)) => r,
    };
    shared.clock.note(shared.slot(&key), now);
    if granted != 1 {
        guard.armed = false;
        return Ok(None);
    }
    shared
        .max_score
        .fetch_max(now + shared.ttl_ms, Ordering::Relaxed);
    if shared.shut.load(Ordering::Acquire) {
        // Shutdown began while the script ran: the guard queues the ZREM (or the lease expires).
        return Err(StoreError::new("redis store is shut down"));
    }
    shared.table.insert(&key, id);
    guard.armed = false;
    Ok(Some(Lease::from_inner(LeaseInner::Redis(RedisLease {
        shared,
        key,
        id,
    }))))
}

/// A granted Redis lease; dropping it queues its release.
pub(crate) struct RedisLease {
    shared: Arc<Shared>,
    key: Arc<str>,
    id: u64,
}

impl Drop for RedisLease {
    fn drop(&mut self) {
        let s = &self.shared;
        // Mark it releasing before queueing, so an acquire racing with the release task
        // already removes it.
        if !s.table.release(&self.key, self.id, true) {
            return; // taken by the shutdown clean-up
        }
        let msg = Release {
            key: self.key.clone(),
            id: self.id,
        };
        match s.release_tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(m)) => {
                s.table.released(&m.key, &[m.id]);
                s.fail(
                    Op::Release,
                    "release (queue full; the lease will expire by its TTL)",
                    &"channel full",
                );
            }
            Err(mpsc::error::TrySendError::Closed(m)) => {
                // The store is gone or shut down: nothing will heartbeat it, it expires by TTL.
                s.table.released(&m.key, &[m.id]);
            }
        }
    }
}
