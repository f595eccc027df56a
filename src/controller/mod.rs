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

// One file per role: `shared` (the state the controller, its watches and the layers hold),
// `run` (the drain task walking the phases), `watch` (`DrainWatch` and the read-only API
// shared with the controller), `signals` (SIGTERM / SIGINT), `config`, `phase`, `report`
// and `future`; the controller itself is here. Imports run one way: `report` uses `phase`;
// `shared` uses `config`, `phase` and `report`; `run` and `watch` use `shared`; `signals`
// and this file use the rest. `config` depends on none of them (`DrainBuilder::build` is
// here, beside the controller it makes).
mod config;
mod error;
mod future;
mod phase;
mod report;
mod run;
mod shared;
mod signals;
mod watch;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub use self::config::{DrainBuilder, DrainConfig};
pub(crate) use self::error::at_most_max;
pub use self::error::{ConfigError, MAX_DURATION};
pub use self::future::{Closing, Draining, Stopped};
pub use self::phase::{DrainReason, Phase};
pub use self::report::{CleanupSummary, ShutdownReport};
pub(crate) use self::shared::{random_seed, splitmix64, Shared};
pub use self::watch::DrainWatch;
pub(crate) use crate::macros::setters;

use self::watch::observe;

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
            shared: Arc::new(Shared::new(config)),
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
        self.shared.signals.draining.cancel();
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

impl DrainBuilder {
    /// Validates the settings and builds the controller.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first invalid setting: a duration over [`MAX_DURATION`]
    /// (365 days), a zero grace period or progress interval, a jitter outside `0..1`, or a
    /// propagation delay plus spread that does not fit inside the grace period.
    pub fn build(self) -> Result<DrainController, ConfigError> {
        self.into_config().map(DrainController::from_config)
    }
}

observe!(DrainController);

impl fmt::Debug for DrainController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainController")
            .field("phase", &self.phase())
            .field("reason", &self.shared.reason())
            .field("active_streams", &self.active_streams())
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
impl DrainController {
    /// A controller with the settings `f` makes (for unit tests).
    pub(crate) fn configured(f: impl FnOnce(DrainBuilder) -> DrainBuilder) -> Self {
        f(Self::builder()).build().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Without a propagation delay, streams hear of the drain as soon as the controller's
    /// task first runs: not a timer's turn later (the time driver runs only when the
    /// runtime parks, a millisecond or more on a busy one).
    #[tokio::test]
    async fn without_a_propagation_delay_closing_needs_no_timer() {
        let drain = DrainController::configured(|b| b.propagation_delay(Duration::ZERO));
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
