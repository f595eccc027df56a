use std::sync::Arc;

use std::time::Duration;

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
    pub(crate) frames: u64,
    pub(crate) bytes: u64,
    /// The body ended in an error (it is released at the first one).
    pub(crate) errored: bool,
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
        let id = shared.registry.register(Entry::new(route, key.clone()));
        shared.metrics.active_streams.increment(1.0);
        shared.metrics.streams_total.increment(1);
        Self {
            shared,
            id,
            frames: 0,
            bytes: 0,
            errored: false,
            keyed: key.map(|key| Box::new(Keyed { key, _lease: lease })),
        }
    }

    /// The controller's state this stream is registered in.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        // The start time lives in the registry entry only (one copy per stream).
        let (ended, entry) = self.shared.registry.deregister(self.id);
        let m = &self.shared.metrics;
        m.active_streams.decrement(1.0);
        let registry = &self.shared.registry;
        let age = entry.map_or(Duration::ZERO, |e| registry.age(&e, Instant::now()));
        m.stream_duration.record(age.as_secs_f64());
        tracing::debug!(
            stream.id = self.id,
            key = self.keyed.as_ref().map_or("-", |k| &*k.key),
            duration_ms = age.as_millis() as u64,
            frames = self.frames,
            bytes = self.bytes,
            errored = self.errored,
            ended = ?ended,
            panicking = std::thread::panicking(),
            "stream ended"
        );
    }
}
