//! [`StreamHook`]: one concern's logic for one response body, and how hooks compose.

use std::fmt;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::frame::{GateRef, Tracker};

/// A result of a body, as hooks pass it on.
pub(crate) type Polled<E> = Poll<Option<Result<Frame<Bytes>, E>>>;

/// What the hooks of one body share while it is polled: its one event-boundary tracker, its
/// final-frame gate, and the task's context.
#[derive(Debug)]
pub struct StreamCx<'a, 'b> {
    pub(super) tracker: &'a mut Option<Tracker>,
    pub(super) gate: GateRef<'a>,
    pub(super) task: &'a mut Context<'b>,
}

impl<'a, 'b> StreamCx<'a, 'b> {
    /// The task's context, to poll futures and timers with.
    #[inline(always)]
    pub(crate) fn task(&mut self) -> &mut Context<'b> {
        self.task
    }

    /// Whether everything forwarded so far ends on an event boundary (always, for a body
    /// that tracks none).
    #[inline]
    pub(crate) fn at_boundary(&self) -> bool {
        self.tracker.as_ref().is_none_or(|t| t.at_boundary())
    }

    /// The stream's final-frame gate: whoever claims it sends the stream's one final frame.
    #[inline]
    pub(crate) fn gate(&self) -> GateRef<'a> {
        self.gate
    }
}

/// What a hook polls: the body, or the hooks inside it around the body.
pub trait Next {
    /// The body's error.
    type Error: fmt::Display;

    /// The next result, with the body's shared state.
    fn poll_next(&mut self, cx: &mut StreamCx<'_, '_>) -> Polled<Self::Error>;

    /// Whether the body has ended.
    fn is_end_stream(&self) -> bool;

    /// The body's size hint.
    fn size_hint(&self) -> SizeHint;
}

/// Moves `step` from `from` to `to`; whether it was at `from` (a state reported once, such as
/// a hook's "ended mid-record").
#[inline]
pub(crate) fn take_once<S: PartialEq>(step: &mut S, from: S, to: S) -> bool {
    let hit = *step == from;
    if hit {
        *step = to;
    }
    hit
}

/// One concern's per-stream logic, run by a [`HookBody`](super::HookBody) around what it
/// polls (`inner`: the body itself, or the hooks inside this one around it).
///
/// A hook sees every result of `inner` on its way out and may add frames of its own (only
/// at an event boundary, [`StreamCx::at_boundary`]), end the body, or report that it ended
/// mid-record ([`take_aborted`](Self::take_aborted)). Hooks compose as pairs, `(outer,
/// inner)`; `()` adds nothing. A hook's fast path is `#[inline]`, so a pair of hooks
/// compiles into one loop over the inner body.
pub trait StreamHook: Default + Send + Sync + 'static {
    /// The next result of the body, as this hook passes it on.
    fn poll_frame<N: Next>(&mut self, next: &mut N, cx: &mut StreamCx<'_, '_>) -> Polled<N::Error>;

    /// Whether the body has ended, `inner` telling the inner one's.
    fn is_end_stream(&self, inner: impl FnOnce() -> bool) -> bool;

    /// The body's size hint, `inner` giving the inner one's.
    fn size_hint(&self, inner: impl FnOnce() -> SizeHint) -> SizeHint;

    /// Whether this hook ended the body in the middle of a record (reported once).
    fn take_aborted(&mut self) -> bool;

    /// Whether, for now, this hook only watches the frames go by: no timer armed, no frame of
    /// its own due, nothing to register for while the body waits. While every hook of a body
    /// is passive, the body forwards data frames with [`on_data`](Self::on_data) alone, and
    /// anything else (trailers, an error, the end, a pending body) through
    /// [`poll_frame`](Self::poll_frame).
    fn passive(&self) -> bool;

    /// A data frame forwarded while the hook is [`passive`](Self::passive); `inner_end` tells
    /// whether what this hook wraps has ended.
    fn on_data(&mut self, data: &Bytes, inner_end: impl Fn() -> bool);
}

impl StreamHook for () {
    #[inline(always)]
    fn poll_frame<N: Next>(&mut self, next: &mut N, cx: &mut StreamCx<'_, '_>) -> Polled<N::Error> {
        next.poll_next(cx)
    }

    #[inline]
    fn is_end_stream(&self, inner: impl FnOnce() -> bool) -> bool {
        inner()
    }

    #[inline]
    fn size_hint(&self, inner: impl FnOnce() -> SizeHint) -> SizeHint {
        inner()
    }

    #[inline]
    fn take_aborted(&mut self) -> bool {
        false
    }

    #[inline]
    fn passive(&self) -> bool {
        true
    }

    #[inline]
    fn on_data(&mut self, _data: &Bytes, _inner_end: impl Fn() -> bool) {}
}

/// `inner` seen through `hook`: what the outer hook of a pair polls.
struct Chain<'a, H, N> {
    hook: &'a mut H,
    next: &'a mut N,
}

impl<H: StreamHook, N: Next> Next for Chain<'_, H, N> {
    type Error = N::Error;

    #[inline(always)]
    fn poll_next(&mut self, cx: &mut StreamCx<'_, '_>) -> Polled<N::Error> {
        self.hook.poll_frame(self.next, cx)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.hook.is_end_stream(|| self.next.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.hook.size_hint(|| self.next.size_hint())
    }
}

/// `(outer, inner)`: `inner` runs around the body, `outer` around both, as two layers
/// nest.
impl<A: StreamHook, Z: StreamHook> StreamHook for (A, Z) {
    #[inline(always)]
    fn poll_frame<N: Next>(&mut self, next: &mut N, cx: &mut StreamCx<'_, '_>) -> Polled<N::Error> {
        let (outer, hook) = self;
        outer.poll_frame(&mut Chain { hook, next }, cx)
    }

    #[inline]
    fn is_end_stream(&self, inner: impl FnOnce() -> bool) -> bool {
        self.0.is_end_stream(|| self.1.is_end_stream(inner))
    }

    fn size_hint(&self, inner: impl FnOnce() -> SizeHint) -> SizeHint {
        self.0.size_hint(|| self.1.size_hint(inner))
    }

    #[inline]
    fn take_aborted(&mut self) -> bool {
        // Both report (either may have ended the body mid-record).
        let outer = self.0.take_aborted();
        self.1.take_aborted() || outer
    }

    #[inline(always)]
    fn passive(&self) -> bool {
        self.0.passive() && self.1.passive()
    }

    #[inline(always)]
    fn on_data(&mut self, data: &Bytes, inner_end: impl Fn() -> bool) {
        let (outer, inner) = self;
        inner.on_data(data, &inner_end);
        outer.on_data(data, || inner.is_end_stream(&inner_end));
    }
}
