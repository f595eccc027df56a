//! Bound what a request may cost: a response timeout, a maximum stream lifetime, an idle limit
//! (or heartbeats), periodic revalidation, and an error circuit breaker. A stream that reaches a
//! limit or fails ends with a final frame and a clean end, never a cut connection.
//!
//! Two kinds of time are involved:
//!
//! - **Time to headers** is the call's business: past
//!   [`response_timeout`](GuardBuilder::response_timeout) the inner future is dropped and the
//!   client gets `504` (configurable); `S::Error` is unchanged. A response ready at the same
//!   instant as the deadline wins (the inner future is polled first, as in tower's `Timeout`).
//! - **Stream time** is the body's ([`GuardedBody`]): past [`max_lifetime`](GuardBuilder::max_lifetime)
//!   (optionally jittered), after [`idle_timeout`](GuardBuilder::idle_timeout) without a frame
//!   or [`first_frame_timeout`](GuardBuilder::first_frame_timeout) without a first one,
//!   the stream receives the final *timeout* frame at its next event boundary — SSE
//!   `event: error` / `data: {"error":"Connection timeout","code":"TIMEOUT"}` / `retry:`,
//!   an NDJSON line, or gRPC trailers with `grpc-status: 4` — and ends. With
//!   [`heartbeat`](GuardBuilder::heartbeat), a keep-alive (`:\n\n` in SSE) goes out at a boundary
//!   after that long without output. [`revalidate`](GuardBuilder::revalidate) runs an async check
//!   with the request's parts every interval (staggered per stream); `false` ends the stream
//!   with the *unauthorized* frame. An error from the inner body becomes the final *error*
//!   frame at an event boundary; mid-record, the error goes on and the response is aborted. A
//!   limit reached mid-event waits for the event's end (up to 5 s, then the body fails with
//!   [`Aborted`](crate::Aborted), so the response is aborted too). A clean end always means
//!   whole records. The body's error type is [`BoxError`](crate::BoxError).
//!
//! All of a stream's timers share one pinned `Sleep`, moved with `Sleep::reset` only when it
//! fires; a forwarded frame costs a clock read at most and allocates nothing; no task is spawned
//! per stream (the revalidation check is polled from the body).
//!
//! The **circuit breaker** (off by default: turn it on with
//! [`circuit_breaker(true)`](GuardBuilder::circuit_breaker) or any of its settings) counts
//! consecutive failures — the inner service's `Err`, `5xx` responses (configurable with
//! [`failure_status`](GuardBuilder::failure_status)), response timeouts, bodies that end in an
//! error, failed revalidation checks. At the threshold (default 5) it opens: requests get `503`
//! (configurable) with `retry-after` at once, without calling the service, for the cool-down
//! (default 30 s). The first request after the cool-down is the one half-open probe
//! (concurrent requests still get `503`): its success closes the circuit, its failure opens it
//! again, and so does a probe with no outcome after the
//! [`probe_timeout`](GuardBuilder::probe_timeout) (default: the cool-down).
//!
//! One breaker covers every route under its layer, so it is off until you choose its scope:
//! one `GuardLayer` around a whole service shares one breaker, and a `GuardLayer` per route
//! (axum's `route_layer`) gives each route its own, so that one slow or failing route cannot
//! turn the others away. See [`Breaker`].
//!
//! # Layer order
//!
//! `Reject → Track → Guard → Frame → service` ([`DrainStack`](crate::DrainStack) does this).
//! The guard must sit *outside* `FrameLayer`: the two bodies then share a per-stream flag, so a
//! stream that is both expiring and being drained gets exactly one final frame — whichever is
//! due first; at the very same instant the guard's frame wins, because the guard checks its
//! timers before it polls the frame body.
//!
//! # Example
//!
//! ```
//! # use http::{Request, Response}; use bytes::Bytes; use http_body_util::{BodyExt, StreamBody};
//! # use http_body::Frame; use tower::{ServiceBuilder, ServiceExt}; use std::time::Duration;
//! use tower_drain::{DrainController, guard::GuardLayer};
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower_drain::ConfigError> {
//! let drain = DrainController::new();
//! let guard = GuardLayer::builder(drain.watch())
//!     .max_lifetime(Duration::from_secs(1800))
//!     .heartbeat(Duration::from_secs(15))
//!     .build()?; // a `ConfigError` naming the setting if one is invalid
//! let svc = ServiceBuilder::new()
//!     .layer(guard)
//!     .service_fn(|_req: Request<()>| async {
//!         // An SSE stream that sends one event and then nothing.
//!         # use futures_util::StreamExt;
//!         let events = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
//!             Frame::data(Bytes::from("data: hello\n\n")),
//!         )])
//!         .chain(futures_util::stream::pending());
//!         let mut res = Response::new(StreamBody::new(events));
//!         res.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
//!         Ok::<_, std::convert::Infallible>(res)
//!     });
//! let mut body = Box::pin(svc.oneshot(Request::new(())).await.unwrap().into_body());
//! assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "data: hello\n\n");
//!
//! // 15 (paused) seconds of silence: a heartbeat keeps proxies from closing the connection.
//! assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), ":\n\n");
//!
//! // At 30 minutes the stream gets the timeout frame, then ends.
//! let mut last = body.frame().await.unwrap().unwrap().into_data().unwrap();
//! while last == ":\n\n" {
//!     last = body.frame().await.unwrap().unwrap().into_data().unwrap();
//! }
//! assert!(last.starts_with(b"event: error\ndata: {\"error\":\"Connection timeout\",\"code\":\"TIMEOUT\"}\nretry: "));
//! assert!(body.frame().await.is_none());
//! # Ok(())
//! # }
//! ```

mod breaker;
mod builder;
mod call;
mod config;
mod layer;
mod limits;
mod stream;
#[cfg(test)]
mod tests;

pub use self::breaker::{Breaker, BreakerState};
pub use self::builder::GuardBuilder;
pub use self::layer::{Guard, GuardLayer, GuardedBody};
#[cfg(test)]
pub(crate) use self::limits::MID_EVENT_GRACE;
pub(crate) use self::stream::GuardHook;
