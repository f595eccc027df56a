use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::body::{FinalGate, FrameBody, FrameConfig};
use super::encoder::{FinalFrame, Sse};
use crate::DrainWatch;

/// Response extension: inject the final frame into this response even though the encoder
/// does not recognise its content type.
///
/// ```
/// let mut res = http::Response::new(());
/// res.extensions_mut().insert(tower_drain::frame::Inject);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Inject;

/// Response extension: this stream cannot resume elsewhere (a report being generated, a long
/// export), so it gets no shutdown frame when `Closing` begins; it is left to finish by itself
/// within the grace period and is force-closed only at the deadline.
///
/// ```
/// let mut res = http::Response::new(());
/// res.extensions_mut().insert(tower_drain::frame::RunToCompletion);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct RunToCompletion;

/// Injects the protocol's final frame into streaming responses when the controller closes.
/// Builds [`Frame`].
///
/// See the [module docs](super) for an example.
#[derive(Clone)]
#[must_use]
pub struct FrameLayer {
    pub(crate) cfg: Arc<FrameConfig>,
}

impl FrameLayer {
    /// Injects Server-Sent Events frames ([`Sse`]).
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::frame::FrameLayer::new(drain.watch());
    /// # drop(layer);
    /// ```
    pub fn new(watch: DrainWatch) -> Self {
        Self::with_encoder(watch, Sse::new())
    }

    /// Injects frames made by `encoder` ([`NdJson`](super::NdJson), [`Grpc`](super::Grpc),
    /// [`FnFrame`](super::FnFrame), …).
    ///
    /// ```
    /// use tower_drain::frame::{FrameLayer, Grpc};
    /// let drain = tower_drain::DrainController::new();
    /// let layer = FrameLayer::with_encoder(drain.watch(), Grpc::new());
    /// # drop(layer);
    /// ```
    pub fn with_encoder(watch: DrainWatch, encoder: impl FinalFrame) -> Self {
        Self {
            cfg: Arc::new(FrameConfig {
                shared: watch.shared,
                encoder: Arc::new(encoder),
            }),
        }
    }
}

impl<S> Layer<S> for FrameLayer {
    type Service = Frame<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Frame {
            inner,
            cfg: self.cfg.clone(),
        }
    }
}

impl fmt::Debug for FrameLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameLayer")
            .field("boundary", &self.cfg.encoder.boundary())
            .finish_non_exhaustive()
    }
}

/// Wraps streaming response bodies in a [`FrameBody`]; see [`FrameLayer`].
#[derive(Clone)]
pub struct Frame<S> {
    inner: S,
    cfg: Arc<FrameConfig>,
}

crate::macros::inner_service_accessors!(Frame<S>);

impl<S> Frame<S> {
    /// The same layer around `inner`.
    pub(crate) fn with_inner<T>(&self, inner: T) -> Frame<T> {
        Frame {
            inner,
            cfg: self.cfg.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Frame<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Frame<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes>,
{
    type Response = Response<FrameBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // Never inject into the (empty) answer to a HEAD request.
        let cfg = (req.method() != Method::HEAD).then(|| self.cfg.clone());
        ResponseFuture {
            inner: self.inner.call(req),
            cfg,
        }
    }
}

pin_project! {
    /// Response future of [`Frame`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        cfg: Option<Arc<FrameConfig>>,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    ResB: Body,
{
    type Output = Result<Response<FrameBody<ResB>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.inner.poll(cx))?;
        let cfg = this
            .cfg
            .take()
            .filter(|cfg| should_inject(&res, &*cfg.encoder));
        let mut res = respond(cfg, res);
        if let Some(gate) = res.body().gate() {
            // Shared with an outer `GuardedBody`: one final frame per stream.
            res.extensions_mut().insert(gate);
        }
        Poll::Ready(Ok(res))
    }
}

/// The frame layer's step after the inner call: `cfg` when `res` gets a final frame (see
/// [`should_inject`]), else `None` for a passthrough body. The stream's final-frame gate is
/// the body's ([`FrameBody::gate`]); the frame layer puts it in the response's extensions for
/// an outer guard layer. (The fused [`DrainService`](crate::stack::DrainService) call builds
/// its streams' state itself, with the flag inside.)
#[inline]
fn respond<B>(cfg: Option<Arc<FrameConfig>>, mut res: Response<B>) -> Response<FrameBody<B>> {
    match cfg {
        Some(cfg) => {
            unfix_length(&mut res);
            let rtc = run_to_completion(&res);
            res.map(|b| FrameBody::inject(b, cfg, rtc, FinalGate::new()))
        }
        None => res.map(FrameBody::passthrough),
    }
}

const GRPC_STATUS: header::HeaderName = header::HeaderName::from_static("grpc-status");

/// Prepares the headers of a response whose body may get frames added (final frames,
/// heartbeats): its `content-length` no longer holds, so it goes (HTTP/1.1 then sends the body
/// chunked). The body's `size_hint` has no upper bound for as long as a frame may be added.
#[inline]
pub(crate) fn unfix_length<B>(res: &mut Response<B>) {
    res.headers_mut().remove(header::CONTENT_LENGTH);
}

/// Whether the application asked for `res` to run to completion ([`RunToCompletion`]).
#[inline]
pub(crate) fn run_to_completion<B>(res: &Response<B>) -> bool {
    res.extensions().get::<RunToCompletion>().is_some()
}

/// Only streaming responses of the encoder's protocol (or opted in), never bodiless statuses,
/// bodies that have already ended (a gRPC "Trailers-Only" answer, with `grpc-status` in its
/// headers and an empty body, keeps its END_STREAM on the HEADERS frame) or already-encoded
/// bodies (put `FrameLayer` inside any compression layer).
pub(crate) fn should_inject<B: Body>(res: &Response<B>, encoder: &dyn FinalFrame) -> bool {
    let status = res.status();
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return false;
    }
    // The content type first: most responses are not streams and stop here, before the
    // other header lookups.
    (encoder.applies(res.headers()) || res.extensions().get::<Inject>().is_some())
        && !res.body().is_end_stream()
        && !res.headers().contains_key(GRPC_STATUS)
        && !res.headers().contains_key(header::CONTENT_ENCODING)
}
