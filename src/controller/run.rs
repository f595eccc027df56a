//! The drain task: from `Draining` through `Closing` to `Stopped` and the report.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::time::Instant;

use super::shared::Shared;
use super::{CleanupSummary, DrainReason, Phase, ShutdownReport};

impl Shared {
    /// Runs the registered clean-ups, each bounded by the clean-up timeout; one that panics
    /// or times out is logged and leaves no summary.
    async fn run_cleanups(&self) -> Option<CleanupSummary> {
        let cfg = &self.config;
        let cleanups =
            std::mem::take(&mut self.cleanups.lock().unwrap_or_else(|e| e.into_inner()).fns);
        let mut store_cleanup: Option<CleanupSummary> = None;
        for (_, f) in cleanups {
            // A task of its own: a store's panic ends that task, never the drain.
            let mut task = tokio::spawn(async move { f().await });
            match tokio::time::timeout(cfg.cleanup_timeout, &mut task).await {
                Ok(Ok(Some(s))) => store_cleanup = Some(merge(store_cleanup, s)),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "tower-drain store clean-up failed"),
                Err(_) => {
                    task.abort();
                    tracing::warn!(
                        timeout_ms = cfg.cleanup_timeout.as_millis() as u64,
                        "tower-drain store clean-up timed out"
                    );
                }
            }
        }
        store_cleanup
    }

    /// Walks the phases after `drain()`; runs as one spawned task per controller.
    pub(super) async fn run(self: Arc<Self>, started: Instant) {
        let cfg = &self.config;
        if !cfg.propagation_delay.is_zero() {
            // Without a delay, close at once: a timer due now still waits for the time
            // driver's next turn (up to a millisecond) before streams hear of the drain.
            tokio::select! {
                _ = tokio::time::sleep_until(started + cfg.propagation_delay) => {}
                _ = self.hurry.cancelled() => {}
            }
        }

        let closing_at = Instant::now();
        let at_drain = self.registry.close();
        self.at_drain.store(at_drain, Ordering::Release);
        self.set_phase(Phase::Closing);
        self.signals.closing.cancel();
        tracing::info!(streams = at_drain, "tower-drain notifying open streams");

        let deadline = started + cfg.grace_period;
        let mut progress =
            tokio::time::interval_at(closing_at + cfg.progress_interval, cfg.progress_interval);
        let force_closed = loop {
            tokio::select! {
                biased;
                _ = self.registry.wait_idle() => break 0,
                _ = self.hurry.cancelled() => break self.force(),
                _ = tokio::time::sleep_until(deadline) => break self.force(),
                _ = progress.tick() => {
                    tracing::info!(
                        streams_left = self.registry.active(),
                        remaining_ms = deadline.saturating_duration_since(Instant::now()).as_millis() as u64,
                        "tower-drain waiting for streams to end"
                    );
                }
            }
        };
        if force_closed > 0 {
            // Let the forced bodies hand over their last frame and end (bounded).
            let _ = tokio::time::timeout(cfg.force_linger, self.registry.wait_idle()).await;
        }
        let cleanup_at = Instant::now();

        let store_cleanup = self.run_cleanups().await;
        if let Some(s) = &store_cleanup {
            if s.after > 0 {
                tracing::warn!(
                    after = s.after,
                    before = s.before,
                    "tower-drain store clean-up left leases behind"
                );
            }
        }
        let end = Instant::now();

        // Final counts: nothing registered or ended from here on changes them, and a
        // notification after the freeze is not counted either.
        self.counts.frozen.store(true, Ordering::SeqCst);
        let counts = self.registry.stop();
        let report = ShutdownReport {
            reason: self.reason.get().cloned().unwrap_or(DrainReason::Manual),
            streams_at_drain: at_drain,
            notified: self.counts.notified.load(Ordering::SeqCst),
            closed_gracefully: counts.graceful,
            force_closed: counts.forced,
            rejected: self.counts.rejected.load(Ordering::Relaxed),
            opened_while_closing: counts.late,
            draining: closing_at - started,
            closing: cleanup_at - closing_at,
            cleanup: end - cleanup_at,
            duration: end - started,
            store_cleanup,
        };
        self.metrics
            .shutdown_duration
            .record(report.duration.as_secs_f64());
        tracing::info!(
            reason = report.reason.as_str(),
            streams_at_drain = report.streams_at_drain,
            notified = report.notified,
            closed_gracefully = report.closed_gracefully,
            force_closed = report.force_closed,
            rejected = report.rejected,
            duration_ms = report.duration.as_millis() as u64,
            "tower-drain shutdown report"
        );
        let _ = self.report.set(report);
        self.set_phase(Phase::Stopped);
        // Bodies the registry does not know of (a FrameLayer without a TrackLayer) end now too.
        self.signals.forced.cancel();
        self.signals.stopped.cancel();
    }

    /// The grace deadline passed: mark the rest as forced, log each one, wake their bodies.
    fn force(&self) -> u64 {
        let n = self.registry.force();
        let now = Instant::now();
        self.registry.for_each(|id, e| {
            tracing::warn!(
                stream.id = id,
                route = %e.route.path(),
                key = e.key.as_deref().unwrap_or("-"),
                age_ms = self.registry.age(e, now).as_millis() as u64,
                "tower-drain force-closing stream at grace deadline"
            );
        });
        tracing::warn!(force_closed = n, "tower-drain grace period over");
        self.metrics.force_closed.increment(n);
        self.set_phase_if_below(Phase::Closing);
        self.signals.forced.cancel();
        n
    }
}

fn merge(acc: Option<CleanupSummary>, s: CleanupSummary) -> CleanupSummary {
    match acc {
        None => s,
        Some(a) => CleanupSummary {
            total_cleaned: a.total_cleaned + s.total_cleaned,
            iterations: a.iterations.max(s.iterations),
            before: a.before + s.before,
            after: a.after + s.after,
            duration: a.duration + s.duration,
            max_iterations_reached: a.max_iterations_reached || s.max_iterations_reached,
        },
    }
}
