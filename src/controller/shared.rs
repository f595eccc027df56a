//! The state shared by the controller, its watches and every layer built from them.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{CleanupSummary, DrainConfig, DrainReason, Phase, ShutdownReport};
use crate::metrics::Metrics;
use crate::track::registry::Registry;

type CleanupFuture = Pin<Box<dyn Future<Output = Option<CleanupSummary>> + Send>>;
pub(crate) type CleanupFn = Box<dyn FnOnce() -> CleanupFuture + Send>;

/// Clean-ups registered without a store id beyond which a warning is logged (once): layers
/// built over and over with such a store (one stack per connection) each keep theirs until
/// the drain.
const ANONYMOUS_CLEANUPS_WARN: usize = 64;

/// The store clean-ups to run at the end of a drain.
#[derive(Default)]
pub(super) struct Cleanups {
    /// Each with the id of the store it cleans (see `ConnectionStore::store_id`), if any.
    pub(super) fns: Vec<(Option<usize>, CleanupFn)>,
    anonymous: usize,
}

/// The tokens cancelled as the drain moves on: each once, in this order.
pub(super) struct Signals {
    pub(super) draining: CancellationToken,
    pub(super) closing: CancellationToken,
    /// The grace deadline passed (or was cut short).
    pub(super) forced: CancellationToken,
    pub(super) stopped: CancellationToken,
}

/// The report's counts kept as the drain goes.
pub(super) struct Counts {
    pub(super) notified: AtomicU64,
    pub(super) rejected: AtomicU64,
    /// The counts are final.
    pub(super) frozen: AtomicBool,
}

/// State shared by the controller, its watches and every layer built from them.
pub(crate) struct Shared {
    pub(crate) config: DrainConfig,
    pub(super) phase: AtomicU8,
    pub(super) signals: Signals,
    /// Cancelled by [`DrainController::force_now`](super::DrainController::force_now) (a
    /// second signal): skip what is left of the propagation delay and of the grace period.
    pub(super) hurry: CancellationToken,
    /// When the drain started.
    pub(super) started: OnceLock<Instant>,
    pub(super) reason: OnceLock<DrainReason>,
    pub(super) report: OnceLock<ShutdownReport>,
    pub(super) cleanups: Mutex<Cleanups>,
    pub(crate) registry: Registry,
    pub(crate) metrics: Metrics,
    /// Streams open when `Closing` began, and drain slots handed out since.
    pub(super) at_drain: AtomicU64,
    pub(super) slots: AtomicU64,
    pub(super) counts: Counts,
    pub(super) seed: u64,
    /// The runtime the controller was built on, if any: `drain()` called from a thread
    /// without one spawns its task there.
    pub(super) runtime: Option<tokio::runtime::Handle>,
}

impl Shared {
    /// The state of a controller built with `config`, in `Serving`.
    pub(super) fn new(config: DrainConfig) -> Self {
        Self {
            config,
            phase: AtomicU8::new(Phase::Serving as u8),
            signals: Signals {
                draining: CancellationToken::new(),
                closing: CancellationToken::new(),
                forced: CancellationToken::new(),
                stopped: CancellationToken::new(),
            },
            hurry: CancellationToken::new(),
            started: OnceLock::new(),
            reason: OnceLock::new(),
            report: OnceLock::new(),
            cleanups: Mutex::new(Cleanups::default()),
            registry: Registry::new(),
            metrics: Metrics::new(),
            at_drain: AtomicU64::new(0),
            slots: AtomicU64::new(0),
            counts: Counts {
                notified: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
                frozen: AtomicBool::new(false),
            },
            seed: random_seed(),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    #[inline]
    pub(crate) fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    pub(super) fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
        tracing::info!(phase = p.as_str(), "tower-drain phase changed");
    }

    pub(crate) fn reason(&self) -> Option<&DrainReason> {
        self.reason.get()
    }

    pub(crate) fn closing_token(&self) -> &CancellationToken {
        &self.signals.closing
    }

    pub(crate) fn forced_token(&self) -> &CancellationToken {
        &self.signals.forced
    }

    /// Resolves at the hard deadline: the grace deadline (or the moment
    /// [`DrainController::force_now`](super::DrainController::force_now) cut it short) plus
    /// the force linger. Connections still open then are dropped. Never resolves without a
    /// drain.
    #[cfg(feature = "hyper")]
    pub(crate) async fn hard_deadline(&self) {
        self.signals.draining.cancelled().await;
        let started = *self
            .started
            .get()
            .expect("set before Draining is signalled");
        match started.checked_add(self.config.grace_period) {
            Some(grace_end) => tokio::select! {
                _ = tokio::time::sleep_until(grace_end) => {}
                _ = self.hurry.cancelled() => {}
            },
            None => self.hurry.cancelled().await,
        }
        tokio::time::sleep(self.config.force_linger).await;
    }

    pub(crate) fn count_rejected(&self) {
        self.counts.rejected.fetch_add(1, Ordering::Relaxed);
        self.metrics.rejected_draining.increment(1);
    }

    pub(crate) fn count_notified(&self) {
        // After the report's counts are frozen, a stream registered since then may still be
        // handed a frame; it is not part of the report.
        if !self.counts.frozen.load(Ordering::SeqCst) {
            self.counts.notified.fetch_add(1, Ordering::SeqCst);
        }
        self.metrics.notified.increment(1);
    }

    /// A ticket for one stream's shutdown frame: how long after `Closing` began it is due
    /// (its share of the spread), and its slot number, for the reconnect jitter (see
    /// [`slot_jitter`](Self::slot_jitter)).
    pub(crate) fn take_slot(&self) -> (Duration, u32) {
        let slot = self.slots.fetch_add(1, Ordering::Relaxed);
        let spread = self.config.drain_spread;
        let total = self.at_drain.load(Ordering::Acquire);
        let delay = if spread.is_zero() || total <= 1 {
            Duration::ZERO
        } else {
            spread.mul_f64((slot.min(total - 1)) as f64 / total as f64)
        };
        (delay, slot as u32)
    }

    /// The jitter seed of drain slot `slot` (recomputed rather than stored per stream).
    pub(crate) fn slot_jitter(&self, slot: u32) -> u64 {
        splitmix64(self.seed ^ u64::from(slot))
    }

    /// The reconnect delay with this stream's jitter applied, in milliseconds.
    pub(crate) fn jittered_retry_ms(&self, jitter_seed: u64) -> u64 {
        let base = self.config.reconnect_delay.as_millis() as f64;
        let j = self.config.reconnect_jitter;
        // u in [0, 1): 53 random bits.
        let u = (jitter_seed >> 11) as f64 / (1u64 << 53) as f64;
        (base * (1.0 + j * (2.0 * u - 1.0))).round().max(0.0) as u64
    }

    /// Registers a store's clean-up; one per `id` (clones of one store share it), or one
    /// per call without an id.
    pub(crate) fn register_cleanup(&self, id: Option<usize>, f: CleanupFn) {
        let mut c = self.cleanups.lock().unwrap_or_else(|e| e.into_inner());
        match id {
            Some(id) if c.fns.iter().any(|(other, _)| *other == Some(id)) => return,
            Some(_) => {}
            None => {
                c.anonymous += 1;
                if c.anonymous == ANONYMOUS_CLEANUPS_WARN {
                    tracing::warn!(
                        count = c.anonymous,
                        "tower-drain: many TrackLayers were built with a store that has no \
                         store_id; each keeps its clean-up until the drain. Build the layer \
                         once and clone it, or implement ConnectionStore::store_id"
                    );
                }
            }
        }
        c.fns.push((id, f));
    }

    pub(super) fn set_phase_if_below(&self, p: Phase) {
        let _ = self.phase.fetch_max(p as u8, Ordering::AcqRel);
    }
}

/// SplitMix64: a tiny, well-mixed hash for per-stream jitter (not for anything secret).
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A seed that differs per controller and per process, from std's randomly keyed hasher.
pub(crate) fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}
