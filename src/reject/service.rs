use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::request::Parts;
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::controller::{Phase, Shared};
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
/// ```
/// use tower_drain::reject::{Default503, RejectResponse};
/// let mut r = Default503::new(std::time::Duration::from_secs(5));
/// let (parts, ()) = http::Request::new(()).into_parts();
/// let res: http::Response<String> = r.response(&parts);
/// assert_eq!(res.status(), 503);
/// assert_eq!(res.headers()["retry-after"], "5");
/// ```
#[derive(Clone, Debug)]
pub struct Default503 {
    retry_after: HeaderValue,
}

impl Default503 {
    /// With `retry-after` set to `retry_after` rounded up to whole seconds.
    pub fn new(retry_after: std::time::Duration) -> Self {
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        Self {
            retry_after: HeaderValue::from(secs),
        }
    }
}

const CLOSE: HeaderValue = HeaderValue::from_static("close");
const GRPC: HeaderValue = HeaderValue::from_static("application/grpc");
const UNAVAILABLE: HeaderValue = HeaderValue::from_static("14");
const GRPC_MESSAGE: HeaderValue = HeaderValue::from_static("server%20is%20shutting%20down");

fn is_grpc(parts: &Parts) -> bool {
    parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

impl<B: Default> RejectResponse<B> for Default503 {
    fn response(&mut self, parts: &Parts) -> Response<B> {
        let mut res = Response::new(B::default());
        if !is_grpc(parts) {
            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        let h = res.headers_mut();
        if is_grpc(parts) {
            // A "Trailers-Only" gRPC response: clients read UNAVAILABLE and retry.
            h.insert(header::CONTENT_TYPE, GRPC);
            h.insert("grpc-status", UNAVAILABLE);
            h.insert("grpc-message", GRPC_MESSAGE);
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

/// The default exemption: the probe paths.
fn probe_paths(parts: &Parts) -> bool {
    matches!(
        parts.uri.path(),
        "/healthz" | "/readyz" | "/status" | "/drain" | "/metrics"
    )
}

/// Rejects new requests while draining. Builds [`Reject`].
///
/// See the [module docs](super) for an example.
#[must_use]
pub struct RejectLayer<R = Default503> {
    shared: Arc<Shared>,
    response: R,
    exempt: ExemptFn,
    from: Phase,
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
        let response = Default503::new(watch.config().reconnect_delay());
        Self {
            shared: watch.shared,
            response,
            exempt: Arc::new(probe_paths),
            from: Phase::Closing,
        }
    }
}

impl<R> RejectLayer<R> {
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

    /// Answers rejected requests with `response` instead of [`Default503`].
    pub fn with_response<R2>(self, response: R2) -> RejectLayer<R2> {
        RejectLayer {
            shared: self.shared,
            response,
            exempt: self.exempt,
            from: self.from,
        }
    }
}

impl<R: Clone> Clone for RejectLayer<R> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            response: self.response.clone(),
            exempt: self.exempt.clone(),
            from: self.from,
        }
    }
}

impl<R> fmt::Debug for RejectLayer<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RejectLayer")
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl<S, R: Clone> Layer<S> for RejectLayer<R> {
    type Service = Reject<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        Reject {
            inner,
            shared: self.shared.clone(),
            response: self.response.clone(),
            exempt: self.exempt.clone(),
            from: self.from,
        }
    }
}

/// Rejects new requests while draining; see [`RejectLayer`].
pub struct Reject<S, R = Default503> {
    inner: S,
    shared: Arc<Shared>,
    response: R,
    exempt: ExemptFn,
    from: Phase,
}

crate::macros::inner_service_accessors!(Reject<S, R>);

impl<S: Clone, R: Clone> Clone for Reject<S, R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            response: self.response.clone(),
            exempt: self.exempt.clone(),
            from: self.from,
        }
    }
}

impl<S: fmt::Debug, R> fmt::Debug for Reject<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reject")
            .field("inner", &self.inner)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl<S, R, ReqB, ResB> Service<Request<ReqB>> for Reject<S, R>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    R: RejectResponse<ResB>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Decided in `call`: returning Pending here while draining would stall the
        // connection instead of answering.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if self.shared.phase() < self.from {
            return ResponseFuture::inner(self.inner.call(req));
        }
        let (parts, body) = req.into_parts();
        if (self.exempt)(&parts) {
            return ResponseFuture::inner(self.inner.call(Request::from_parts(parts, body)));
        }
        self.shared.count_rejected();
        tracing::debug!(method = %parts.method, path = parts.uri.path(), "draining: request rejected");
        ResponseFuture::rejected(self.response.response(&parts))
    }
}

pin_project! {
    /// Response future of [`Reject`].
    pub struct ResponseFuture<F, B> {
        #[pin]
        kind: Kind<F, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B> {
        Inner { #[pin] fut: F },
        Rejected { res: Option<Response<B>> },
    }
}

impl<F, B> ResponseFuture<F, B> {
    fn inner(fut: F) -> Self {
        Self {
            kind: Kind::Inner { fut },
        }
    }

    fn rejected(res: Response<B>) -> Self {
        Self {
            kind: Kind::Rejected { res: Some(res) },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { fut } => fut.poll(cx),
            KindProj::Rejected { res } => {
                Poll::Ready(Ok(res.take().expect("polled after completion")))
            }
        }
    }
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
