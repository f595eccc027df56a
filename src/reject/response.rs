//! What a rejected request is answered: [`RejectResponse`], [`Default503`], and the SSE
//! shutdown frame of [`sse_retry`](super::RejectLayer::sse_retry).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderValue, Method, Response, StatusCode, Version};

use crate::controller::{random_seed, splitmix64, Shared};
use crate::frame::{FinalFrame, FrameContext, FrameKind, Grpc, Sse};

/// Builds the answer to a rejected request.
///
/// Implemented by [`Default503`] and by any `FnMut(&request::Parts) -> Response<B> + Clone`.
///
/// ```
/// use http::{request::Parts, Response, StatusCode};
/// use tower_drain::reject::RejectLayer;
/// let drain = tower_drain::DrainController::new();
/// let layer = RejectLayer::new(drain.watch()).with_response(|_parts: &Parts| {
///     let mut res = Response::new(String::from("come back later"));
///     *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
///     res
/// });
/// # drop(layer);
/// ```
pub trait RejectResponse<B> {
    /// The response for a request rejected while draining.
    fn response(&mut self, parts: &Parts) -> Response<B>;
}

impl<B, F> RejectResponse<B> for F
where
    F: FnMut(&Parts) -> Response<B> + Clone,
{
    fn response(&mut self, parts: &Parts) -> Response<B> {
        self(parts)
    }
}

/// The default rejection: `503` + `retry-after` + `connection: close` (HTTP/1.x only), or a
/// gRPC `UNAVAILABLE` for gRPC requests; the body is `B::default()`.
///
/// A gRPC request (`content-type: application/grpc…`) gets a "Trailers-Only" response, the
/// shape every gRPC client understands: HTTP `200`, `content-type: application/grpc`,
/// `grpc-status: 14` (UNAVAILABLE), a percent-encoded `grpc-message` (the controller's drain
/// message when built by [`RejectLayer::new`](super::RejectLayer::new)) and `grpc-retry-pushback-ms` (the retry delay,
/// honoured by clients with a retry policy), and an empty body, so the status travels in the
/// one HEADERS frame that ends the stream. A plain `503` would reach a gRPC client only as an
/// HTTP status it has to guess a code from.
///
/// ```
/// use tower_drain::reject::{Default503, RejectResponse};
/// let mut r = Default503::new(std::time::Duration::from_secs(5));
/// let (parts, ()) = http::Request::new(()).into_parts();
/// let res: http::Response<String> = r.response(&parts);
/// assert_eq!(res.status(), 503);
/// assert_eq!(res.headers()["retry-after"], "5");
///
/// let grpc = http::Request::post("/demo.Ticker/Watch")
///     .header("content-type", "application/grpc")
///     .body(())
///     .unwrap();
/// let res: http::Response<String> = r.response(&grpc.into_parts().0);
/// assert_eq!(res.status(), 200);
/// assert_eq!(res.headers()["grpc-status"], "14");
/// assert_eq!(res.headers()["grpc-message"], "server%20is%20shutting%20down");
/// assert_eq!(res.headers()["grpc-retry-pushback-ms"], "5000");
/// ```
#[derive(Clone, Debug)]
pub struct Default503 {
    retry_after: HeaderValue,
    pushback_ms: HeaderValue,
    grpc_message: HeaderValue,
}

impl Default503 {
    /// With `retry-after` set to `retry_after` rounded up to whole seconds (and
    /// `grpc-retry-pushback-ms` to it in milliseconds).
    pub fn new(retry_after: Duration) -> Self {
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        Self {
            retry_after: HeaderValue::from(secs),
            pushback_ms: HeaderValue::from(
                u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX),
            ),
            grpc_message: GRPC_MESSAGE,
        }
    }

    /// Uses `message` (percent-encoded) as the `grpc-message` of gRPC rejections.
    pub(super) fn grpc_message(mut self, message: &str) -> Self {
        let mut ctx = FrameContext::new(FrameKind::Shutdown);
        ctx.message = message;
        // The gRPC encoder's own percent-encoding, so streams and rejections say the same.
        let trailers = Grpc::new().encode(&ctx).into_parts().1;
        if let Some(v) = trailers.and_then(|mut t| t.remove("grpc-message")) {
            self.grpc_message = v;
        }
        self
    }
}

const CLOSE: HeaderValue = HeaderValue::from_static("close");
const GRPC_MESSAGE: HeaderValue = HeaderValue::from_static("server%20is%20shutting%20down");
const EVENT_STREAM: HeaderValue = HeaderValue::from_static("text/event-stream");
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

/// A gRPC request over HTTP/2 (`application/grpc`, `application/grpc+proto`, …). gRPC-Web
/// (`application/grpc-web…`) is not: its clients read the status from the body, not from
/// HTTP/2 trailers, and map an HTTP `503` to UNAVAILABLE themselves, so it gets the plain HTTP
/// answer (as the [`Grpc`] encoder leaves gRPC-Web streams alone).
fn is_grpc(parts: &Parts) -> bool {
    crate::grpc::is_grpc(&parts.headers)
}

/// Whether a `GET` names `text/event-stream` in its `accept` header (as every `EventSource`
/// does). A wildcard (`*/*`) does not count: only a client that asked for an event stream
/// gets one.
pub(super) fn accepts_event_stream(parts: &Parts) -> bool {
    parts.method == Method::GET
        && parts
            .headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|range| {
                let media = range.split(';').next().unwrap_or("").trim();
                media.eq_ignore_ascii_case("text/event-stream")
            })
}

impl<B: Default> RejectResponse<B> for Default503 {
    fn response(&mut self, parts: &Parts) -> Response<B> {
        let mut res = Response::new(B::default());
        let grpc = is_grpc(parts);
        if !grpc {
            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        let h = res.headers_mut();
        if grpc {
            // A "Trailers-Only" gRPC response: clients read UNAVAILABLE and retry.
            h.insert(header::CONTENT_TYPE, crate::grpc::CONTENT_TYPE);
            h.insert("grpc-status", HeaderValue::from(crate::grpc::UNAVAILABLE));
            h.insert("grpc-message", self.grpc_message.clone());
            h.insert("grpc-retry-pushback-ms", self.pushback_ms.clone());
        } else {
            h.insert(header::RETRY_AFTER, self.retry_after.clone());
            if parts.version <= Version::HTTP_11 {
                h.insert(header::CONNECTION, CLOSE);
            }
        }
        res
    }
}

/// `200` with only the SSE shutdown frame; see [`RejectLayer::sse_retry`](super::RejectLayer::sse_retry).
pub(super) fn sse_rejection(shared: &Shared, parts: &Parts) -> Response<Bytes> {
    let ctx = FrameContext {
        kind: FrameKind::Shutdown,
        reason: shared.reason().map(|r| r.as_str()),
        message: shared.config.message(),
        reconnect_delay: shared.config.reconnect_delay,
        retry: Duration::from_millis(shared.jittered_retry_ms(splitmix64(random_seed()))),
        timestamp: SystemTime::now(),
    };
    let frame = Sse::new().encode(&ctx).into_parts().0.unwrap_or_default();
    let mut res = Response::new(frame);
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, EVENT_STREAM);
    h.insert(header::CACHE_CONTROL, NO_STORE);
    if parts.version <= Version::HTTP_11 {
        h.insert(header::CONNECTION, CLOSE);
    }
    res
}
