//! Give every open stream a protocol-correct final frame when the server drains, then end it
//! cleanly.
//!
//! [`FrameBody`] forwards the inner body unchanged until the controller enters `Closing`. Then,
//! after this stream's share of the drain spread, it waits for the next event boundary (it
//! never cuts an event in two, even one split across several body frames), sends the final
//! frame made by a [`FinalFrame`] encoder and ends the body, so the HTTP/1.1 chunked body
//! terminates or the HTTP/2 stream closes normally. At the grace deadline a stream still open
//! gets the forced variant if it is at a boundary; otherwise the body fails with
//! [`Aborted`](crate::Aborted), so the server aborts the response (no last chunk on HTTP/1.1,
//! `RST_STREAM` on HTTP/2) and the client sees a failure: a clean end always means whole
//! records. The body's error type is [`BoxError`](crate::BoxError).
//!
//! Encoders: [`Sse`] (default), [`NdJson`], [`Grpc`] (trailers), [`FnFrame`] (a closure).
//! Only responses the encoder recognises by content type are touched (or those carrying the
//! [`Inject`] extension); [`RunToCompletion`] opts a response out of the graceful frame.
//! Nothing is allocated per forwarded frame and no task is spawned per stream: the drain
//! wake-up is registered from `poll_frame`.
//!
//! Place this layer inside any compression layer, and innermost in the tower-drain stack. Use
//! it with a [`TrackLayer`](crate::track::TrackLayer) (as [`DrainStack`](crate::DrainStack)
//! does): the controller waits only for streams it tracks, and releases any other body when it
//! reaches `Stopped` (with the forced frame at a boundary, or at once).
//!
//! # Example
//!
//! ```
//! # use http::{Request, Response}; use bytes::Bytes; use http_body_util::{BodyExt, StreamBody};
//! # use http_body::Frame as BodyFrame; use tower::{ServiceBuilder, ServiceExt};
//! use tower_drain::{DrainController, DrainReason, frame::FrameLayer};
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let drain = DrainController::new();
//! let svc = ServiceBuilder::new()
//!     .layer(FrameLayer::new(drain.watch()))
//!     .service_fn(|_req: Request<()>| async {
//!         // An endless SSE stream: one event, then nothing.
//!         let events = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
//!             BodyFrame::data(Bytes::from("data: hello\n\n")),
//!         )])
//!         .chain(futures_util::stream::pending());
//!         let mut res = Response::new(StreamBody::new(events));
//!         res.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
//!         Ok::<_, std::convert::Infallible>(res)
//!     });
//! # use futures_util::StreamExt;
//! let mut body = Box::pin(svc.oneshot(Request::new(())).await.unwrap().into_body());
//! let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
//! assert_eq!(first, "data: hello\n\n");
//!
//! drain.drain(DrainReason::Manual);
//! let last = body.frame().await.unwrap().unwrap().into_data().unwrap();
//! assert!(last.starts_with(b"event: shutdown\ndata: {\"type\":\"shutdown\""));
//! assert!(body.frame().await.is_none()); // and the body ends
//! # }
//! ```

mod boundary;
mod call;
mod config;
mod encoder;
mod gate;
mod layer;
mod stream;

pub use self::boundary::Boundary;
pub(crate) use self::boundary::Tracker;
pub(crate) use self::call::{should_inject, unfix_length};
pub use self::call::{Inject, RunToCompletion};
pub(crate) use self::config::FrameConfig;
pub(crate) use self::encoder::grpc_percent_encode;
pub use self::encoder::{Final, FinalFrame, FnFrame, FrameContext, FrameKind, Grpc, NdJson, Sse};
pub(crate) use self::gate::{FinalGate, GateRef};
pub use self::layer::{Frame, FrameBody, FrameLayer};
pub(crate) use self::stream::FrameHook;

#[cfg(test)]
mod tests;
