//! [`DrainWatch`], the read-only view the layers hold, and the read-only API it shares with
//! [`DrainController`](super::DrainController).

use std::fmt;
use std::sync::Arc;

use super::shared::Shared;
use super::{Closing, DrainConfig, DrainReason, Draining, Phase, Stopped};

/// The read-only API shared by [`DrainController`](super::DrainController) and [`DrainWatch`].
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
                Draining::new(self.shared.signals.draining.clone().cancelled_owned())
            }

            /// Resolves when `Closing` begins. See [`Closing`].
            pub fn closing(&self) -> Closing {
                Closing::new(self.shared.signals.closing.clone().cancelled_owned())
            }

            /// Resolves at `Stopped`; use it as the server's shutdown signal. See [`Stopped`].
            pub fn stopped(&self) -> Stopped {
                Stopped::new(self.shared.signals.stopped.clone().cancelled_owned())
            }
        }
    };
}

pub(super) use observe;

/// A read-only view of a [`DrainController`](super::DrainController): what the layers hold.
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

observe!(DrainWatch);

impl fmt::Debug for DrainWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainWatch")
            .field("phase", &self.phase())
            .finish_non_exhaustive()
    }
}
