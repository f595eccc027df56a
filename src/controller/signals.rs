//! Signal handling: SIGTERM / SIGINT start a drain, a second one cuts it short.

use super::{DrainController, DrainReason};

impl DrainController {
    /// Spawns a task that starts a drain with [`DrainReason::Signal`] on SIGTERM or SIGINT
    /// (Ctrl-C on non-Unix platforms). Dropping the handle does not stop it; abort it to.
    ///
    /// A second SIGTERM or SIGINT during the drain calls [`force_now`](Self::force_now):
    /// what is left of the propagation delay and of the grace period is skipped, the
    /// remaining streams are force-closed at once, and the report follows. Only a signal
    /// counts as the first one: a drain started otherwise (`POST /drain`) and then signalled
    /// once still gets its full grace period. Opt out with
    /// [`DrainBuilder::force_on_second_signal`](super::DrainBuilder::force_on_second_signal).
    /// The task ends at `Stopped`.
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
}
