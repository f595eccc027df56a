use std::sync::Arc;

use tokio::time::Instant;

use super::registry::Entry;
use super::store::Lease;
use crate::controller::Shared;

/// Keeps one stream registered from `call` until its body ends or is dropped.
///
/// Dropping it is the only clean-up path (disconnect, error, panic, timeout alike), so it
/// must never panic: everything here is infallible.
pub(crate) struct StreamGuard {
    shared: Arc<Shared>,
    id: u64,
    started: Instant,
    pub(crate) frames: u64,
    pub(crate) bytes: u64,
    pub(crate) errors: u64,
    /// Keyed streams only (they allocate for the key anyway); boxed so that every tracked
    /// body stays small.
    keyed: Option<Box<Keyed>>,
}

struct Keyed {
    key: Arc<str>,
    _lease: Option<Lease>,
}

impl StreamGuard {
    pub(crate) fn new(
        shared: Arc<Shared>,
        route: crate::route::RoutePath,
        key: Option<Arc<str>>,
        lease: Option<Lease>,
    ) -> Self {
        let started = Instant::now();
        let id = shared.registry.register(Entry {
            route,
            key: key.clone(),
            started,
        });
        shared.metrics.active_streams.increment(1.0);
        shared.metrics.streams_total.increment(1);
        Self {
            shared,
            id,
            started,
            frames: 0,
            bytes: 0,
            errors: 0,
            keyed: key.map(|key| Box::new(Keyed { key, _lease: lease })),
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let ended = self.shared.registry.deregister(self.id);
        let m = &self.shared.metrics;
        m.active_streams.decrement(1.0);
        let age = self.started.elapsed();
        m.stream_duration.record(age.as_secs_f64());
        tracing::debug!(
            stream.id = self.id,
            key = self.keyed.as_ref().map_or("-", |k| &*k.key),
            duration_ms = age.as_millis() as u64,
            frames = self.frames,
            bytes = self.bytes,
            errors = self.errors,
            ended = ?ended,
            panicking = std::thread::panicking(),
            "stream ended"
        );
    }
}
