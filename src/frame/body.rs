use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::boundary::Tracker;
use super::encoder::{FinalFrame, FrameContext, FrameKind};
use crate::controller::{Phase, Shared};

/// What a [`FrameBody`] needs from its layer: the controller's state and the encoder.
pub(crate) struct FrameConfig {
    pub(crate) shared: Arc<Shared>,
    pub(crate) encoder: Arc<dyn FinalFrame>,
}

impl FrameConfig {
    /// Encodes a final frame of `kind` for one stream.
    pub(crate) fn encode(&self, kind: FrameKind, jitter_seed: u64) -> super::Final {
        let shared = &self.shared;
        let reason = shared.reason().map(|r| r.as_str());
        let ctx = FrameContext {
            kind,
            reason,
            message: shared.config.message(),
            reconnect_delay: shared.config.reconnect_delay,
            retry: Duration::from_millis(shared.jittered_retry_ms(jitter_seed)),
            timestamp: SystemTime::now(),
        };
        self.encoder.encode(&ctx)
    }
}

/// One stream's "final frame already sent" flag, shared by the [`FrameBody`] and any guard body
/// wrapped around it (`GuardedBody`), so a stream that is both expiring and being drained gets
/// exactly one final frame: whichever body claims the gate first sends its frame, the other
/// sends none.
///
/// The frame layer creates it for each injecting response and puts a clone in the response's
/// extensions, where an outer guard layer picks it up. A
/// [`DrainBody`](crate::stack::DrainBody) keeps the flag in its stream's one allocation
/// instead, and takes it out of the extensions of the responses its nested layers answer;
/// either way the bodies' logic reaches the flag through a [`GateRef`].
#[derive(Clone, Debug, Default)]
pub(crate) struct FinalGate(Arc<AtomicBool>);

impl FinalGate {
    pub(crate) fn new() -> Self {
        Self::default()
    }
}

/// A stream's final-frame flag, wherever its owner keeps it (or none: the stream's final
/// frame is not shared with another body's logic).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GateRef<'a>(Option<&'a AtomicBool>);

impl<'a> GateRef<'a> {
    /// A flag kept by the caller.
    #[inline]
    pub(crate) fn local(flag: &'a AtomicBool) -> Self {
        Self(Some(flag))
    }

    /// The gate of `gate`, if any.
    #[inline]
    pub(crate) fn of(gate: &'a Option<FinalGate>) -> Self {
        Self(gate.as_ref().map(|g| &*g.0))
    }

    /// Claims the right to send the final frame: `true` for exactly one caller (always, with
    /// no flag to share).
    #[inline]
    pub(crate) fn claim(self) -> bool {
        self.0.is_none_or(|f| !f.swap(true, Ordering::AcqRel))
    }

    /// Whether a final frame has been claimed (never, with no flag).
    #[inline]
    pub(crate) fn is_claimed(self) -> bool {
        self.0.is_some_and(|f| f.load(Ordering::Acquire))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Forwarding the inner body; watching for `Closing`.
    Watching,
    /// `Closing` began; this stream's share of the spread has not passed yet (or it opted out).
    Scheduled,
    /// The frame is due at the next event boundary.
    Due,
    /// The grace deadline passed: emit the forced frame at a boundary, or end now.
    Forced,
    /// The final data went out; trailers follow.
    Trailers,
    /// Ended.
    Done,
    /// Ended in the middle of a record at the deadline: the body reports [`Aborted`](crate::Aborted).
    Aborted,
}

struct Injector {
    cfg: Arc<FrameConfig>,
    tracker: Tracker,
    step: Step,
    run_to_completion: bool,
    /// The stream's slot in the drain spread (its jitter seed is derived from it).
    slot: u32,
    trailers: Option<Box<HeaderMap>>,
}

pin_project! {
    /// The response body of [`Frame`](super::Frame): the inner body, plus one final frame
    /// injected at an event boundary once the controller is `Closing` (after this stream's
    /// share of the drain spread), after which the body ends.
    ///
    /// Responses the encoder does not apply to pass through untouched. While a frame may still
    /// be added, `size_hint` keeps the inner lower bound but has no upper bound, and
    /// `is_end_stream` is `false`.
    pub struct FrameBody<B> {
        #[pin]
        inner: B,
        // Boxed: only injecting (streaming) responses carry the signal and the timer, so every
        // other response stays as small as its inner body, which matters because responses are
        // moved through every layer.
        inj: Option<Pin<Box<Injecting>>>,
        // Shared with an outer guard's body (see `FinalGate`); injecting bodies only.
        gate: Option<FinalGate>,
    }
}

pin_project! {
    /// The frame layer's state of one stream that gets a final frame: boxed by an injecting
    /// [`FrameBody`], or part of the fused [`DrainBody`](crate::stack::DrainBody)'s one
    /// allocation per stream.
    pub(crate) struct Injecting {
        #[pin]
        signal: Option<WaitForCancellationFutureOwned>,
        // Boxed and created only for a spread drain.
        delay: Option<Pin<Box<Sleep>>>,
        inj: Injector,
    }
}

impl<B> FrameBody<B> {
    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            inner,
            inj: None,
            gate: None,
        }
    }

    /// The inner body and, for an injecting body, what its state was made of (configuration,
    /// run-to-completion), for [`DrainBody`](crate::stack::DrainBody), which makes that state
    /// anew inside its stream's one allocation. Only for a body nothing has polled yet.
    pub(crate) fn into_parts(self) -> (B, Option<(Arc<FrameConfig>, bool)>) {
        let made_of = self.inj.map(|i| {
            debug_assert!(i.inj.step == Step::Watching, "an unpolled body");
            (i.inj.cfg.clone(), i.inj.run_to_completion)
        });
        (self.inner, made_of)
    }

    /// The final-frame gate of an injecting body, to share with a guard around it.
    #[inline]
    pub(crate) fn gate(&self) -> Option<FinalGate> {
        self.gate.clone()
    }

    /// An injecting body, its final frame shared through `gate`.
    pub(crate) fn inject(
        inner: B,
        cfg: Arc<FrameConfig>,
        run_to_completion: bool,
        gate: FinalGate,
    ) -> Self {
        Self {
            inner,
            inj: Some(Box::pin(Injecting::new(cfg, run_to_completion))),
            gate: Some(gate),
        }
    }
}

impl Injecting {
    /// The state of a stream that gets a final frame, for whoever holds it: a [`FrameBody`]
    /// (boxed) or [`DrainBody`](crate::stack::DrainBody) (inside its stream's one
    /// allocation).
    pub(crate) fn new(cfg: Arc<FrameConfig>, run_to_completion: bool) -> Self {
        let signal = cfg.shared.closing_token().clone().cancelled_owned();
        let tracker = Tracker::new(cfg.encoder.boundary());
        Self {
            signal: Some(signal),
            delay: None,
            inj: Injector {
                cfg,
                tracker,
                step: Step::Watching,
                run_to_completion,
                slot: 0,
                trailers: None,
            },
        }
    }
}

impl<B: Default> Default for FrameBody<B> {
    fn default() -> Self {
        Self::passthrough(B::default())
    }
}

impl<B> Body for FrameBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<crate::BoxError>,
{
    type Data = Bytes;
    type Error = crate::BoxError;

    #[inline(always)]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::BoxError>>> {
        let this = self.project();
        let res = poll_parts(
            this.inner,
            this.inj.as_mut().map(Pin::as_mut),
            GateRef::of(this.gate),
            cx,
        );
        let inj = this.inj;
        crate::boxed_result(res, || {
            inj.as_mut().is_some_and(|i| i.as_mut().take_aborted())
        })
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        end_of(&self.inner, self.inj.as_deref())
    }

    fn size_hint(&self) -> SizeHint {
        hint_of(&self.inner, self.inj.as_deref())
    }
}

/// [`FrameBody::poll_frame`] over an inner body and an injecting state held apart, so that
/// [`DrainBody`](crate::stack::DrainBody) can run it without owning a `FrameBody`.
#[inline(always)]
pub(crate) fn poll_parts<B>(
    mut inner: Pin<&mut B>,
    state: Option<Pin<&mut Injecting>>,
    gate: GateRef<'_>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>>
where
    B: Body<Data = Bytes>,
{
    let Some(mut state) = state else {
        return inner.poll_frame(cx);
    };
    // Fast path while serving, small enough to inline into the layer around it (the rest
    // is `poll_slow`, out of line): one atomic load instead of polling the closing signal
    // (a lock inside the cancellation token) per frame. The signal is polled, and its
    // waker registered, whenever the inner body is pending, so an idle stream still wakes
    // when `Closing` begins; a busy one sees the phase change on its next frame (the
    // phase is set before the signal fires).
    if state.serving() {
        // The result is inspected in place and returned as it came: no copy per layer.
        let res = inner.as_mut().poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    state.as_mut().forwarded(d);
                }
                return res;
            }
            Poll::Ready(Some(Err(_))) => return res,
            Poll::Ready(None) => {
                state.as_mut().ended();
                return res;
            }
            Poll::Pending => {
                if !state.as_mut().poll_closing(cx) {
                    return Poll::Pending;
                }
                // `Closing` began meanwhile: the slow path takes it from here.
            }
        }
    }
    poll_slow(inner, state, gate, cx)
}

/// [`FrameBody::is_end_stream`] over parts held apart.
#[inline]
pub(crate) fn end_of<B: Body>(inner: &B, state: Option<&Injecting>) -> bool {
    match state {
        None => inner.is_end_stream(),
        Some(s) => s.inj.step == Step::Done,
    }
}

impl Injecting {
    /// Whether the stream ended in the middle of a record at the deadline (the body then
    /// reports [`Aborted`](crate::Aborted) instead of a clean end, once).
    #[inline]
    pub(crate) fn take_aborted(self: Pin<&mut Self>) -> bool {
        let inj = self.project().inj;
        let aborted = inj.step == Step::Aborted;
        if aborted {
            // Reported once; the body has ended.
            inj.step = Step::Done;
        }
        aborted
    }
}

/// [`FrameBody::size_hint`] over parts held apart.
pub(crate) fn hint_of<B: Body>(inner: &B, state: Option<&Injecting>) -> SizeHint {
    match state {
        None => inner.size_hint(),
        Some(s) if matches!(s.inj.step, Step::Done | Step::Aborted) => SizeHint::with_exact(0),
        Some(_) => {
            let mut h = SizeHint::new();
            h.set_lower(inner.size_hint().lower());
            h
        }
    }
}

/// A [`FrameBody`] taken apart: its inner body pinned where its owner keeps it, its state
/// borrowed. What [`DrainBody`](crate::stack::DrainBody) hands to the guard's logic as the
/// guard's inner body.
pub(crate) struct FrameView<'a, B> {
    pub(crate) inner: Pin<&'a mut B>,
    pub(crate) state: Option<Pin<&'a mut Injecting>>,
    pub(crate) gate: GateRef<'a>,
}

impl<B> Body for FrameView<'_, B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    #[inline(always)]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        poll_parts(
            this.inner.as_mut(),
            this.state.as_mut().map(Pin::as_mut),
            this.gate,
            cx,
        )
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        end_of(&*self.inner, self.state.as_deref())
    }

    fn size_hint(&self) -> SizeHint {
        hint_of(&*self.inner, self.state.as_deref())
    }
}

impl Injecting {
    /// Whether a forwarded frame needs nothing else than a tracker update (the fast paths of
    /// [`FrameBody`] and of [`DrainBody`](crate::stack::DrainBody)): watching, and still
    /// serving.
    #[inline(always)]
    pub(crate) fn serving(&self) -> bool {
        self.inj.step == Step::Watching && self.inj.cfg.shared.phase() < Phase::Closing
    }

    /// Records a data frame forwarded by a fast path.
    #[inline(always)]
    pub(crate) fn forwarded(self: Pin<&mut Self>, data: &Bytes) {
        self.project().inj.tracker.update(data);
    }

    /// A fast path's inner body is pending: registers for `Closing`; `true` if it began (the
    /// full logic takes over).
    #[inline]
    pub(crate) fn poll_closing(self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        let proj = self.project();
        proj.signal
            .as_pin_mut()
            .is_some_and(|s| s.poll(cx).is_ready())
    }

    /// A fast path's inner body ended.
    #[inline]
    pub(crate) fn ended(self: Pin<&mut Self>) {
        self.project().inj.step = Step::Done;
    }

    /// The boundary tracker (the fused fast path keeps only this one up to date).
    pub(crate) fn tracker(&self) -> &Tracker {
        &self.inj.tracker
    }
}

/// Everything but the serving fast path of [`FrameBody::poll_frame`]: the drain signals, the
/// spread, the final frame and its trailers.
#[inline(never)]
fn poll_slow<B>(
    mut inner: Pin<&mut B>,
    state: Pin<&mut Injecting>,
    gate: GateRef<'_>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>>
where
    B: Body<Data = Bytes>,
{
    let state = state.project();
    let (mut signal, delay, inj) = (state.signal, state.delay, state.inj);
    loop {
        match inj.step {
            Step::Done | Step::Aborted => return Poll::Ready(None),
            Step::Trailers => {
                inj.step = Step::Done;
                if let Some(t) = inj.trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(*t))));
                }
                continue;
            }
            Step::Watching | Step::Scheduled | Step::Due | Step::Forced => {}
        }

        // Drain signals: first `Closing`, then (same slot, re-armed) the grace deadline.
        if inj.step != Step::Forced {
            if let Some(sig) = signal.as_mut().as_pin_mut() {
                if sig.poll(cx).is_ready() {
                    if inj.step == Step::Watching {
                        let shared = &inj.cfg.shared;
                        // The grace deadline is watched only if this stream has to wait
                        // (spread, run-to-completion, mid-event): see below.
                        signal.set(None);
                        let (d, slot) = shared.take_slot();
                        inj.slot = slot;
                        inj.step = if inj.run_to_completion {
                            Step::Scheduled
                        } else if d.is_zero() {
                            Step::Due
                        } else {
                            *delay = Some(Box::pin(tokio::time::sleep(d)));
                            Step::Scheduled
                        };
                        continue;
                    }
                    inj.step = Step::Forced;
                    signal.set(None);
                    *delay = None;
                }
            }
        }
        if inj.step == Step::Scheduled {
            if let Some(d) = delay.as_mut() {
                if d.as_mut().poll(cx).is_ready() {
                    *delay = None;
                    inj.step = Step::Due;
                }
            }
        }

        if matches!(inj.step, Step::Due | Step::Forced) {
            if inj.tracker.at_boundary() {
                if !gate.claim() {
                    // An outer guard already sent this stream's final frame (it then stops
                    // polling us, so this is defensive): end without a second one.
                    inj.step = Step::Done;
                    return Poll::Ready(None);
                }
                let kind = if inj.step == Step::Forced {
                    FrameKind::ForcedShutdown
                } else {
                    FrameKind::Shutdown
                };
                let (data, trailers) = inj
                    .cfg
                    .encode(kind, inj.cfg.shared.slot_jitter(inj.slot))
                    .into_parts();
                inj.cfg.shared.count_notified();
                inj.trailers = trailers.map(Box::new);
                inj.step = Step::Trailers;
                if let Some(d) = data {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                continue;
            }
            if inj.step == Step::Forced {
                // Mid-event at the deadline: no whole frame can go out. End with an error, so
                // the client sees a failure, not a clean end after half a record.
                inj.step = Step::Aborted;
                // An outer guard that sees the error knows it for this layer's abort.
                let _ = gate.claim();
                return Poll::Ready(None);
            }
        }

        if signal.is_none() && matches!(inj.step, Step::Scheduled | Step::Due) {
            // About to wait: watch for the grace deadline now (registering this task's
            // waker on the next turn of the loop). A stream at a boundary when `Closing`
            // begins gets its frame above without ever touching the deadline's signal.
            signal.set(Some(
                inj.cfg.shared.forced_token().clone().cancelled_owned(),
            ));
            continue;
        }
        let res = ready!(inner.as_mut().poll_frame(cx));
        match &res {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    inj.tracker.update(d);
                }
            }
            Some(Err(_)) => {}
            None => inj.step = Step::Done,
        }
        return Poll::Ready(res);
    }
}

impl<B> std::fmt::Debug for FrameBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameBody")
            .field("injecting", &self.inj.is_some())
            .field("step", &self.inj.as_ref().map(|s| s.inj.step))
            .finish_non_exhaustive()
    }
}
