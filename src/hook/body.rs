//! [`HookBody`]: a response body with its concerns' hooks around it.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::stream::{Next, Polled, StreamCx, StreamHook};
use crate::frame::{Boundary, FinalGate, GateRef, Tracker};

/// Where a body's final-frame flag lives.
#[derive(Debug, Default)]
pub(super) enum Gate {
    /// No hook of this body sends a final frame that another one could also send.
    #[default]
    None,
    /// Kept here: every hook that may send the final frame is in this body.
    Local(AtomicBool),
    /// Shared with a body inside or outside this one (layers stacked by hand).
    Shared(FinalGate),
}

impl Gate {
    #[inline(always)]
    fn get(&self) -> GateRef<'_> {
        match self {
            Gate::None => GateRef::default(),
            Gate::Local(flag) => GateRef::local(flag),
            Gate::Shared(g) => GateRef::of_gate(g),
        }
    }
}

pin_project! {
    /// The response body of every tower-drain layer: the inner body, with the hook `H` of each
    /// concern around it (for [`DrainStack`](crate::DrainStack), the track layer's, the
    /// guard's and the frame layer's, in one body), one event-boundary tracker they share, and
    /// the stream's final-frame flag.
    ///
    /// The hooks see every frame on its way out and may add frames of their own at event
    /// boundaries (final frames, heartbeats). While a frame may still be added, `size_hint`
    /// keeps the inner lower bound but has no upper bound, and `is_end_stream` is `false`. The
    /// error is a [`BoxError`](crate::BoxError): the inner body's, or
    /// [`Aborted`](crate::Aborted) when a hook had to end the body in the middle of a record.
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
    pub struct HookBody<B, H> {
        #[pin]
        inner: Inner<B>,
        hook: H,
        tracker: Option<Tracker>,
        gate: Gate,
    }
}

pin_project! {
    #[project = InnerProj]
    enum Inner<B> {
        Body { #[pin] body: B },
        // A layer's own answer: no body.
        Empty,
    }
}

impl<B, H> HookBody<B, H> {
    pub(super) fn new(body: B, hook: H, boundary: Option<Boundary>, gate: Gate) -> Self {
        Self {
            inner: Inner::Body { body },
            hook,
            tracker: boundary.map(Tracker::new),
            gate,
        }
    }

    pub(super) fn empty(hook: H) -> Self {
        Self {
            inner: Inner::Empty,
            hook,
            tracker: None,
            gate: Gate::None,
        }
    }
}

impl<B, H: Default> Default for HookBody<B, H> {
    /// An empty body.
    ///
    /// ```
    /// use http_body::Body;
    /// let body = tower_drain::stack::DrainBody::<http_body_util::Empty<bytes::Bytes>>::default();
    /// assert!(body.is_end_stream());
    /// ```
    fn default() -> Self {
        Self::empty(H::default())
    }
}

impl<B: Body> Inner<B> {
    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            Inner::Body { body } => body.is_end_stream(),
            Inner::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Inner::Body { body } => body.size_hint(),
            Inner::Empty => SizeHint::with_exact(0),
        }
    }
}

/// The inner body as the innermost hook sees it: its data feeds the body's one tracker. Its
/// next result may have been taken already (`first`, on the passive path): the hooks get that
/// one first.
struct Source<'a, B: Body> {
    first: Option<Polled<B::Error>>,
    inner: Pin<&'a mut Inner<B>>,
}

impl<B> Next for Source<'_, B>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    type Error = B::Error;

    #[inline(always)]
    fn poll_next(&mut self, cx: &mut StreamCx<'_, '_>) -> Polled<B::Error> {
        if let Some(res) = self.first.take() {
            return res;
        }
        let body = match self.inner.as_mut().project() {
            InnerProj::Body { body } => body,
            InnerProj::Empty => return Poll::Ready(None),
        };
        let res = body.poll_frame(cx.task);
        if let Poll::Ready(Some(Ok(f))) = &res {
            if let (Some(d), Some(t)) = (f.data_ref(), cx.tracker.as_mut()) {
                t.update(d);
            }
        }
        res
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B, H> Body for HookBody<B, H>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display + Into<crate::BoxError>,
    H: StreamHook,
{
    type Data = Bytes;
    type Error = crate::BoxError;

    #[inline(always)]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::BoxError>>> {
        let this = self.project();
        let hook = this.hook;
        let mut inner = this.inner;
        let mut first = None;
        if hook.passive() {
            // Every hook only watches: a data frame needs the tracker and their bookkeeping
            // alone.
            let res = match inner.as_mut().project() {
                InnerProj::Body { body } => body.poll_frame(cx),
                InnerProj::Empty => Poll::Ready(None),
            };
            if let Poll::Ready(Some(Ok(f))) = &res {
                if let Some(d) = f.data_ref() {
                    if let Some(t) = this.tracker.as_mut() {
                        t.update(d);
                    }
                    hook.on_data(d, || inner.is_end_stream());
                    return crate::boxed_result(res, || false);
                }
            }
            // Anything else goes through the hooks, as if they had polled it. (A hook that
            // stops watching in between, the frame hook once `Closing` begins, may not take
            // it: it then ends the stream with its final frame, and polls the body no more.)
            first = Some(res);
        }
        let mut scx = StreamCx {
            tracker: this.tracker,
            gate: this.gate.get(),
            task: cx,
        };
        let mut source = Source { first, inner };
        let res = hook.poll_frame(&mut source, &mut scx);
        crate::boxed_result(res, || hook.take_aborted())
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.hook.is_end_stream(|| self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.hook.size_hint(|| self.inner.size_hint())
    }
}

impl<B, H> fmt::Debug for HookBody<B, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookBody")
            .field("hooks", &std::any::type_name::<H>())
            .field("tracks_boundaries", &self.tracker.is_some())
            .finish_non_exhaustive()
    }
}
