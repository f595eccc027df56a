use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio_util::sync::WaitForCancellationFutureOwned;

macro_rules! phase_future {
    ($(#[$doc:meta])* $name:ident) => {
        pin_project! {
            $(#[$doc])*
            #[must_use = "futures do nothing unless polled"]
            pub struct $name {
                #[pin]
                inner: WaitForCancellationFutureOwned,
            }
        }

        impl $name {
            pub(crate) fn new(inner: WaitForCancellationFutureOwned) -> Self {
                Self { inner }
            }
        }

        impl Future for $name {
            type Output = ();
            fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                self.project().inner.poll(cx)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name)).finish_non_exhaustive()
            }
        }
    };
}

phase_future! {
    /// Resolves when a drain starts (the controller enters [`Draining`](super::Phase::Draining)).
    /// Returned by [`DrainController::draining`](super::DrainController::draining).
    ///
    /// # Cancellation safety
    ///
    /// Dropping it has no effect on the drain.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let drain = tower_drain::DrainController::new();
    /// let draining = drain.draining();
    /// drain.drain(tower_drain::DrainReason::Manual);
    /// draining.await;
    /// # }
    /// ```
    Draining
}

phase_future! {
    /// Resolves when the controller enters [`Closing`](super::Phase::Closing): the propagation
    /// delay is over, new requests are rejected and streams are being notified.
    /// Returned by [`DrainController::closing`](super::DrainController::closing).
    ///
    /// # Cancellation safety
    ///
    /// Dropping it has no effect on the drain.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let drain = tower_drain::DrainController::new();
    /// drain.drain(tower_drain::DrainReason::Manual);
    /// drain.closing().await;
    /// assert!(drain.phase() >= tower_drain::Phase::Closing);
    /// # }
    /// ```
    Closing
}

phase_future! {
    /// Resolves when the controller reaches [`Stopped`](super::Phase::Stopped): every stream
    /// has ended or was force-closed and the store is cleaned up. Pass it to
    /// `axum::serve(..).with_graceful_shutdown(..)`, tonic's `serve_with_shutdown` or your
    /// hyper accept loop so that the server stops accepting at that moment.
    /// Returned by [`DrainController::stopped`](super::DrainController::stopped).
    ///
    /// # Cancellation safety
    ///
    /// Dropping it has no effect on the drain.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let drain = tower_drain::DrainController::new();
    /// drain.drain(tower_drain::DrainReason::Manual);
    /// drain.stopped().await;
    /// assert_eq!(drain.phase(), tower_drain::Phase::Stopped);
    /// # }
    /// ```
    Stopped
}
