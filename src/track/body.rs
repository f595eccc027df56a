use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::guard::StreamGuard;

pin_project! {
    /// The response body of [`Track`](super::Track): the inner body, unchanged, plus the
    /// stream's registration, released when the body ends or is dropped.
    ///
    /// `size_hint` and `is_end_stream` are the inner body's.
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        guard: Option<StreamGuard>,
    }
}

impl<B> TrackedBody<B> {
    pub(crate) fn new(inner: B, guard: Option<StreamGuard>) -> Self {
        Self { inner, guard }
    }
}

impl<B> TrackedBody<B> {
    /// The inner body and the registration, for [`DrainBody`](crate::stack::DrainBody).
    pub(crate) fn into_parts(self) -> (B, Option<StreamGuard>) {
        (self.inner, self.guard)
    }
}

/// [`TrackedBody::poll_frame`] over parts held apart, so that
/// [`DrainBody`](crate::stack::DrainBody) can run it without owning a `TrackedBody`.
#[inline(always)]
pub(crate) fn poll_parts<B: Body>(
    mut inner: Pin<&mut B>,
    guard: &mut Option<StreamGuard>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
    // Inspected in place and returned as it came: no copy of the frame per layer.
    let res = inner.as_mut().poll_frame(cx);
    if let Poll::Ready(r) = &res {
        account(guard, r, || inner.is_end_stream());
    }
    res
}

/// The registration's bookkeeping for one result of the body: frame and byte counts, and the
/// release as soon as the stream is over. `end` tells whether the body is at its end now.
#[inline(always)]
pub(crate) fn account<D: Buf, E>(
    guard: &mut Option<StreamGuard>,
    r: &Option<Result<Frame<D>, E>>,
    end: impl FnOnce() -> bool,
) {
    if let Some(g) = guard.as_mut() {
        match r {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    g.frames += 1;
                    g.bytes += d.remaining() as u64;
                }
            }
            Some(Err(_)) => g.errored = true,
            None => {}
        }
    }
    // Release as soon as the stream is over: some consumers stop polling once
    // `is_end_stream` is true and keep the body around for a while.
    if r.is_none() || matches!(r, Some(Err(_))) || end() {
        guard.take();
    }
}

impl<B: Default> Default for TrackedBody<B> {
    fn default() -> Self {
        Self::new(B::default(), None)
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        poll_parts(this.inner, this.guard, cx)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> std::fmt::Debug for TrackedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedBody")
            .field("tracked", &self.guard.is_some())
            .finish_non_exhaustive()
    }
}
