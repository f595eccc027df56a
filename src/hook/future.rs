//! [`ResponseFuture`]: a request through its concerns' call hooks.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body_util::Empty;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::call::{AfterCx, Before, CallHook, CallState, HookOf};
use super::HookBody;

/// A request waiting for a hook (a per-key lease) before the inner call.
struct Waiting<S, ReqB, C: CallHook> {
    wait: Option<C::Wait>,
    inner: S,
    parts: Parts,
    body: ReqB,
    hooks: Arc<C>,
}

pin_project! {
    /// The response future of a [`HookService`](super::HookService): the inner service's
    /// future, held once, with the concerns' state of the call. The inner future is polled
    /// before a response timeout, so a response ready at the deadline wins.
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
    /// let fut = svc.ready().await.unwrap().call(Request::new(()));
    /// assert_eq!(fut.await.unwrap().status(), 200);
    /// # }
    /// ```
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<S, ReqB, C>
    where
        S: Service<Request<ReqB>>,
        C: CallHook,
    {
        #[pin]
        kind: Kind<S, ReqB, C>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, ReqB, C>
    where
        S: Service<Request<ReqB>>,
        C: CallHook,
    {
        Calling {
            #[pin]
            fut: S::Future,
            // Boxed, and only once a deadline is polled: a `Sleep` is large, and the future
            // is moved into axum's and tower's futures on every request.
            timer: Option<Pin<Box<Sleep>>>,
            state: Option<C::State>,
        },
        // Boxed: the request and a service clone are large, and only keyed requests under a
        // limit wait.
        Waiting { waiting: Option<Box<Waiting<S, ReqB, C>>> },
        // Boxed, as in `Before`: rare, and the future is moved on every request.
        Answer { state: Option<C::State>, res: Option<Box<Response<()>>> },
        Done,
    }
}

impl<S, ReqB, C> ResponseFuture<S, ReqB, C>
where
    S: Service<Request<ReqB>>,
    C: CallHook,
{
    #[inline]
    pub(super) fn calling(fut: S::Future, state: C::State) -> Self {
        Self {
            kind: Kind::Calling {
                fut,
                timer: None,
                state: Some(state),
            },
        }
    }

    pub(super) fn answer(state: Option<C::State>, res: Box<Response<()>>) -> Self {
        Self {
            kind: Kind::Answer {
                state,
                res: Some(res),
            },
        }
    }

    pub(super) fn waiting(
        wait: C::Wait,
        inner: S,
        parts: Parts,
        body: ReqB,
        hooks: Arc<C>,
    ) -> Self {
        Self {
            kind: Kind::Waiting {
                waiting: Some(Box::new(Waiting {
                    wait: Some(wait),
                    inner,
                    parts,
                    body,
                    hooks,
                })),
            },
        }
    }
}

impl<S, ReqB, C, B> Future for ResponseFuture<S, ReqB, C>
where
    S: Service<Request<ReqB>, Response = Response<B>>,
    C: CallHook,
    B: http_body::Body,
{
    type Output = Result<Response<HookBody<B, HookOf<C>>>, S::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut kind = self.project().kind;
        loop {
            match kind.as_mut().project() {
                KindProj::Calling { fut, timer, state } => {
                    // The inner future first: a response ready at the deadline wins the tie.
                    if let Poll::Ready(res) = fut.poll(cx) {
                        let state = state.take().expect("polled after completion");
                        kind.set(Kind::Done);
                        return Poll::Ready(respond(state, res));
                    }
                    let st = state.as_ref().expect("polled after completion");
                    if poll_deadline(timer, st, cx).is_pending() {
                        return Poll::Pending;
                    }
                    let st = state.take().expect("polled after completion");
                    // Drop the inner future now, then answer.
                    kind.set(Kind::Done);
                    let (state, res) = st.timed_out();
                    return Poll::Ready(Ok(answer(state, res)));
                }
                KindProj::Waiting { waiting } => {
                    let mut w = waiting.take().expect("polled after completion");
                    let wait = w.wait.take().expect("polled after completion");
                    match w.hooks.poll_wait(wait, &mut w.parts, cx) {
                        Before::Wait(wait) => {
                            w.wait = Some(wait);
                            *waiting = Some(w);
                            return Poll::Pending;
                        }
                        Before::Answer(state, res) => kind.set(Kind::Answer {
                            state,
                            res: Some(res),
                        }),
                        Before::Call(state) => {
                            let Waiting {
                                mut inner,
                                parts,
                                body,
                                ..
                            } = *w;
                            let fut = inner.call(Request::from_parts(parts, body));
                            kind.set(Kind::Calling {
                                fut,
                                timer: None,
                                state: Some(state),
                            });
                        }
                    }
                }
                KindProj::Answer { state, res } => {
                    let res = res.take().expect("polled after completion");
                    let state = state.take();
                    kind.set(Kind::Done);
                    return Poll::Ready(Ok(answer(state, *res)));
                }
                KindProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// Polls the deadline of a call whose inner future is pending: `Ready` once it has passed,
/// `Pending` (forever) without one. The timer is made on the first poll, so `call` works
/// outside a runtime too.
#[inline]
fn poll_deadline<St: CallState>(
    timer: &mut Option<Pin<Box<Sleep>>>,
    state: &St,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let sleep = match timer {
        Some(sleep) => sleep,
        None => {
            let Some(deadline) = state.deadline() else {
                return Poll::Pending;
            };
            timer.insert(Box::pin(tokio::time::sleep_until(deadline)))
        }
    };
    sleep.as_mut().poll(cx)
}

/// The inner call's result through the hooks' steps after it.
#[inline]
fn respond<St: CallState, B, E>(
    state: St,
    res: Result<Response<B>, E>,
) -> Result<Response<HookBody<B, St::Hook>>, E>
where
    B: http_body::Body,
{
    let mut res = match res {
        Ok(res) => res,
        Err(e) => {
            state.failed();
            return Err(e);
        }
    };
    let mut acx = AfterCx::default();
    let hook = state.after(&mut res, &mut acx);
    let (boundary, gate) = acx.finish(res.extensions_mut());
    Ok(res.map(|b| HookBody::new(b, hook, boundary, gate)))
}

/// A hook's own answer, through the steps after the call of the hooks outside it.
#[cold]
fn answer<St: CallState, B>(
    state: Option<St>,
    res: Response<()>,
) -> Response<HookBody<B, St::Hook>> {
    let mut res = res.map(|()| Empty::<Bytes>::new());
    let hook = match state {
        Some(state) => state.after(&mut res, &mut AfterCx::default()),
        None => Default::default(),
    };
    res.map(|_| HookBody::empty(hook))
}

impl<S, ReqB, C> fmt::Debug for ResponseFuture<S, ReqB, C>
where
    S: Service<Request<ReqB>>,
    C: CallHook,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
