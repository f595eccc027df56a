//! Answer `503 Service Unavailable` to new requests once draining has started.
//!
//! From `Closing` on (or from `Draining`, with
//! [`reject_while_draining`](RejectLayer::reject_while_draining)), every request that is not
//! exempt is answered at once, without calling the inner service: `503`, `retry-after` (the
//! controller's reconnect delay in whole seconds) and, on HTTP/1.x, `connection: close` (HTTP/2
//! forbids connection-specific headers). Requests that speak gRPC
//! (`content-type: application/grpc…`) get a gRPC-shaped answer instead, which gRPC clients
//! understand: HTTP `200` with `grpc-status: 14` (UNAVAILABLE) and a `grpc-message` (see
//! [`Default503`]). gRPC-Web (`application/grpc-web…`) gets the plain HTTP answer: its clients
//! map `503` to UNAVAILABLE themselves, and read statuses from the body, not from HTTP/2
//! trailers.
//!
//! Browsers need one more thing: the SSE spec makes a non-`200` answer fatal for an
//! `EventSource`, so a page whose reconnect lands on a draining server and gets `503` gives up
//! for good. [`sse_retry`](RejectLayer::sse_retry) (opt-in) answers requests that accept
//! `text/event-stream` with `200` and only the shutdown frame instead, so the browser retries
//! by itself after the frame's `retry:` delay; its documentation explains the trade-off.
//!
//! Requests already in flight are not affected. While serving, the cost is one atomic load.
//! Probe paths (`/healthz`, `/readyz`, `/status`, `/drain`, `/metrics`) and gRPC health
//! checking (paths under `/grpc.health.v1.Health/`) are exempt by default; change that with
//! [`exempt`](RejectLayer::exempt). Place this layer outermost.
//!
//! # Example
//!
//! ```
//! # use http::{Request, Response, StatusCode}; use bytes::Bytes; use http_body_util::Empty;
//! # use tower::{ServiceBuilder, ServiceExt};
//! use tower_drain::{DrainController, DrainReason, reject::RejectLayer};
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let drain = DrainController::new();
//! let svc = ServiceBuilder::new()
//!     .layer(RejectLayer::new(drain.watch()))
//!     .service_fn(|_req: Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
//!     });
//! drain.drain(DrainReason::Manual);
//! drain.closing().await;
//!
//! let res = svc.clone().oneshot(Request::get("/events").body(()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! assert_eq!(res.headers()["retry-after"], "30");
//! assert_eq!(res.headers()["connection"], "close");
//!
//! let probe = svc.oneshot(Request::get("/readyz").body(()).unwrap()).await.unwrap();
//! assert_eq!(probe.status(), StatusCode::OK); // exempt: reached the service
//! # }
//! ```

mod body;
mod layer;
mod mode;
mod response;
mod service;
#[cfg(test)]
mod tests;

pub use self::body::ResponseBody;
pub use self::layer::RejectLayer;
pub use self::mode::{Mode, Plain, SseRetry};
pub use self::response::{Default503, RejectResponse};
pub use self::service::{Reject, ResponseFuture};
