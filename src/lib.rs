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

mod macros;
mod route;

pub mod controller;
pub mod frame;
pub mod guard;
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
