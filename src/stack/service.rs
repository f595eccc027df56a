use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::DrainBody;
use crate::frame::{Frame, FrameBody};
use crate::guard::{Guard, GuardedBody};
use crate::reject::{Default503, Mode, Plain, Reject};
use crate::track::{MemoryStore, Track, TrackedBody};

/// The inner service stack of a [`DrainService`].
pub(super) type Layers<S, St, M> = Reject<Track<Guard<Frame<S>>, St>, Default503, M>;

/// The service built by [`DrainStack`](super::DrainStack): `Reject → Track → Guard → Frame`
/// around `S`, answering with one fused [`DrainBody`] instead of four nested bodies.
///
/// ```
/// # use http::{Request, Response}; use bytes::Bytes; use http_body_util::Full;
/// # use tower::{Layer, ServiceExt};
/// use tower_drain::{stack::DrainService, DrainController, DrainStack};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let drain = DrainController::new();
/// let inner = tower::service_fn(|_req: Request<()>| async {
///     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hi"))))
/// });
/// let svc: DrainService<_> = DrainStack::new(drain.watch()).layer(inner);
/// assert_eq!(svc.oneshot(Request::new(())).await.unwrap().status(), 200);
/// # }
/// ```
pub struct DrainService<S, St = MemoryStore, M = Plain> {
    inner: Layers<S, St, M>,
}

impl<S, St, M> DrainService<S, St, M> {
    pub(crate) fn new(inner: Layers<S, St, M>) -> Self {
        Self { inner }
    }
}

impl<S, St, M> Clone for DrainService<S, St, M>
where
    Layers<S, St, M>: Clone,
{
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S, St, M> std::fmt::Debug for DrainService<S, St, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainService").finish_non_exhaustive()
    }
}

impl<S, St, M, ReqB, B> Service<Request<ReqB>> for DrainService<S, St, M>
where
    S: Service<Request<ReqB>, Response = Response<B>>,
    M: Mode,
    Layers<S, St, M>: Service<
        Request<ReqB>,
        Response = Response<M::Body<TrackedBody<GuardedBody<FrameBody<B>>>>>,
    >,
{
    type Response = Response<DrainBody<B>>;
    type Error = <Layers<S, St, M> as Service<Request<ReqB>>>::Error;
    type Future = ResponseFuture<<Layers<S, St, M> as Service<Request<ReqB>>>::Future, B, M>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
            _types: PhantomData,
        }
    }
}

pin_project! {
    /// The response future of [`DrainService`].
    ///
    /// ```
    /// # use http::{Request, Response}; use bytes::Bytes; use http_body_util::Full;
    /// # use tower::{Layer, Service, ServiceExt};
    /// use tower_drain::{DrainController, DrainStack};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let drain = DrainController::new();
    /// let mut svc = DrainStack::new(drain.watch()).layer(tower::service_fn(|_req: Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hi"))))
    /// }));
    /// let fut: tower_drain::stack::ResponseFuture<_, _, _> =
    ///     svc.ready().await.unwrap().call(Request::new(()));
    /// assert_eq!(fut.await.unwrap().status(), 200);
    /// # }
    /// ```
    pub struct ResponseFuture<F, B, M> {
        #[pin]
        inner: F,
        _types: PhantomData<fn() -> (B, M)>,
    }
}

impl<F, B, M, E> Future for ResponseFuture<F, B, M>
where
    F: Future<Output = Result<Response<M::Body<TrackedBody<GuardedBody<FrameBody<B>>>>>, E>>,
    M: Mode,
{
    type Output = Result<Response<DrainBody<B>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let res = ready!(self.project().inner.poll(cx));
        Poll::Ready(res.map(|res| res.map(|b| DrainBody::fuse(M::into_parts(b)))))
    }
}

impl<F, B, M> std::fmt::Debug for ResponseFuture<F, B, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
