//! [`FrameHook`]: the frame layer's logic for one stream: one final frame at an event
//! boundary once `Closing` begins (after the stream's share of the spread), then the end.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::config::FrameConfig;
use super::encoder::FrameKind;
use crate::controller::Phase;
use crate::hook::{take_once, Next, Polled, StreamCx, StreamHook};

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
    step: Step,
    run_to_completion: bool,
    /// The stream's slot in the drain spread (its jitter seed is derived from it).
    slot: u32,
    trailers: Option<Box<HeaderMap>>,
}

pin_project! {
    /// The frame layer's state of one stream that gets a final frame.
    pub(crate) struct Injecting {
        #[pin]
        signal: Option<WaitForCancellationFutureOwned>,
        // Boxed and created only for a spread drain.
        delay: Option<Pin<Box<Sleep>>>,
        inj: Injector,
    }
}

/// The frame layer's hook: for a stream that gets a final frame, its state (boxed: only
/// streams carry the signal and the timer, so other responses stay small); else nothing.
#[derive(Default)]
pub struct FrameHook(Option<Pin<Box<Injecting>>>);

impl FrameHook {
    /// The hook of a stream that gets a final frame.
    pub(crate) fn stream(cfg: Arc<FrameConfig>, run_to_completion: bool) -> Self {
        let signal = cfg.shared.closing_token().clone().cancelled_owned();
        Self(Some(Box::pin(Injecting {
            signal: Some(signal),
            delay: None,
            inj: Injector {
                cfg,
                step: Step::Watching,
                run_to_completion,
                slot: 0,
                trailers: None,
            },
        })))
    }
}

impl Injecting {
    /// Whether a forwarded frame needs nothing else: watching, and still serving.
    #[inline(always)]
    fn serving(&self) -> bool {
        self.inj.step == Step::Watching && self.inj.cfg.shared.phase() < Phase::Closing
    }

    /// The fast path's inner body is pending: registers for `Closing`; `true` if it began.
    #[inline]
    fn poll_closing(self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        self.project()
            .signal
            .as_pin_mut()
            .is_some_and(|s| s.poll(cx).is_ready())
    }
}

impl StreamHook for FrameHook {
    #[inline(always)]
    fn poll_frame<N: Next>(&mut self, next: &mut N, cx: &mut StreamCx<'_, '_>) -> Polled<N::Error> {
        let Some(state) = self.0.as_mut() else {
            return next.poll_next(cx);
        };
        // Fast path while serving (the rest is `poll_slow`, out of line): one atomic load
        // instead of polling the closing signal (a lock inside the cancellation token) per
        // frame. The signal is polled, and its waker registered, whenever the inner body is
        // pending, so an idle stream still wakes when `Closing` begins; a busy one sees the
        // phase change on its next frame (the phase is set before the signal fires).
        if state.serving() {
            // The result is inspected in place and returned as it came.
            let res = next.poll_next(cx);
            match &res {
                Poll::Ready(Some(_)) => return res,
                Poll::Ready(None) => {
                    state.as_mut().project().inj.step = Step::Done;
                    return res;
                }
                Poll::Pending => {
                    if !state.as_mut().poll_closing(cx.task()) {
                        return Poll::Pending;
                    }
                    // `Closing` began meanwhile: the slow path takes it from here.
                }
            }
        }
        poll_slow(next, state.as_mut(), cx)
    }

    #[inline]
    fn is_end_stream(&self, inner: impl FnOnce() -> bool) -> bool {
        match &self.0 {
            None => inner(),
            Some(s) => s.inj.step == Step::Done,
        }
    }

    fn size_hint(&self, inner: impl FnOnce() -> SizeHint) -> SizeHint {
        match &self.0 {
            None => inner(),
            Some(s) if matches!(s.inj.step, Step::Done | Step::Aborted) => SizeHint::with_exact(0),
            Some(_) => {
                let mut h = SizeHint::new();
                h.set_lower(inner().lower());
                h
            }
        }
    }

    #[inline(always)]
    fn passive(&self) -> bool {
        self.0.as_ref().is_none_or(|s| s.serving())
    }

    /// The body's tracker has the data: nothing to do.
    #[inline(always)]
    fn on_data(&mut self, _data: &Bytes, _inner_end: impl Fn() -> bool) {}

    #[inline]
    fn take_aborted(&mut self) -> bool {
        // Reported once; the body has ended.
        self.0.as_mut().is_some_and(|s| {
            take_once(
                &mut s.as_mut().project().inj.step,
                Step::Aborted,
                Step::Done,
            )
        })
    }
}

/// Everything but the serving fast path: the drain signals, the spread, the final frame and
/// its trailers.
#[inline(never)]
fn poll_slow<N: Next>(
    inner: &mut N,
    state: Pin<&mut Injecting>,
    cx: &mut StreamCx<'_, '_>,
) -> Polled<N::Error> {
    let state = state.project();
    let (mut signal, delay, inj) = (state.signal, state.delay, state.inj);
    let gate = cx.gate();
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
                if sig.poll(cx.task()).is_ready() {
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
                if d.as_mut().poll(cx.task()).is_ready() {
                    *delay = None;
                    inj.step = Step::Due;
                }
            }
        }

        if matches!(inj.step, Step::Due | Step::Forced) {
            if cx.at_boundary() {
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
                // An outer guard that sees the error knows it for this hook's abort.
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
        let res = ready!(inner.poll_next(cx));
        if res.is_none() {
            inj.step = Step::Done;
        }
        return Poll::Ready(res);
    }
}

impl fmt::Debug for FrameHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameHook")
            .field("step", &self.0.as_ref().map(|s| s.inj.step))
            .finish()
    }
}
