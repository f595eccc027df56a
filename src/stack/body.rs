use std::fmt;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::frame::body::{self as frame_body, FrameBody, FrameView, Injecting};
use crate::frame::GateRef;
use crate::guard::body::{self as guard_body, GuardView, GuardedBody, Stream, Watched};
use crate::track::body::{self as track_body, TrackedBody};
use crate::track::guard::StreamGuard;

pin_project! {
    /// The response body of [`DrainService`](super::DrainService): what
    /// `TrackedBody<GuardedBody<FrameBody<B>>>` does, in one body.
    ///
    /// It holds the inner body once, with the tracker's registration beside it and, for a
    /// stream that gets a final frame, the guard's and the frame layer's state in one
    /// allocation, and runs their logic in the same order as the nested bodies would (frame
    /// innermost, registration outermost), so every behaviour of those layers is kept: final
    /// frames at event boundaries, timeouts, heartbeats, error frames, release at the end. A
    /// stream that nothing is about to happen to (serving, no guard limits) takes a fast path
    /// that forwards each frame with one boundary update and one phase check, instead of one
    /// pass per layer.
    ///
    /// While a frame may still be added, `size_hint` keeps the inner lower bound but has no
    /// upper bound, and `is_end_stream` is `false`.
    ///
    /// ```
    /// # use http::{Request, Response}; use bytes::Bytes; use http_body_util::{BodyExt, Full};
    /// # use tower::{Layer, ServiceExt};
    /// use tower_drain::{DrainController, DrainStack};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let drain = DrainController::new();
    /// let svc = DrainStack::new(drain.watch()).layer(tower::service_fn(|_req: Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hi"))))
    /// }));
    /// let body: tower_drain::stack::DrainBody<Full<Bytes>> =
    ///     svc.oneshot(Request::new(())).await.unwrap().into_body();
    /// assert_eq!(body.collect().await.unwrap().to_bytes(), "hi");
    /// # }
    /// ```
    pub struct DrainBody<B> {
        #[pin]
        inner: Inner<B>,
        // Streams that get a final frame only: boxed, so every other response stays small.
        state: Option<Pin<Box<StreamState>>>,
        watched: Watched,
        // Last: released after everything else is dropped, as `TrackedBody` does.
        track: Option<StreamGuard>,
    }
}

pin_project! {
    #[project = InnerProj]
    enum Inner<B> {
        /// The application's body.
        Body { #[pin] body: B },
        /// The rejection's shutdown frame (`Some`), or no body at all (the guard's own answers).
        Frame { frame: Option<Bytes> },
    }
}

pin_project! {
    /// One stream's state in a fused [`DrainBody`], allocated once: the frame layer's, the
    /// guard's, and the final-frame flag they share. (The nested bodies box the first two
    /// apart and share the flag through a third allocation; at a drain each is one more
    /// object to reach per stream.)
    pub(crate) struct StreamState {
        #[pin]
        inj: Injecting,
        st: Stream,
        // Claimed by whichever logic sends the stream's final frame (see `FinalGate`).
        claimed: AtomicBool,
        // On the fused fast path: serving, the guard without limits, nothing but data so far.
        fused: bool,
    }
}

impl StreamState {
    /// A stream's state, boxed.
    pub(crate) fn new(inj: Injecting, st: Stream) -> Pin<Box<Self>> {
        // The fused stream path: a stream with a final frame to inject, and a guard without
        // limits. It forwards with the frame body's boundary tracker only (the guard's catches
        // up when the path is left), for as long as the controller serves, and is left for
        // good at the first result other than data.
        Box::pin(Self {
            fused: st.fusable(),
            inj,
            st,
            claimed: AtomicBool::new(false),
        })
    }

    /// Leaves the fused path for good: the guard's tracker catches up with the frame
    /// layer's.
    fn unfuse(self: Pin<&mut Self>) {
        let this = self.project();
        *this.fused = false;
        this.st.sync_tracker(this.inj.tracker());
    }
}

impl<B> DrainBody<B> {
    /// The body of a fused call: `state` for a stream that gets a final frame, `watched` for a
    /// plain response whose errors count for the breaker.
    pub(crate) fn new(
        body: B,
        state: Option<Pin<Box<StreamState>>>,
        watched: Watched,
        track: StreamGuard,
    ) -> Self {
        Self {
            inner: Inner::Body { body },
            state,
            watched,
            track: Some(track),
        }
    }

    /// The body the nested layers answered with (`Err`: the rejection's shutdown frame, or
    /// none), taken apart (nothing has polled it yet). A stream's state is made anew in one
    /// allocation, as a fused call's is, so that it drains and forwards alike; the nested
    /// bodies' boxes and shared flag are dropped.
    pub(crate) fn nested(
        body: Result<TrackedBody<GuardedBody<FrameBody<B>>>, Option<Bytes>>,
    ) -> Self {
        let tracked = match body {
            Ok(tracked) => tracked,
            Err(frame) => return Self::frame(frame, None),
        };
        let (guarded, track) = tracked.into_parts();
        let (framed, watched, st) = guarded.into_parts();
        let Some(framed) = framed else {
            // The guard's own answers.
            return Self::frame(None, track);
        };
        let (body, inj) = framed.into_parts();
        let state = match (inj, st) {
            (Some((cfg, rtc)), Some(st)) => Some(StreamState::new(Injecting::new(cfg, rtc), *st)),
            (None, None) => None,
            // The stack's frame layer and guard share one encoder and both leave `HEAD` alone.
            _ => unreachable!("the frame layer and the guard of a DrainStack decide alike"),
        };
        Self {
            inner: Inner::Body { body },
            state,
            watched,
            track,
        }
    }

    /// A body of the stack's own: `frame` (or nothing), the registration released at its end.
    pub(crate) fn frame(frame: Option<Bytes>, track: Option<StreamGuard>) -> Self {
        Self {
            inner: Inner::Frame { frame },
            state: None,
            watched: None,
            track,
        }
    }
}

impl<B> Default for DrainBody<B> {
    /// An empty body.
    ///
    /// ```
    /// use http_body::Body;
    /// let body = tower_drain::stack::DrainBody::<http_body_util::Empty<bytes::Bytes>>::default();
    /// assert!(body.is_end_stream());
    /// ```
    fn default() -> Self {
        Self::frame(None, None)
    }
}

impl<B> Body for DrainBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display + Into<crate::BoxError>,
{
    type Data = Bytes;
    type Error = crate::BoxError;

    #[inline(always)]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::BoxError>>> {
        let this = self.project();
        let mut inner = match this.inner.project() {
            InnerProj::Body { body } => body,
            InnerProj::Frame { frame } => {
                let r = frame.take().map(|f| Ok(Frame::data(f)));
                track_body::account::<Bytes, crate::BoxError>(this.track, &r, || true);
                return Poll::Ready(r);
            }
        };
        // Every path below leaves its result in one local, `res`, and the fast paths take it
        // from one call of the inner body. With two locals merged at the end, the ~100-byte
        // result was copied with 16-byte loads right after the inner body's narrower stores,
        // which stalls store-to-load forwarding: most of the fused path's cost per frame.
        let mut res;
        match this.state.as_mut() {
            Some(state) if state.fused && state.inj.serving() => {
                res = inner.as_mut().poll_frame(cx);
                // Each layer's fast path in one: the frame layer's boundary tracker, the
                // registration's counts; the guard only forwards here.
                match &res {
                    Poll::Ready(Some(Ok(frame))) if frame.is_data() => {
                        if let Some(d) = frame.data_ref() {
                            state.as_mut().project().inj.forwarded(d);
                            if let Some(g) = this.track.as_mut() {
                                g.frames += 1;
                                g.bytes += d.len() as u64;
                            }
                        }
                    }
                    _ => {
                        // Moved out and back (not lent): the inner body's store of `res` must
                        // stay the only one on the fast path.
                        let r = std::mem::replace(&mut res, Poll::Pending);
                        res = leave_stream(inner, state.as_mut(), this.watched, this.track, r, cx);
                    }
                }
            }
            None => {
                // Neither the guard nor the frame layer add anything: the registration's
                // bookkeeping and the breaker's error count.
                res = inner.as_mut().poll_frame(cx);
                if let Poll::Ready(r) = &res {
                    guard_body::watch(this.watched, r);
                    track_body::account(this.track, r, || inner.is_end_stream());
                }
            }
            Some(state) => {
                if state.fused {
                    // `Closing` began: the layers' logic from here on.
                    state.as_mut().unfuse();
                }
                res = poll_layers(inner, Some(state.as_mut()), this.watched, this.track, cx);
            }
        }
        let state = this.state;
        crate::boxed_result(res, || {
            state.as_mut().is_some_and(|s| {
                let s = s.as_mut().project();
                // Both report once (either may have ended the stream mid-record).
                let frame = s.inj.take_aborted();
                s.st.take_aborted() || frame
            })
        })
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Frame { frame } => frame.is_none(),
            Inner::Body { body } => match self.state.as_deref() {
                None => body.is_end_stream(),
                Some(s) => {
                    guard_body::end_of(Some(|| frame_body::end_of(body, Some(&s.inj))), Some(&s.st))
                }
            },
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Frame { frame } => {
                SizeHint::with_exact(frame.as_ref().map_or(0, |f| f.len() as u64))
            }
            Inner::Body { body } => match self.state.as_deref() {
                None => body.size_hint(),
                Some(s) => guard_body::hint_of(
                    Some(|| frame_body::hint_of(body, Some(&s.inj))),
                    Some(&s.st),
                ),
            },
        }
    }
}

/// The fused stream path met a result other than data: trailers, an error or the end (each
/// layer takes it as its own fast path would have, innermost first), or a pending inner body
/// (the frame layer watches for `Closing`, and if it began, the layers' logic takes over).
#[cold]
#[inline(never)]
fn leave_stream<B>(
    inner: Pin<&mut B>,
    mut state: Pin<&mut StreamState>,
    watched: &mut Watched,
    track: &mut Option<StreamGuard>,
    res: Poll<Option<Result<Frame<Bytes>, B::Error>>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    let Poll::Ready(r) = res else {
        if !state.as_mut().project().inj.poll_closing(cx) {
            return Poll::Pending;
        }
        state.as_mut().unfuse();
        return poll_layers(inner, Some(state), watched, track, cx);
    };
    state.as_mut().unfuse();
    let mut s = state.project();
    if r.is_none() {
        s.inj.as_mut().ended();
    }
    let frame_end = frame_body::end_of(&*inner, Some(&*s.inj));
    let out = s.st.handle(r, frame_end, GateRef::local(s.claimed));
    if let Poll::Ready(o) = &out {
        track_body::account(track, o, || {
            guard_body::end_of(
                Some(|| frame_body::end_of(&*inner, Some(&*s.inj))),
                Some(&*s.st),
            )
        });
    }
    out
}

/// The layers' logic, nested as the separate bodies nest: registration around guard around
/// frame around the inner body.
#[inline(never)]
fn poll_layers<B>(
    inner: Pin<&mut B>,
    state: Option<Pin<&mut StreamState>>,
    watched: &mut Watched,
    track: &mut Option<StreamGuard>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    let (inj, st, gate) = match state {
        Some(s) => {
            let s = s.project();
            (Some(s.inj), Some(s.st), GateRef::local(s.claimed))
        }
        None => (None, None, GateRef::default()),
    };
    let mut framed = FrameView {
        inner,
        state: inj,
        gate,
    };
    let mut guarded = GuardView {
        inner: Pin::new(&mut framed),
        watched,
        st,
        gate,
    };
    track_body::poll_parts(Pin::new(&mut guarded), track, cx)
}

impl<B> fmt::Debug for DrainBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainBody")
            .field("tracked", &self.track.is_some())
            .field("stream", &self.state.is_some())
            .finish_non_exhaustive()
    }
}
