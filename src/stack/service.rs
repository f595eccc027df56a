use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::body::{DrainBody, StreamState};
use crate::frame::{self, Frame, FrameBody, Injecting};
use crate::guard::{self, CallState, Guard, Guarded, GuardedBody};
use crate::reject::{Default503, Mode, Plain, Reject};
use crate::track::{MemoryStore, StreamGuard, Track, TrackedBody};

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
    inner: S,
    // The four layers' configurations, held once: a clone of the service (axum and tower
    // clone it per request) touches one reference count, not one per layer.
    layers: Arc<Layers<(), St, M>>,
}

impl<S, St, M> DrainService<S, St, M> {
    pub(crate) fn new(inner: S, layers: Layers<(), St, M>) -> Self {
        Self {
            inner,
            layers: Arc::new(layers),
        }
    }
}

/// The four layers of `layers` around `inner`.
fn nested<S, St, M>(layers: &Layers<(), St, M>, inner: S) -> Layers<S, St, M> {
    let track = layers.get_ref();
    let guard = track.get_ref();
    let frame = guard.get_ref();
    layers.with_inner(track.with_inner(guard.with_inner(frame.with_inner(inner))))
}

impl<S: Clone, St, M> Clone for DrainService<S, St, M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layers: self.layers.clone(),
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
    S: Service<Request<ReqB>, Response = Response<B>> + Clone,
    B: http_body::Body,
    M: Mode,
    Layers<S, St, M>: Service<
        Request<ReqB>,
        Response = Response<M::Body<TrackedBody<GuardedBody<FrameBody<B>>>>>,
        Error = S::Error,
    >,
{
    type Response = Response<DrainBody<B>>;
    type Error = S::Error;
    type Future =
        ResponseFuture<<Layers<S, St, M> as Service<Request<ReqB>>>::Future, S::Future, B, M>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // None of the four layers has readiness of its own.
        self.inner.poll_ready(cx)
    }

    /// While serving, and unless a request waits for a per-key lease or the guard
    /// revalidates, the four layers' steps before the inner call run here, in their order,
    /// and the inner future is held once (their steps after it run when it is ready); else
    /// the request goes through the nested layers.
    #[inline]
    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let reject = &*self.layers;
        let track = reject.get_ref();
        let guard = track.get_ref();
        if !reject.serving()
            || track.is_keyed()
            || guard.needs_parts()
            // An upgrade's registration goes to the socket's handle (see `ws`).
            || crate::ws::may_upgrade(&req)
        {
            // The service polled ready goes into the nested layers; a clone takes its place.
            let clone = self.inner.clone();
            let ready = std::mem::replace(&mut self.inner, clone);
            return ResponseFuture {
                kind: Kind::Nested {
                    fut: Box::pin(nested(reject, ready).call(req)),
                    _types: PhantomData,
                },
            };
        }
        let stream = track.register(&req);
        let call = match guard.before(&req, None) {
            Ok(call) => call,
            Err(rejection) => {
                return ResponseFuture {
                    kind: Kind::Rejected {
                        rejection,
                        stream: Some(stream),
                    },
                }
            }
        };
        // The frame layer's own step (`HEAD` gets no frame) is the guard's `head`.
        let fut = self.inner.call(req);
        ResponseFuture {
            kind: Kind::Fused {
                fut,
                timeout: None,
                state: Some(Fused { stream, call }),
            },
        }
    }
}

/// What a fused call carries from `call` to the response.
struct Fused {
    stream: StreamGuard,
    call: CallState,
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
    /// let fut: tower_drain::stack::ResponseFuture<_, _, _, _> =
    ///     svc.ready().await.unwrap().call(Request::new(()));
    /// assert_eq!(fut.await.unwrap().status(), 200);
    /// # }
    /// ```
    pub struct ResponseFuture<N, F, B, M> {
        #[pin]
        kind: Kind<N, F, B, M>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<N, F, B, M> {
        // The inner service's future, held once.
        Fused {
            #[pin]
            fut: F,
            // As in the guard's future: boxed, and only once a response timeout is polled.
            timeout: Option<Pin<Box<Sleep>>>,
            state: Option<Fused>,
        },
        // The nested layers' future, boxed: it holds the inner future and the four layers'
        // state, and inline it would size every fused future (moved into axum's and tower's
        // futures on each request) to its own.
        Nested {
            fut: Pin<Box<N>>,
            _types: PhantomData<fn() -> (B, M)>,
        },
        // Turned away by the circuit breaker.
        Rejected {
            rejection: guard::Rejection,
            stream: Option<StreamGuard>,
        },
        Done,
    }
}

impl<N, F, B, M, E> Future for ResponseFuture<N, F, B, M>
where
    N: Future<Output = Result<Response<M::Body<TrackedBody<GuardedBody<FrameBody<B>>>>>, E>>,
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
    M: Mode,
{
    type Output = Result<Response<DrainBody<B>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut kind = self.project().kind;
        let (stream, res) = match kind.as_mut().project() {
            KindProj::Fused {
                fut,
                timeout,
                state,
            } => {
                // The inner future first: a response ready at the deadline wins the tie.
                if let Poll::Ready(res) = fut.poll(cx) {
                    let Fused { stream, call } = state.take().expect("polled after completion");
                    kind.set(Kind::Done);
                    return Poll::Ready(respond(stream, call, res));
                }
                let st = state.as_ref().expect("polled after completion");
                if guard::poll_timeout(timeout, &st.call, cx).is_pending() {
                    return Poll::Pending;
                }
                let Fused { stream, call } = state.take().expect("polled after completion");
                // Drop the inner future now, then answer.
                kind.set(Kind::Done);
                (stream, guard::timed_out_response::<()>(call))
            }
            KindProj::Nested { fut, .. } => {
                let res = ready!(fut.as_mut().poll(cx));
                return Poll::Ready(res.map(|mut res| {
                    // The frame layer's gate is not the one the stream's state keeps: an outer
                    // guard must not take it (as with a fused call, which leaves none).
                    res.extensions_mut().remove::<frame::FinalGate>();
                    res.map(|b| DrainBody::nested(M::into_parts(b)))
                }));
            }
            KindProj::Rejected { rejection, stream } => {
                let stream = stream.take().expect("polled after completion");
                let res = guard::rejection::<()>(*rejection);
                kind.set(Kind::Done);
                (stream, res)
            }
            KindProj::Done => panic!("ResponseFuture polled after completion"),
        };
        // The guard's own answers have no body; the registration ends with it.
        Poll::Ready(Ok(res.map(|_| DrainBody::frame(None, Some(stream)))))
    }
}

/// The inner call's result through the layers' steps after it, as the nested layers would:
/// the stream decision is made once for both the frame layer and the guard (they share the
/// encoder), the breaker hears of the outcome, and a stream gets both layers' state in one
/// allocation.
#[inline]
fn respond<B: http_body::Body, E>(
    stream: StreamGuard,
    call: CallState,
    res: Result<Response<B>, E>,
) -> Result<Response<DrainBody<B>>, E> {
    let mut res = match res {
        Ok(res) => res,
        // `stream` is dropped after the breaker heard of the error, as in the nested layers.
        Err(e) => return Err(guard::finish_err(call, e)),
    };
    let inject = guard::injects(&call, &res);
    let (state, watched) = match guard::finish_ok(call, &res, inject) {
        Guarded::Stream(st) => {
            frame::unfix_length(&mut res);
            let inj = Injecting::new(st.frame_config(), frame::run_to_completion(&res));
            (Some(StreamState::new(inj, st)), None)
        }
        Guarded::Watched(cfg, uri) => (None, Some((cfg, uri))),
        Guarded::Plain => (None, None),
    };
    Ok(res.map(|b| DrainBody::new(b, state, watched, stream)))
}

impl<N, F, B, M> std::fmt::Debug for ResponseFuture<N, F, B, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
