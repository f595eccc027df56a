//! Graceful draining of long-lived streaming responses (Server-Sent Events, NDJSON, gRPC
//! server streams) for any tower, hyper, axum or tonic service.
//!
//! `axum::serve(..).with_graceful_shutdown(..)`, tonic's `serve_with_shutdown` and hyper-util's
//! `GracefulShutdown` stop accepting and then wait for every response to finish. An SSE stream
//! never finishes, so a rolling deploy hangs until the orchestrator's SIGKILL and every client
//! sees a broken connection. tower-drain ends those streams the right way:
//!
//! 1. readiness turns `503` at once ([`probe`]), so load balancers stop sending traffic;
//! 2. after a propagation delay, new requests get `503` + `retry-after` ([`reject`]);
//! 3. every open stream receives a final, protocol-correct frame at an event boundary — SSE
//!    `event: shutdown` with a `retry:` hint, an NDJSON line, or gRPC `UNAVAILABLE` trailers —
//!    and ends cleanly, optionally spread over a window ([`frame`]);
//! 4. streams are counted with RAII guards ([`track`]) so the server knows exactly when the
//!    last one is gone; what remains at the grace deadline is force-closed and counted;
//!    [`guard`] bounds them meanwhile (response timeout, maximum lifetime, idle limit or
//!    heartbeat, revalidation, circuit breaker), ending each with a final frame too;
//! 5. a [`ShutdownReport`] says what happened.
//!
//! WebSockets drain too: [`ws`] tracks upgraded sockets as streams and closes them with
//! `1001 Going Away` at their share of the spread.
//!
//! [`DrainController`] is the single source of truth (no globals); layers hold a read-only
//! [`DrainWatch`]. [`DrainStack`] composes the layers in the right order:
//! `Reject → Track → Guard → Frame → service`.
//!
//! # Example
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use axum::response::sse::{Event, Sse};
//! use tower_drain::{probe::Probes, DrainController, DrainStack};
//!
//! # #[tokio::main] async fn main() -> std::io::Result<()> {
//! let drain = DrainController::new();
//! drain.listen_for_signals(); // SIGTERM / SIGINT start the drain
//!
//! let events = || async {
//!     let ticks = futures_util::stream::repeat_with(|| Ok::<_, std::convert::Infallible>(Event::default().data("tick")));
//!     Sse::new(ticks)
//! };
//! let probes = Probes::new(drain.clone());
//! let app = Router::new()
//!     .route("/events", get(events))
//!     .layer(DrainStack::new(drain.watch()))
//!     .route_service("/healthz", probes.clone())
//!     .route_service("/readyz", probes);
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app)
//!     .with_graceful_shutdown(drain.stopped()) // stop accepting once every stream is gone
//!     .await?;
//! println!("{}", serde_json::to_string(&drain.report().await).unwrap());
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

mod grpc;
mod macros;
mod route;
#[cfg(test)]
mod test_support;

#[cfg(feature = "hyper")]
#[cfg_attr(docsrs, doc(cfg(feature = "hyper")))]
pub mod conn;
pub mod controller;
pub mod frame;
pub mod guard;
#[cfg(feature = "tonic-health")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic-health")))]
pub mod health;
pub mod hook;
pub mod metrics;
pub mod probe;
pub mod reject;
pub mod stack;
pub mod track;
pub mod ws;

pub use crate::controller::{
    CleanupSummary, ConfigError, DrainBuilder, DrainConfig, DrainController, DrainReason,
    DrainTimeout, DrainWatch, Phase, ShutdownReport,
};
pub use crate::stack::DrainStack;

/// The boxed error type used where this crate creates errors of its own.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A stream was ended in the middle of a record: the grace deadline passed, or a guard limit
/// was reached, and no event boundary came in time, so no whole final frame could be
/// written. The body ends with this error, which makes the server abort the response (an
/// HTTP/1.1 connection closed without the last chunk, an HTTP/2 `RST_STREAM`), so the client
/// sees a failure: a clean end of a stream always means whole records.
///
/// ```
/// let err: tower_drain::BoxError = tower_drain::Aborted::new().into();
/// assert!(err.is::<tower_drain::Aborted>());
/// assert_eq!(err.to_string(), "stream ended in the middle of a record");
/// ```
#[derive(Clone, Copy, Default)]
pub struct Aborted {
    _p: (),
}

impl Aborted {
    /// The error.
    pub const fn new() -> Self {
        Self { _p: () }
    }
}

impl std::fmt::Debug for Aborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Aborted")
    }
}

impl std::fmt::Display for Aborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stream ended in the middle of a record")
    }
}

impl std::error::Error for Aborted {}

/// A body's poll result with its error boxed, and a clean end turned into [`Aborted`] when
/// the body's logic had to end mid-record (`aborted`).
#[inline(always)]
pub(crate) fn boxed_result<E: Into<BoxError>>(
    res: std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, E>>>,
    aborted: impl FnOnce() -> bool,
) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
    use std::task::Poll;
    match res {
        Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
        Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
        Poll::Ready(None) if aborted() => Poll::Ready(Some(Err(Aborted::new().into()))),
        Poll::Ready(None) => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    }
}
