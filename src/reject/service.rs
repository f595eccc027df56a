use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::body::ResponseBody;
use crate::controller::{random_seed, splitmix64, Phase, Shared};
use crate::frame::{FinalFrame, FrameContext, FrameKind, Grpc, Sse};
use crate::DrainWatch;

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
/// message when built by [`RejectLayer::new`]) and `grpc-retry-pushback-ms` (the retry delay,
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
    fn grpc_message(mut self, message: &str) -> Self {
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
fn accepts_event_stream(parts: &Parts) -> bool {
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

type ExemptFn = Arc<dyn Fn(&Parts) -> bool + Send + Sync>;

/// The default exemption: the probe paths, and gRPC health checking.
fn probe_paths(parts: &Parts) -> bool {
    let path = parts.uri.path();
    matches!(
        path,
        "/healthz" | "/readyz" | "/status" | "/drain" | "/metrics"
    ) || path.starts_with("/grpc.health.v1.Health/")
}

mod sealed {
    pub trait Sealed {}
}

/// How a [`Reject`] answers: [`Plain`] (the default) or [`SseRetry`], chosen with
/// [`RejectLayer::sse_retry`].
///
/// The mode is a type, not a flag, so that the default mode costs nothing: a [`Plain`]
/// `Reject` passes the inner service's response through as it is (same body type, no
/// wrapping), and only [`SseRetry`], which needs a body of its own for the shutdown frame,
/// wraps bodies in [`ResponseBody`]. Sealed: no other implementations.
///
/// ```
/// use tower_drain::reject::{Mode, Plain, SseRetry};
/// fn sse_retry<M: Mode>() -> bool { M::SSE_RETRY }
/// assert!(!sse_retry::<Plain>());
/// assert!(sse_retry::<SseRetry>());
/// ```
pub trait Mode: sealed::Sealed + Send + Sync + 'static {
    /// Whether event-stream requests get the shutdown frame instead of the rejection.
    const SSE_RETRY: bool;

    /// The response body of a [`Reject`] whose inner service answers with `B`.
    type Body<B>;

    /// Turns the inner service's (or the responder's) response into this mode's.
    #[doc(hidden)]
    fn wrap<B>(res: Response<B>) -> Response<Self::Body<B>>;

    /// Polls the inner service's future, giving its result in this mode's type.
    #[doc(hidden)]
    fn poll_inner<F, B, E>(
        fut: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<Self::Body<B>>, E>>
    where
        F: Future<Output = Result<Response<B>, E>>;

    /// The shutdown-frame answer; `None` in a mode without one.
    #[doc(hidden)]
    fn frame<B>(res: Response<Bytes>) -> Option<Response<Self::Body<B>>>;

    /// This mode's body taken apart: the inner body, or the shutdown frame's bytes.
    #[doc(hidden)]
    fn into_parts<B>(body: Self::Body<B>) -> Result<B, Option<Bytes>>;
}

/// The default [`Mode`]: every rejected request gets the rejection response, and responses
/// pass through unchanged.
///
/// ```
/// use tower_drain::reject::{Plain, Reject, RejectLayer};
/// let drain = tower_drain::DrainController::new();
/// let layer: RejectLayer<_, Plain> = RejectLayer::new(drain.watch());
/// # drop(layer);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Plain;

/// The [`Mode`] of [`RejectLayer::sse_retry`]: event-stream requests get `200` and only the
/// shutdown frame.
///
/// ```
/// use tower_drain::reject::{RejectLayer, SseRetry};
/// let drain = tower_drain::DrainController::new();
/// let layer: RejectLayer<_, SseRetry> = RejectLayer::new(drain.watch()).sse_retry();
/// # drop(layer);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct SseRetry;

impl sealed::Sealed for Plain {}
impl sealed::Sealed for SseRetry {}

impl Mode for Plain {
    const SSE_RETRY: bool = false;
    type Body<B> = B;

    #[inline(always)]
    fn wrap<B>(res: Response<B>) -> Response<B> {
        res
    }

    #[inline(always)]
    fn poll_inner<F, B, E>(fut: Pin<&mut F>, cx: &mut Context<'_>) -> Poll<Result<Response<B>, E>>
    where
        F: Future<Output = Result<Response<B>, E>>,
    {
        // The inner future's own output, untouched.
        fut.poll(cx)
    }

    #[inline]
    fn frame<B>(_res: Response<Bytes>) -> Option<Response<B>> {
        None
    }

    #[inline(always)]
    fn into_parts<B>(body: B) -> Result<B, Option<Bytes>> {
        Ok(body)
    }
}

impl Mode for SseRetry {
    const SSE_RETRY: bool = true;
    type Body<B> = ResponseBody<B>;

    #[inline]
    fn wrap<B>(res: Response<B>) -> Response<ResponseBody<B>> {
        res.map(ResponseBody::new)
    }

    #[inline]
    fn poll_inner<F, B, E>(
        fut: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<ResponseBody<B>>, E>>
    where
        F: Future<Output = Result<Response<B>, E>>,
    {
        fut.poll(cx).map(|res| res.map(Self::wrap))
    }

    #[inline]
    fn frame<B>(res: Response<Bytes>) -> Option<Response<ResponseBody<B>>> {
        Some(res.map(ResponseBody::frame))
    }

    #[inline]
    fn into_parts<B>(body: ResponseBody<B>) -> Result<B, Option<Bytes>> {
        body.into_parts()
    }
}

/// Rejects new requests while draining. Builds [`Reject`].
///
/// See the [module docs](super) for an example.
#[must_use]
pub struct RejectLayer<R = Default503, M = Plain> {
    shared: Arc<Shared>,
    response: R,
    exempt: ExemptFn,
    from: Phase,
    mode: PhantomData<fn() -> M>,
}

impl RejectLayer<Default503> {
    /// Rejects from `Closing` on with [`Default503`]; probe paths are exempt.
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::reject::RejectLayer::new(drain.watch());
    /// # drop(layer);
    /// ```
    pub fn new(watch: DrainWatch) -> Self {
        let config = watch.config();
        let response = Default503::new(config.reconnect_delay()).grpc_message(config.message());
        Self {
            shared: watch.shared,
            response,
            exempt: Arc::new(probe_paths),
            from: Phase::Closing,
            mode: PhantomData,
        }
    }
}

impl<R, M> RejectLayer<R, M> {
    /// Also reject during `Draining` (the propagation delay), not only from `Closing` on.
    /// Off by default: during the propagation delay load balancers may still send traffic,
    /// which should be served.
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::reject::RejectLayer::new(drain.watch()).reject_while_draining(true);
    /// # drop(layer);
    /// ```
    pub fn reject_while_draining(mut self, yes: bool) -> Self {
        self.from = if yes { Phase::Draining } else { Phase::Closing };
        self
    }

    /// Requests for which `f` returns `true` are never rejected (replaces the default probe
    /// paths).
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::reject::RejectLayer::new(drain.watch())
    ///     .exempt(|parts: &http::request::Parts| parts.uri.path().starts_with("/internal/"));
    /// # drop(layer);
    /// ```
    pub fn exempt<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> bool + Send + Sync + 'static,
    {
        self.exempt = Arc::new(f);
        self
    }

    /// Answers a rejected `GET` that accepts `text/event-stream` (every browser `EventSource`
    /// sends `accept: text/event-stream`) with `200`, `content-type: text/event-stream` and a
    /// body of only the SSE shutdown frame (its `retry:` line is the controller's jittered
    /// reconnect delay), instead of the rejection response. Off by default.
    ///
    /// The mode is part of the type ([`SseRetry`] instead of [`Plain`]): only this mode wraps
    /// response bodies (in [`ResponseBody`], to carry the frame), so the default one costs
    /// nothing per response.
    ///
    /// The SSE spec makes any non-`200` answer fatal for an `EventSource`: a browser whose
    /// reconnect lands on a draining server and gets `503` closes for good (`readyState`
    /// `CLOSED`), and only a page reload brings it back. With this mode the browser reads the
    /// frame, sees the body end, and reconnects by itself after `retry:` ms — to this server,
    /// which answers the same way while it drains, or to whichever server has replaced it.
    /// It sends `Last-Event-ID` each time, since the frame carries no `id:`.
    ///
    /// The trade-off: the rejection is a `200`, so status-based monitoring, access logs and
    /// load-balancer error counts see a success (the `rejected` count and the
    /// `tower_drain_rejected_total` metric still count it); and a non-browser client that
    /// sends `accept: text/event-stream` but ignores `retry:` may reconnect at once, in a loop,
    /// where `503` + `retry-after` would have slowed it down. Requests without that `accept`
    /// value (curl's `*/*`, gRPC, …) still get the rejection response.
    ///
    /// ```
    /// # use http::{Request, Response}; use bytes::Bytes; use http_body_util::{BodyExt, Empty};
    /// # use tower::{ServiceBuilder, ServiceExt};
    /// use std::time::Duration;
    /// use tower_drain::{DrainController, DrainReason, reject::RejectLayer};
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let drain = DrainController::builder()
    ///     .reconnect_delay(Duration::from_secs(2))
    ///     .reconnect_jitter(0.0)
    ///     .build()
    ///     .unwrap();
    /// let svc = ServiceBuilder::new()
    ///     .layer(RejectLayer::new(drain.watch()).sse_retry())
    ///     .service_fn(|_req: Request<()>| async {
    ///         Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
    ///     });
    /// drain.drain(DrainReason::Manual);
    /// drain.closing().await;
    ///
    /// let req = Request::get("/events").header("accept", "text/event-stream").body(()).unwrap();
    /// let res = svc.clone().oneshot(req).await.unwrap();
    /// assert_eq!(res.status(), 200);
    /// assert_eq!(res.headers()["content-type"], "text/event-stream");
    /// let body = res.into_body().collect().await.unwrap().to_bytes();
    /// assert!(body.starts_with(b"event: shutdown\ndata: {"));
    /// assert!(body.ends_with(b"\nretry: 2000\n\n"));
    ///
    /// // Anything else still gets the 503.
    /// let res = svc.oneshot(Request::get("/events").body(()).unwrap()).await.unwrap();
    /// assert_eq!(res.status(), 503);
    /// # }
    /// ```
    pub fn sse_retry(self) -> RejectLayer<R, SseRetry> {
        RejectLayer {
            shared: self.shared,
            response: self.response,
            exempt: self.exempt,
            from: self.from,
            mode: PhantomData,
        }
    }

    /// Answers rejected requests with `response` instead of [`Default503`].
    pub fn with_response<R2>(self, response: R2) -> RejectLayer<R2, M> {
        RejectLayer {
            shared: self.shared,
            response,
            exempt: self.exempt,
            from: self.from,
            mode: PhantomData,
        }
    }
}

impl<R: Clone, M> Clone for RejectLayer<R, M> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            response: self.response.clone(),
            exempt: self.exempt.clone(),
            from: self.from,
            mode: PhantomData,
        }
    }
}

impl<R, M> fmt::Debug for RejectLayer<R, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RejectLayer")
            .field("from", &self.from)
            .field("mode", &mode_name::<M>())
            .finish_non_exhaustive()
    }
}

/// `"Plain"` or `"SseRetry"`, for `Debug` output.
fn mode_name<M>() -> &'static str {
    let name = std::any::type_name::<M>();
    name.rsplit("::").next().unwrap_or(name)
}

impl<S, R: Clone, M> Layer<S> for RejectLayer<R, M> {
    type Service = Reject<S, R, M>;

    fn layer(&self, inner: S) -> Self::Service {
        Reject {
            inner,
            cfg: Arc::new(Config {
                shared: self.shared.clone(),
                response: self.response.clone(),
                exempt: self.exempt.clone(),
                from: self.from,
            }),
            mode: PhantomData,
        }
    }
}

/// Everything a [`Reject`] shares with its clones, behind one `Arc`: cloning the service
/// (which axum and tower do per request) touches one reference count.
struct Config<R> {
    shared: Arc<Shared>,
    response: R,
    exempt: ExemptFn,
    from: Phase,
}

/// Rejects new requests while draining; see [`RejectLayer`].
///
/// In the default [`Plain`] mode its response is the inner service's, unchanged.
pub struct Reject<S, R = Default503, M = Plain> {
    inner: S,
    cfg: Arc<Config<R>>,
    mode: PhantomData<fn() -> M>,
}

crate::macros::inner_service_accessors!(Reject<S, R, M>);

impl<S, R, M> Reject<S, R, M> {
    /// The same layer around `inner`.
    pub(crate) fn with_inner<T>(&self, inner: T) -> Reject<T, R, M> {
        Reject {
            inner,
            cfg: self.cfg.clone(),
            mode: PhantomData,
        }
    }

    /// Whether a request arriving now passes without a look at it: the controller has not
    /// reached the phase this layer rejects from.
    #[inline]
    pub(crate) fn serving(&self) -> bool {
        self.cfg.shared.phase() < self.cfg.from
    }
}

impl<S: Clone, R, M> Clone for Reject<S, R, M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            cfg: self.cfg.clone(),
            mode: PhantomData,
        }
    }
}

impl<S: fmt::Debug, R, M> fmt::Debug for Reject<S, R, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reject")
            .field("inner", &self.inner)
            .field("from", &self.cfg.from)
            .field("mode", &mode_name::<M>())
            .finish_non_exhaustive()
    }
}

impl<S, R, M, ReqB, ResB> Service<Request<ReqB>> for Reject<S, R, M>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    R: RejectResponse<ResB> + Clone,
    M: Mode,
{
    type Response = Response<M::Body<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, M>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Decided in `call`: returning Pending here while draining would stall the
        // connection instead of answering.
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if self.serving() {
            return ResponseFuture::inner(self.inner.call(req));
        }
        let cfg = &*self.cfg;
        let (parts, body) = req.into_parts();
        if (cfg.exempt)(&parts) {
            return ResponseFuture::inner(self.inner.call(Request::from_parts(parts, body)));
        }
        cfg.shared.count_rejected();
        tracing::debug!(method = %parts.method, path = parts.uri.path(), "draining: request rejected");
        if M::SSE_RETRY && accepts_event_stream(&parts) {
            if let Some(res) = M::frame(sse_rejection(&cfg.shared, &parts)) {
                return ResponseFuture::rejected(res);
            }
        }
        // The rejection path is rare: a clone of the responder keeps `Reject` one `Arc` wide.
        let mut response = cfg.response.clone();
        ResponseFuture::rejected(M::wrap(response.response(&parts)))
    }
}

/// `200` with only the SSE shutdown frame; see [`RejectLayer::sse_retry`].
fn sse_rejection(shared: &Shared, parts: &Parts) -> Response<Bytes> {
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

pin_project! {
    /// Response future of [`Reject`].
    pub struct ResponseFuture<F, B, M = Plain>
    where
        M: Mode,
    {
        #[pin]
        kind: Kind<F, B, M>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, M>
    where
        M: Mode,
    {
        Inner { #[pin] fut: F },
        // Boxed: the rare rejection must not make every request's future larger.
        Rejected { res: Option<Box<Response<M::Body<B>>>> },
    }
}

impl<F, B, M: Mode> ResponseFuture<F, B, M> {
    fn inner(fut: F) -> Self {
        Self {
            kind: Kind::Inner { fut },
        }
    }

    fn rejected(res: Response<M::Body<B>>) -> Self {
        Self {
            kind: Kind::Rejected {
                res: Some(Box::new(res)),
            },
        }
    }
}

impl<F, B, E, M> Future for ResponseFuture<F, B, M>
where
    F: Future<Output = Result<Response<B>, E>>,
    M: Mode,
{
    type Output = Result<Response<M::Body<B>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            // In the `Plain` mode the inner result is returned as is.
            KindProj::Inner { fut } => M::poll_inner(fut, cx),
            KindProj::Rejected { res } => {
                Poll::Ready(Ok(*res.take().expect("polled after completion")))
            }
        }
    }
}

impl<F, B, M: Mode> fmt::Debug for ResponseFuture<F, B, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body::Body as _;
    use http_body_util::{BodyExt, Empty};
    use tower::ServiceExt;

    use super::*;
    use crate::{DrainController, DrainReason};

    fn parts(method: &str, accept: &[&str], version: Version) -> Parts {
        let mut b = Request::builder()
            .method(method)
            .uri("/events")
            .version(version);
        for a in accept {
            b = b.header(header::ACCEPT, *a);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn grpc_web_gets_the_http_answer_and_grpc_the_trailers_only_one() {
        let mut r = Default503::new(Duration::from_secs(2));
        let req = |ct: &str| {
            Request::post("/demo.Svc/Call")
                .header(header::CONTENT_TYPE, ct)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        for ct in [
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/grpc-web-text",
        ] {
            let res: Response<String> = r.response(&req(ct));
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{ct}");
            assert_eq!(res.headers()[header::RETRY_AFTER], "2", "{ct}");
            assert!(res.headers().get("grpc-status").is_none(), "{ct}");
            assert!(res.headers().get(header::CONTENT_TYPE).is_none(), "{ct}");
        }
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc+json",
        ] {
            let res: Response<String> = r.response(&req(ct));
            assert_eq!(res.status(), StatusCode::OK, "{ct}");
            assert_eq!(res.headers()["grpc-status"], "14", "{ct}");
        }
    }

    #[test]
    fn probes_and_grpc_health_are_exempt_by_default() {
        let exempt =
            |path: &str| probe_paths(&Request::post(path).body(()).unwrap().into_parts().0);
        assert!(exempt("/readyz"));
        assert!(exempt("/grpc.health.v1.Health/Check"));
        assert!(exempt("/grpc.health.v1.Health/Watch"));
        assert!(!exempt("/grpc.health.v1.HealthX/Check"));
        assert!(!exempt("/demo.Ticker/Watch"));
    }

    #[test]
    fn only_a_get_that_names_event_stream_accepts_it() {
        let yes = |m, a: &[&str]| accepts_event_stream(&parts(m, a, Version::HTTP_11));
        assert!(yes("GET", &["text/event-stream"]));
        assert!(yes("GET", &["Text/Event-Stream; charset=utf-8"]));
        assert!(yes("GET", &["application/json, text/event-stream;q=0.9"]));
        assert!(yes("GET", &["application/json", "text/event-stream"]));
        assert!(!yes("GET", &["*/*"]));
        assert!(!yes("GET", &["text/*"]));
        assert!(!yes("GET", &[]));
        assert!(!yes("POST", &["text/event-stream"]));
        assert!(!yes("GET", &["text/event-streams"]));
    }

    #[tokio::test(start_paused = true)]
    async fn sse_retry_answers_200_with_one_frame() {
        let drain = DrainController::builder()
            .reconnect_delay(Duration::from_secs(3))
            .build()
            .unwrap();
        let svc = RejectLayer::new(drain.watch())
            .sse_retry()
            .layer(tower::service_fn(|_req: Request<()>| async {
                Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
            }));
        drain.drain(DrainReason::Manual);
        drain.closing().await;

        for (version, close) in [(Version::HTTP_11, true), (Version::HTTP_2, false)] {
            let req = Request::get("/events")
                .version(version)
                .header("accept", "text/event-stream")
                .body(())
                .unwrap();
            let res = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(res.headers()["content-type"], "text/event-stream");
            assert_eq!(res.headers()["cache-control"], "no-store");
            assert_eq!(res.headers().contains_key("connection"), close);
            let body = res.into_body();
            let len = body.size_hint().exact().unwrap();
            let bytes = body.collect().await.unwrap().to_bytes();
            assert_eq!(bytes.len() as u64, len);
            let text = std::str::from_utf8(&bytes).unwrap();
            assert!(text.starts_with("event: shutdown\ndata: {\"type\":\"shutdown\""));
            assert!(text.contains("\"reason\":\"manual\""), "{text}");
            assert_eq!(text.matches("\n\n").count(), 1, "one event: {text}");
            let retry: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("retry: "))
                .unwrap()
                .parse()
                .unwrap();
            assert!((2400..=3600).contains(&retry), "{retry}");
        }
        // A gRPC request still gets the gRPC-shaped answer, with the drain message.
        let grpc = Request::post("/demo.Ticker/Watch")
            .header("content-type", "application/grpc")
            .header("accept", "text/event-stream")
            .body(())
            .unwrap();
        let res = svc.oneshot(grpc).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["grpc-status"], "14");
        assert_eq!(
            res.headers()["grpc-message"],
            "Server%20is%20shutting%20down,%20please%20reconnect"
        );
        assert!(res.body().is_end_stream());
    }
}
