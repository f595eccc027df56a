//! The drain state machine: [`DrainController`] (held by the application) and [`DrainWatch`]
//! (held by the layers).
//!
//! ```text
//! Serving ──drain(reason)──▶ Draining ──propagation delay──▶ Closing ──all streams gone or grace over──▶ Stopped
//!                            readiness 503                   reject 503, notify streams            force-close the rest
//! ```
//!
//! Only the controller can start a drain; layers get a read-only [`DrainWatch`], so no
//! middleware can change application-wide state. Nothing is global: each controller is
//! independent, which is also what tests want.
//!
//! [`drain`](DrainController::drain) spawns one task on the current tokio runtime that walks
//! the phases: it waits out the propagation delay, enters `Closing` (streams receive their final
//! frame, new requests get `503`), waits until every tracked stream has ended or the grace
//! period is over (logging progress), force-closes what remains (logging each stream), runs the
//! connection store's clean-up, and reaches `Stopped` with a [`ShutdownReport`].
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! use std::time::Duration;
//! use tower_drain::{DrainController, DrainReason, Phase};
//!
//! let drain = DrainController::builder()
//!     .propagation_delay(Duration::from_secs(5))
//!     .build()
//!     .unwrap();
//! let watch = drain.watch(); // give this to the layers
//!
//! assert!(drain.drain(DrainReason::Programmatic("deploy")));
//! assert!(!drain.drain(DrainReason::Manual)); // the first reason wins
//! assert_eq!(watch.phase(), Phase::Draining);
//!
//! drain.closing().await; // five (paused) seconds later
//! let report = drain.report().await;
//! assert_eq!(report.reason.as_str(), "deploy");
//! assert_eq!(watch.phase(), Phase::Stopped);
//! # }
//! ```

mod config;
mod future;
mod phase;
mod report;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub(crate) use self::config::at_most_max;
pub use self::config::{ConfigError, DrainBuilder, DrainConfig, MAX_DURATION};
pub use self::future::{Closing, Draining, Stopped};
pub use self::phase::{DrainReason, Phase};
pub use self::report::{CleanupSummary, ShutdownReport};

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
struct Cleanups {
    /// Each with the id of the store it cleans (see `ConnectionStore::store_id`), if any.
    fns: Vec<(Option<usize>, CleanupFn)>,
    anonymous: usize,
}

/// State shared by the controller, its watches and every layer built from them.
pub(crate) struct Shared {
    pub(crate) config: DrainConfig,
    phase: AtomicU8,
    draining: CancellationToken,
    closing: CancellationToken,
    forced: CancellationToken,
    stopped: CancellationToken,
    /// Cancelled by [`DrainController::force_now`] (a second signal): skip what is left of
    /// the propagation delay and of the grace period.
    hurry: CancellationToken,
    /// When the drain started.
    started: OnceLock<Instant>,
    reason: OnceLock<DrainReason>,
    pub(crate) registry: Registry,
    pub(crate) metrics: Metrics,
    at_drain: AtomicU64,
    slots: AtomicU64,
    notified: AtomicU64,
    /// The report's counts are final.
    frozen: AtomicBool,
    rejected: AtomicU64,
    seed: u64,
    cleanups: Mutex<Cleanups>,
    report: OnceLock<ShutdownReport>,
    /// The runtime the controller was built on, if any: `drain()` called from a thread
    /// without one spawns its task there.
    runtime: Option<tokio::runtime::Handle>,
}

impl Shared {
    #[inline]
    pub(crate) fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
        tracing::info!(phase = p.as_str(), "tower-drain phase changed");
    }

    pub(crate) fn reason(&self) -> Option<&DrainReason> {
        self.reason.get()
    }

    pub(crate) fn closing_token(&self) -> &CancellationToken {
        &self.closing
    }

    pub(crate) fn forced_token(&self) -> &CancellationToken {
        &self.forced
    }

    /// Resolves at the hard deadline: the grace deadline (or the moment
    /// [`DrainController::force_now`] cut it short) plus the force linger. Connections still
    /// open then are dropped. Never resolves without a drain.
    #[cfg(feature = "hyper")]
    pub(crate) async fn hard_deadline(&self) {
        self.draining.cancelled().await;
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
        self.rejected.fetch_add(1, Ordering::Relaxed);
        self.metrics.rejected_draining.increment(1);
    }

    pub(crate) fn count_notified(&self) {
        // After the report's counts are frozen, a stream registered since then may still be
        // handed a frame; it is not part of the report.
        if !self.frozen.load(Ordering::SeqCst) {
            self.notified.fetch_add(1, Ordering::SeqCst);
        }
        self.metrics.notified.increment(1);
    }

    /// A ticket for one stream's shutdown frame: how long after `Closing` began it is due
    /// (its share of the spread), and a per-stream number for the reconnect jitter.
    /// A stream's slot in the drain spread: its delay and its slot number (see
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
    async fn run(self: Arc<Self>, started: Instant) {
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
        self.closing.cancel();
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
        self.frozen.store(true, Ordering::SeqCst);
        let counts = self.registry.stop();
        let report = ShutdownReport {
            reason: self.reason.get().cloned().unwrap_or(DrainReason::Manual),
            streams_at_drain: at_drain,
            notified: self.notified.load(Ordering::SeqCst),
            closed_gracefully: counts.graceful,
            force_closed: counts.forced,
            rejected: self.rejected.load(Ordering::Relaxed),
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
        self.forced.cancel();
        self.stopped.cancel();
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
        self.forced.cancel();
        n
    }

    fn set_phase_if_below(&self, p: Phase) {
        let _ = self.phase.fetch_max(p as u8, Ordering::AcqRel);
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

/// The read-only API shared by [`DrainController`] and [`DrainWatch`].
macro_rules! observe {
    ($ty:ident) => {
        impl $ty {
            /// The current phase.
            ///
            /// ```
            /// use tower_drain::{DrainController, Phase};
            /// let drain = DrainController::new();
            /// assert_eq!(drain.phase(), Phase::Serving);
            /// assert_eq!(drain.watch().phase(), Phase::Serving);
            /// ```
            pub fn phase(&self) -> Phase {
                self.shared.phase()
            }

            /// `true` from the moment a drain starts.
            ///
            /// ```
            /// let drain = tower_drain::DrainController::new();
            /// assert!(!drain.is_draining() && !drain.watch().is_draining());
            /// ```
            pub fn is_draining(&self) -> bool {
                self.shared.phase() >= Phase::Draining
            }

            /// The reason of the drain under way, if any.
            ///
            /// ```
            /// let drain = tower_drain::DrainController::new();
            /// assert!(drain.reason().is_none() && drain.watch().reason().is_none());
            /// ```
            pub fn reason(&self) -> Option<DrainReason> {
                self.shared.reason().cloned()
            }

            /// The validated settings.
            ///
            /// ```
            /// let drain = tower_drain::DrainController::new();
            /// assert_eq!(drain.watch().config().grace_period().as_secs(), 20);
            /// ```
            pub fn config(&self) -> &DrainConfig {
                &self.shared.config
            }

            /// Tracked streams currently open.
            ///
            /// ```
            /// let drain = tower_drain::DrainController::new();
            /// assert_eq!(drain.active_streams(), drain.watch().active_streams());
            /// ```
            pub fn active_streams(&self) -> u64 {
                self.shared.registry.active()
            }

            /// Resolves when a drain starts. See [`Draining`].
            pub fn draining(&self) -> Draining {
                Draining::new(self.shared.draining.clone().cancelled_owned())
            }

            /// Resolves when `Closing` begins. See [`Closing`].
            pub fn closing(&self) -> Closing {
                Closing::new(self.shared.closing.clone().cancelled_owned())
            }

            /// Resolves at `Stopped`; use it as the server's shutdown signal. See [`Stopped`].
            pub fn stopped(&self) -> Stopped {
                Stopped::new(self.shared.stopped.clone().cancelled_owned())
            }
        }
    };
}

/// The application's handle on the drain: starts it, observes it, and collects its report.
///
/// Cloning is cheap and every clone controls the same drain. Give layers a [`DrainWatch`]
/// from [`watch`](Self::watch) instead.
///
/// See the [module docs](self) for an example.
#[derive(Clone)]
pub struct DrainController {
    shared: Arc<Shared>,
}

/// A read-only view of a [`DrainController`]: what the layers hold.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let drain = tower_drain::DrainController::new();
/// let watch = drain.watch();
/// assert!(!watch.is_draining());
/// drain.drain(tower_drain::DrainReason::Manual);
/// assert!(watch.is_draining());
/// assert_eq!(watch.reason().unwrap().as_str(), "manual");
/// # }
/// ```
#[derive(Clone)]
pub struct DrainWatch {
    pub(crate) shared: Arc<Shared>,
}

impl Default for DrainController {
    fn default() -> Self {
        Self::new()
    }
}

impl DrainController {
    /// A controller with the default settings (grace 20 s, no propagation delay, reconnect
    /// delay 30 s with ±20 % jitter, no spread).
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// assert_eq!(drain.phase(), tower_drain::Phase::Serving);
    /// ```
    pub fn new() -> Self {
        Self::from_config(DrainConfig::default())
    }

    /// A builder for custom settings; see [`DrainBuilder`].
    ///
    /// ```
    /// let drain = tower_drain::DrainController::builder()
    ///     .reconnect_delay(std::time::Duration::from_secs(5))
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(drain.config().reconnect_delay().as_secs(), 5);
    /// ```
    pub fn builder() -> DrainBuilder {
        DrainBuilder::new()
    }

    pub(crate) fn from_config(config: DrainConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                phase: AtomicU8::new(Phase::Serving as u8),
                draining: CancellationToken::new(),
                closing: CancellationToken::new(),
                forced: CancellationToken::new(),
                stopped: CancellationToken::new(),
                hurry: CancellationToken::new(),
                started: OnceLock::new(),
                reason: OnceLock::new(),
                registry: Registry::new(),
                metrics: Metrics::new(),
                at_drain: AtomicU64::new(0),
                slots: AtomicU64::new(0),
                notified: AtomicU64::new(0),
                frozen: AtomicBool::new(false),
                rejected: AtomicU64::new(0),
                seed: random_seed(),
                cleanups: Mutex::new(Cleanups::default()),
                report: OnceLock::new(),
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
        }
    }

    /// A read-only watch for layers and anything else that only observes.
    ///
    /// ```
    /// let watch = tower_drain::DrainController::new().watch();
    /// assert_eq!(watch.active_streams(), 0);
    /// ```
    pub fn watch(&self) -> DrainWatch {
        DrainWatch {
            shared: self.shared.clone(),
        }
    }

    /// Starts a drain. Returns `true` if this call started it, `false` if a drain was already
    /// under way (its first reason is kept). The phase is `Draining` when this returns;
    /// the later phases are walked by one task, spawned on the current tokio runtime. Called
    /// from a thread without one (a signal or admin thread), the task goes to the runtime
    /// the controller was built on, or, if it was built outside any runtime too, to a
    /// small runtime on a thread of its own. It never panics.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tower_drain::{DrainController, DrainReason};
    /// let drain = DrainController::new();
    /// assert!(drain.drain(DrainReason::Signal));
    /// assert!(!drain.drain(DrainReason::Manual));
    /// assert_eq!(drain.reason(), Some(DrainReason::Signal));
    /// # }
    /// ```
    pub fn drain(&self, reason: DrainReason) -> bool {
        if self.shared.reason.set(reason.clone()).is_err() {
            tracing::debug!(
                reason = reason.as_str(),
                "tower-drain drain already started"
            );
            return false;
        }
        let started = Instant::now();
        let _ = self.shared.started.set(started);
        tracing::info!(
            reason = reason.as_str(),
            grace_ms = self.shared.config.grace_period.as_millis() as u64,
            propagation_ms = self.shared.config.propagation_delay.as_millis() as u64,
            "tower-drain drain started"
        );
        self.shared.set_phase(Phase::Draining);
        self.shared.draining.cancel();
        let run = self.shared.clone().run(started);
        match tokio::runtime::Handle::try_current()
            .ok()
            .or_else(|| self.shared.runtime.clone())
        {
            Some(rt) => drop(rt.spawn(run)),
            None => {
                let spawned = std::thread::Builder::new()
                    .name("tower-drain".into())
                    .spawn(move || {
                        match tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        {
                            Ok(rt) => rt.block_on(run),
                            Err(e) => tracing::error!(error = %e, "tower-drain: no runtime"),
                        }
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "tower-drain: cannot start the drain's thread");
                }
            }
        }
        true
    }

    /// Spawns a task that starts a drain with [`DrainReason::Signal`] on SIGTERM or SIGINT
    /// (Ctrl-C on non-Unix platforms). Dropping the handle does not stop it; abort it to.
    ///
    /// A second SIGTERM or SIGINT during the drain calls [`force_now`](Self::force_now):
    /// what is left of the propagation delay and of the grace period is skipped, the
    /// remaining streams are force-closed at once, and the report follows. Only a signal
    /// counts as the first one: a drain started otherwise (`POST /drain`) and then signalled
    /// once still gets its full grace period. Opt out with
    /// [`DrainBuilder::force_on_second_signal`]. The task ends at `Stopped`.
    ///
    /// # Panics
    ///
    /// If called outside a tokio runtime, or if the signal handlers cannot be installed.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let drain = tower_drain::DrainController::new();
    /// drain.listen_for_signals();
    /// drain.stopped().await;
    /// # }
    /// ```
    pub fn listen_for_signals(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        let second = self.shared.config.force_on_second_signal;
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
            tokio::spawn(async move {
                let mut seen = 0u32;
                loop {
                    let name = tokio::select! {
                        _ = term.recv() => "SIGTERM",
                        _ = int.recv() => "SIGINT",
                        _ = this.draining(), if seen == 0 => return,
                        _ = this.stopped() => return,
                    };
                    seen += 1;
                    if seen == 1 {
                        tracing::info!(signal = name, "{name} received");
                        this.drain(DrainReason::Signal);
                        if !second {
                            return;
                        }
                    } else {
                        this.second_signal(name);
                    }
                }
            })
        }
        #[cfg(not(unix))]
        {
            tokio::spawn(async move {
                let mut seen = 0u32;
                loop {
                    tokio::select! {
                        r = tokio::signal::ctrl_c() => { r.expect("install Ctrl-C handler"); }
                        _ = this.draining(), if seen == 0 => return,
                        _ = this.stopped() => return,
                    }
                    seen += 1;
                    if seen == 1 {
                        tracing::info!("Ctrl-C received");
                        this.drain(DrainReason::Signal);
                        if !second {
                            return;
                        }
                    } else {
                        this.second_signal("Ctrl-C");
                    }
                }
            })
        }
    }

    fn second_signal(&self, name: &str) {
        tracing::warn!(
            signal = name,
            streams_left = self.active_streams(),
            "tower-drain second {name} received: skipping the rest of the grace period, \
             force-closing remaining streams now"
        );
        self.force_now();
    }

    /// Cuts a drain short: skips what is left of the propagation delay and of the grace
    /// period, so the streams still open are force-closed at once (their forced frame, then
    /// the [`force_linger`](DrainBuilder::force_linger)), and the report and `Stopped`
    /// follow. This is what a second SIGTERM / SIGINT does (see
    /// [`listen_for_signals`](Self::listen_for_signals)).
    ///
    /// Returns `true` if it cut a drain short, `false` if no drain is under way, or it has
    /// already reached `Stopped` or been cut short.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use std::time::Duration;
    /// use tower_drain::{DrainController, DrainReason};
    /// let drain = DrainController::builder()
    ///     .grace_period(Duration::from_secs(30))
    ///     .propagation_delay(Duration::from_secs(10))
    ///     .build()
    ///     .unwrap();
    /// assert!(!drain.force_now()); // nothing to cut short
    /// drain.drain(DrainReason::Signal);
    /// assert!(drain.force_now());
    /// let start = tokio::time::Instant::now();
    /// let report = drain.report().await;
    /// assert!(start.elapsed() < Duration::from_secs(10)); // no propagation delay, no grace
    /// assert_eq!(report.force_closed, 0);
    /// # }
    /// ```
    pub fn force_now(&self) -> bool {
        if !self.is_draining() || self.phase() == Phase::Stopped || self.shared.hurry.is_cancelled()
        {
            return false;
        }
        self.shared.hurry.cancel();
        true
    }

    /// Waits for `Stopped` and returns the [`ShutdownReport`].
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe: the report is kept and can be awaited again.
    pub async fn report(&self) -> ShutdownReport {
        self.stopped().await;
        self.shared
            .report
            .get()
            .cloned()
            .expect("the report is set before Stopped is signalled")
    }

    /// Waits until a drain has reached `Closing` and no tracked stream is open, or `timeout`
    /// has passed.
    ///
    /// # Errors
    ///
    /// [`DrainTimeout`] if `timeout` passed first.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use std::time::Duration;
    /// let drain = tower_drain::DrainController::new();
    /// assert!(drain.wait_idle(Duration::from_secs(1)).await.is_err()); // not draining yet
    /// drain.drain(tower_drain::DrainReason::Manual);
    /// drain.wait_idle(Duration::from_secs(1)).await.unwrap();
    /// # }
    /// ```
    pub async fn wait_idle(&self, timeout: Duration) -> Result<(), DrainTimeout> {
        tokio::time::timeout(timeout, self.shared.registry.wait_idle())
            .await
            .map_err(|_| DrainTimeout { _p: () })
    }
}

#[cfg(test)]
impl DrainController {
    /// Streams notified so far (the report has it only once stopped).
    pub(crate) fn notified_so_far(&self) -> u64 {
        self.shared.notified.load(Ordering::Relaxed)
    }
}

observe!(DrainController);
observe!(DrainWatch);

impl fmt::Debug for DrainController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainController")
            .field("phase", &self.phase())
            .field("reason", &self.shared.reason())
            .field("active_streams", &self.active_streams())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for DrainWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainWatch")
            .field("phase", &self.phase())
            .finish_non_exhaustive()
    }
}

/// [`DrainController::wait_idle`] timed out.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let drain = tower_drain::DrainController::new();
/// let err = drain.wait_idle(std::time::Duration::from_millis(1)).await.unwrap_err();
/// assert_eq!(err.to_string(), "timed out waiting for streams to end");
/// # }
/// ```
pub struct DrainTimeout {
    _p: (),
}

impl fmt::Debug for DrainTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DrainTimeout")
    }
}

impl fmt::Display for DrainTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("timed out waiting for streams to end")
    }
}

impl std::error::Error for DrainTimeout {}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Without a propagation delay, streams hear of the drain as soon as the controller's
    /// task first runs: not a timer's turn later (the time driver runs only when the
    /// runtime parks, a millisecond or more on a busy one).
    #[tokio::test]
    async fn without_a_propagation_delay_closing_needs_no_timer() {
        let drain = DrainController::builder()
            .propagation_delay(Duration::ZERO)
            .build()
            .unwrap();
        drain.drain(DrainReason::Manual);
        // Keep the runtime busy (never parked, so no timer can fire) while the controller's
        // task gets its turns.
        for _ in 0..16 {
            tokio::task::yield_now().await;
            if drain.phase() >= Phase::Closing {
                return;
            }
        }
        panic!("still {:?} after 16 turns of the scheduler", drain.phase());
    }
}
