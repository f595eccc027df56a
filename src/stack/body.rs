use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::frame::body::{self as frame_body, FrameBody, FrameView, Injecting};
use crate::guard::body::{self as guard_body, GuardView, GuardedBody, Stream, Watched};
use crate::track::body::{self as track_body, TrackedBody};
use crate::track::guard::StreamGuard;

pin_project! {
    /// The response body of [`DrainService`](super::DrainService): what
    /// `TrackedBody<GuardedBody<FrameBody<B>>>` does, in one body.
    ///
    /// It holds the inner body once, with the tracker's registration, the guard's and the
    /// frame layer's per-stream state beside it, and runs their logic in the same order as the
    /// nested bodies would (frame innermost, registration outermost), so every behaviour of
    /// those layers is kept: final frames at event boundaries, timeouts, heartbeats, error
    /// frames, release at the end. A stream that nothing is about to happen to (serving, no
    /// guard limits) takes a fast path that forwards each frame with one boundary update and
    /// one phase check, instead of one pass per layer.
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
        inj: Option<Pin<Box<Injecting>>>,
        watched: Watched,
        st: Option<Box<Stream>>,
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

impl<B> DrainBody<B> {
    /// Takes the stack's nested bodies apart (nothing has polled them yet, so nothing is
    /// pinned) and keeps their parts side by side.
    pub(crate) fn fuse(
        body: Result<TrackedBody<GuardedBody<FrameBody<B>>>, Option<Bytes>>,
    ) -> Self {
        let tracked = match body {
            Ok(tracked) => tracked,
            Err(frame) => return Self::frame(frame, None, None, None),
        };
        let (guarded, track) = tracked.into_parts();
        let (framed, watched, st) = guarded.into_parts();
        let Some(framed) = framed else {
            return Self::frame(None, watched, st, track);
        };
        let (body, mut inj) = framed.into_parts();
        // The fused stream path: a stream with a final frame to inject, and a guard without
        // limits. It forwards with the frame body's boundary tracker only (the guard's catches
        // up when the path is left), for as long as the controller serves, and is left for
        // good at the first result other than data.
        if let (Some(s), Some(i)) = (&st, &mut inj) {
            if s.fusable() {
                i.as_mut().set_fused(true);
            }
        }
        Self {
            inner: Inner::Body { body },
            inj,
            watched,
            st,
            track,
        }
    }

    fn frame(
        frame: Option<Bytes>,
        watched: Watched,
        st: Option<Box<Stream>>,
        track: Option<StreamGuard>,
    ) -> Self {
        Self {
            inner: Inner::Frame { frame },
            inj: None,
            watched,
            st,
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
        Self::frame(None, None, None, None)
    }
}

impl<B> Body for DrainBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    #[inline(always)]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let mut inner = match this.inner.project() {
            InnerProj::Body { body } => body,
            InnerProj::Frame { frame } => {
                let r = frame.take().map(|f| Ok(Frame::data(f)));
                track_body::account(this.track, &r, || true);
                return Poll::Ready(r);
            }
        };
        // Every path below leaves its result in one local, `res`, and the fast paths take it
        // from one call of the inner body. With two locals merged at the end, the ~100-byte
        // result was copied with 16-byte loads right after the inner body's narrower stores,
        // which stalls store-to-load forwarding: most of the fused path's cost per frame.
        let mut res;
        match this.inj.as_mut() {
            Some(inj) if inj.is_fused() && inj.serving() => {
                res = inner.as_mut().poll_frame(cx);
                // Each layer's fast path in one: the frame layer's boundary tracker, the
                // registration's counts; the guard only forwards here.
                match &res {
                    Poll::Ready(Some(Ok(frame))) if frame.is_data() => {
                        if let Some(d) = frame.data_ref() {
                            inj.as_mut().forwarded(d);
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
                        res =
                            leave_stream(inner, this.inj, this.watched, this.st, this.track, r, cx);
                    }
                }
            }
            None if this.st.is_none() => {
                // Neither the guard nor the frame layer add anything: the registration's
                // bookkeeping and the breaker's error count.
                res = inner.as_mut().poll_frame(cx);
                if let Poll::Ready(r) = &res {
                    guard_body::watch(this.watched, r);
                    track_body::account(this.track, r, || inner.is_end_stream());
                }
            }
            Some(inj) => {
                if inj.is_fused() {
                    // `Closing` began: the layers' logic from here on.
                    inj.as_mut().set_fused(false);
                    sync(this.inj, this.st);
                }
                res = poll_layers(inner, this.inj, this.watched, this.st, this.track, cx);
            }
            None => res = poll_layers(inner, this.inj, this.watched, this.st, this.track, cx),
        }
        res
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Frame { frame } => frame.is_none(),
            Inner::Body { body } => guard_body::end_of(
                Some(|| frame_body::end_of(body, self.inj.as_deref())),
                self.st.as_deref(),
            ),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Frame { frame } => {
                SizeHint::with_exact(frame.as_ref().map_or(0, |f| f.len() as u64))
            }
            Inner::Body { body } => guard_body::hint_of(
                Some(|| frame_body::hint_of(body, self.inj.as_deref())),
                self.st.as_deref(),
            ),
        }
    }
}

/// Leaving the fused stream path for good: the guard's tracker catches up with the frame
/// body's.
fn sync(inj: &Option<Pin<Box<Injecting>>>, st: &mut Option<Box<Stream>>) {
    if let (Some(inj), Some(st)) = (inj, st) {
        st.sync_tracker(inj.tracker());
    }
}

/// The fused stream path met a result other than data: trailers, an error or the end (each
/// layer takes it as its own fast path would have, innermost first), or a pending inner body
/// (the frame layer watches for `Closing`, and if it began, the layers' logic takes over).
#[cold]
#[inline(never)]
fn leave_stream<B>(
    inner: Pin<&mut B>,
    inj: &mut Option<Pin<Box<Injecting>>>,
    watched: &mut Watched,
    st: &mut Option<Box<Stream>>,
    track: &mut Option<StreamGuard>,
    res: Poll<Option<Result<Frame<Bytes>, B::Error>>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    let (Some(state), Some(stream)) = (inj.as_mut(), st.as_deref_mut()) else {
        // Not a fused stream after all (never so by construction): no result is lost.
        return res;
    };
    let Poll::Ready(r) = res else {
        if !state.as_mut().poll_closing(cx) {
            return Poll::Pending;
        }
        state.as_mut().set_fused(false);
        sync(inj, st);
        return poll_layers(inner, inj, watched, st, track, cx);
    };
    state.as_mut().set_fused(false);
    stream.sync_tracker(state.tracker());
    if r.is_none() {
        state.as_mut().ended();
    }
    let frame_end = frame_body::end_of(&*inner, Some(&**state));
    let out = stream.handle(r, frame_end);
    if let Poll::Ready(o) = &out {
        track_body::account(track, o, || {
            guard_body::end_of(
                Some(|| frame_body::end_of(&*inner, Some(&**state))),
                Some(&*stream),
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
    inj: &mut Option<Pin<Box<Injecting>>>,
    watched: &mut Watched,
    st: &mut Option<Box<Stream>>,
    track: &mut Option<StreamGuard>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    let mut framed = FrameView {
        inner,
        state: inj.as_mut().map(Pin::as_mut),
    };
    let mut guarded = GuardView {
        inner: Pin::new(&mut framed),
        watched,
        st: st.as_deref_mut(),
    };
    track_body::poll_parts(Pin::new(&mut guarded), track, cx)
}

impl<B> fmt::Debug for DrainBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainBody")
            .field("tracked", &self.track.is_some())
            .field("stream", &self.st.is_some())
            .field("injecting", &self.inj.is_some())
            .finish_non_exhaustive()
    }
}
