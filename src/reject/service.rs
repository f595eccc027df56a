//! [`Reject`]: the service that answers while draining, and its future.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::request::Parts;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::mode::{mode_name, Mode, Plain};
use super::response::{accepts_event_stream, sse_rejection, Default503, RejectResponse};
use crate::controller::{Phase, Shared};

pub(super) type ExemptFn = Arc<dyn Fn(&Parts) -> bool + Send + Sync>;

/// Everything a [`Reject`] shares with its clones, behind one `Arc`: cloning the service
/// (which axum and tower do per request) touches one reference count.
pub(super) struct Config<R> {
    pub(super) shared: Arc<Shared>,
    pub(super) response: R,
    pub(super) exempt: ExemptFn,
    pub(super) from: Phase,
}

/// Rejects new requests while draining; see [`RejectLayer`](super::RejectLayer).
///
/// In the default [`Plain`](super::Plain) mode its response is the inner service's, unchanged.
pub struct Reject<S, R = Default503, M = Plain> {
    pub(super) inner: S,
    pub(super) cfg: Arc<Config<R>>,
    pub(super) mode: PhantomData<fn() -> M>,
}

crate::macros::inner_service_accessors!(Reject<S, R, M>);

impl<S, R, M> Reject<S, R, M> {
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
