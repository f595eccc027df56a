//! [`GuardHook`]: the guard's logic for one response body: limits, heartbeats, error frames,
//! and the breaker's view of body errors.

use std::fmt;
use std::sync::Arc;
use std::task::{ready, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};

use super::config::Config;
use super::limits::{Limits, Named, Step};
use crate::frame::{FrameKind, GateRef};
use crate::hook::{take_once, Next, Polled, StreamCx, StreamHook};
use crate::route::RoutePath;

/// The guard's state of one stream that gets a final frame.
pub(super) struct Stream {
    cfg: Arc<Config>,
    id: u64,
    uri: RoutePath,
    step: Step,
    trailers: Option<Box<HeaderMap>>,
    errored: bool,
    lim: Option<Box<Limits>>,
}

/// The guard's hook: a stream's state (boxed: only streams carry it, so other responses stay
/// small), or for a plain response the breaker's watch on its errors.
#[derive(Default)]
pub struct GuardHook {
    // Boxed: only with a breaker on, and every response carries the field.
    watched: Option<Box<(Arc<Config>, RoutePath)>>,
    st: Option<Box<Stream>>,
    /// A stream without limits, still streaming (kept here, next to the box, so that the
    /// passive path does not look into it for every frame): this hook forwards, and adds a
    /// frame only if the body fails.
    quiet: bool,
}

impl GuardHook {
    /// The hook of a stream that gets a final frame.
    pub(super) fn stream(
        cfg: Arc<Config>,
        uri: RoutePath,
        lim: impl FnOnce(&Config, u64) -> Option<Box<Limits>>,
    ) -> Self {
        let (id, jitter) = cfg.next_stream();
        let lim = lim(&cfg, jitter);
        Self {
            watched: None,
            quiet: lim.is_none(),
            st: Some(Box::new(Stream {
                id,
                uri,
                step: Step::Streaming,
                trailers: None,
                errored: false,
                lim,
                cfg,
            })),
        }
    }

    /// The hook of a plain response whose errors count for the breaker.
    pub(super) fn watched(cfg: Arc<Config>, uri: RoutePath) -> Self {
        Self {
            watched: Some(Box::new((cfg, uri))),
            st: None,
            quiet: false,
        }
    }
}

/// Counts and logs a body error.
fn record_error(cfg: &Config, id: Option<u64>, uri: &RoutePath, e: &dyn fmt::Display) {
    cfg.frame.shared.metrics.stream_errors.increment(1);
    if let Some(b) = &cfg.breaker {
        b.failure();
    }
    tracing::warn!(
        guard.stream = id,
        path = uri.path(),
        error = %e,
        "response body failed"
    );
}

impl Stream {
    /// Counts and logs a body error, once.
    fn record_error(&mut self, e: &dyn fmt::Display) {
        if std::mem::replace(&mut self.errored, true) {
            return;
        }
        record_error(&self.cfg, Some(self.id), &self.uri, e);
    }

    /// Sends the final frame of `kind`: its data now (if any), its trailers next.
    fn emit(&mut self, kind: FrameKind) -> Option<Frame<Bytes>> {
        let (data, trailers) = self
            .cfg
            .frame
            .encode(kind, self.cfg.jitter_of(self.id))
            .into_parts();
        self.trailers = trailers.map(Box::new);
        self.step = Step::Trailers;
        data.map(Frame::data)
    }

    /// Bookkeeping for a data or trailers frame forwarded from the inner body.
    /// `gate`: also end on an inner hook's final frame (a stream with limits, which could
    /// otherwise add a heartbeat after it); the fast path passes none.
    #[inline(always)]
    fn forwarded(&mut self, frame: &Frame<Bytes>, inner_end: bool, gate: GateRef<'_>) {
        if let Some(l) = self.lim.as_mut() {
            l.forwarded(&self.cfg);
        }
        // The inner body is finishing on its own (trailers, end of stream, or its own final
        // frame went out): add nothing more.
        if frame.is_trailers() || inner_end || gate.is_claimed() {
            self.step = Step::Passthrough;
        }
    }

    /// The inner body ended (`None`) or failed while streaming: an error becomes the final
    /// error frame at a boundary, and is passed on mid-record (the response is aborted), or
    /// always when errors pass through.
    #[cold]
    fn inner_ended<E: fmt::Display>(
        &mut self,
        res: Option<Result<Frame<Bytes>, E>>,
        cx: &StreamCx<'_, '_>,
    ) -> Polled<E> {
        let gate = cx.gate();
        Poll::Ready(match res {
            // Not an end; the callers forward data frames themselves.
            Some(Ok(frame)) => Some(Ok(frame)),
            Some(Err(e)) if gate.is_claimed() => {
                // An inner hook ended mid-record at the deadline (its final frame is claimed,
                // so it sent nothing more): not a failure of the service.
                self.step = Step::Done;
                Some(Err(e))
            }
            Some(Err(e)) => {
                self.record_error(&e);
                if self.cfg.pass_errors {
                    self.step = Step::Passthrough;
                    Some(Err(e))
                } else if cx.at_boundary() && gate.claim() {
                    match self.emit(FrameKind::Error) {
                        Some(f) => Some(Ok(f)),
                        // A frame of trailers only (gRPC): they go out now, then the end.
                        None => {
                            self.step = Step::Done;
                            self.trailers.take().map(|t| Ok(Frame::trailers(*t)))
                        }
                    }
                } else {
                    // Mid-record: no whole error frame can go out. The error goes on, so the
                    // client sees a failure, not a clean end after half a record.
                    self.step = Step::Done;
                    Some(Err(e))
                }
            }
            None => {
                self.step = Step::Done;
                None
            }
        })
    }
}

impl GuardHook {
    #[inline(always)]
    fn poll_hook<N: Next>(&mut self, next: &mut N, cx: &mut StreamCx<'_, '_>) -> Polled<N::Error> {
        let Some(st) = self.st.as_deref_mut() else {
            let res = next.poll_next(cx);
            if let Poll::Ready(Some(Err(e))) = &res {
                // A plain response's error counts for the breaker (once).
                if let Some(w) = self.watched.take() {
                    let (cfg, uri) = &*w;
                    record_error(cfg, None, uri, e);
                }
            }
            return res;
        };
        // Fast path of a stream without limits (no timers, no heartbeat), small enough to
        // inline; everything else is `poll_stream`, out of line.
        if st.step == Step::Streaming && st.lim.is_none() {
            let res = next.poll_next(cx);
            match &res {
                Poll::Ready(Some(Ok(frame))) => {
                    // No look at the shared gate here: without limits this hook adds a final
                    // frame only for an error, and that claims the gate first.
                    st.forwarded(frame, next.is_end_stream(), GateRef::default());
                    return res;
                }
                Poll::Pending => return res,
                Poll::Ready(_) => {}
            }
            return st.inner_ended(ready!(res), cx);
        }
        poll_stream(next, st, cx)
    }
}

impl StreamHook for GuardHook {
    #[inline(always)]
    fn poll_frame<N: Next>(&mut self, next: &mut N, cx: &mut StreamCx<'_, '_>) -> Polled<N::Error> {
        let res = self.poll_hook(next, cx);
        self.quiet =
            (self.st.as_deref()).is_some_and(|s| s.step == Step::Streaming && s.lim.is_none());
        res
    }

    #[inline]
    fn is_end_stream(&self, inner: impl FnOnce() -> bool) -> bool {
        if self.quiet {
            return false;
        }
        match self.st.as_deref() {
            None => inner(),
            Some(s) => match s.step {
                Step::Done => true,
                Step::Passthrough => inner(),
                _ => false,
            },
        }
    }

    fn size_hint(&self, inner: impl FnOnce() -> SizeHint) -> SizeHint {
        match self.st.as_deref() {
            None => inner(),
            Some(s) => match s.step {
                Step::Done => SizeHint::with_exact(0),
                Step::Passthrough => inner(),
                _ => {
                    let mut h = SizeHint::new();
                    h.set_lower(inner().lower());
                    h
                }
            },
        }
    }

    /// A plain response, or a stream without limits that is still streaming: this hook adds
    /// a frame only when the body fails.
    #[inline(always)]
    fn passive(&self) -> bool {
        self.quiet || self.st.is_none()
    }

    #[inline(always)]
    fn on_data(&mut self, _data: &Bytes, inner_end: impl Fn() -> bool) {
        // The inner body is finishing on its own: add nothing more.
        if self.quiet && inner_end() {
            if let Some(st) = self.st.as_deref_mut() {
                st.step = Step::Passthrough;
            }
            self.quiet = false;
        }
    }

    #[inline]
    fn take_aborted(&mut self) -> bool {
        // Reported once; the body has ended.
        (self.st.as_deref_mut()).is_some_and(|s| take_once(&mut s.step, Step::Aborted, Step::Done))
    }
}

/// Everything but the fast path: timers, heartbeats, revalidation and final frames.
#[inline(never)]
fn poll_stream<N: Next>(
    inner: &mut N,
    st: &mut Stream,
    cx: &mut StreamCx<'_, '_>,
) -> Polled<N::Error> {
    let gate = cx.gate();
    loop {
        match st.step {
            Step::Trailers => {
                st.step = Step::Done;
                if let Some(t) = st.trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(*t))));
                }
                continue;
            }
            Step::Done | Step::Aborted => return Poll::Ready(None),
            Step::Passthrough => {
                let res = ready!(inner.poll_next(cx));
                match &res {
                    Some(Err(e)) => st.record_error(e),
                    None => st.step = Step::Done,
                    Some(Ok(_)) => {}
                }
                return Poll::Ready(res);
            }
            Step::Streaming | Step::Due(_) => {}
        }

        if let Some(l) = st.lim.as_mut() {
            let who = Named {
                id: st.id,
                uri: &st.uri,
            };
            l.poll(&mut st.step, &st.cfg, &who, cx.task());
        }

        match st.step {
            Step::Due(kind) => {
                if cx.at_boundary() {
                    if !gate.claim() {
                        // An inner hook sent its final frame first.
                        st.step = Step::Passthrough;
                        continue;
                    }
                    match st.emit(kind) {
                        Some(f) => return Poll::Ready(Some(Ok(f))),
                        None => continue,
                    }
                }
                if st.lim.as_ref().is_some_and(|l| l.cut) {
                    tracing::debug!(
                        guard.stream = st.id,
                        path = st.uri.path(),
                        "no event boundary within the grace period: ending without a final frame"
                    );
                    st.step = Step::Aborted;
                    return Poll::Ready(None);
                }
            }
            Step::Streaming if cx.at_boundary() => {
                if let Some(l) = st.lim.as_mut() {
                    if let (true, Some(hb)) = (l.heartbeat_due, l.heartbeat) {
                        l.heartbeat_sent();
                        // A static `Bytes`: allocates nothing.
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(hb)))));
                    }
                }
            }
            _ => {}
        }

        let res = inner.poll_next(cx);
        // A forwarded frame is inspected in place and returned as it came (no copy).
        if let Poll::Ready(Some(Ok(frame))) = &res {
            st.forwarded(frame, inner.is_end_stream(), gate);
            return res;
        }
        return st.inner_ended(ready!(res), cx);
    }
}

impl fmt::Debug for GuardHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardHook")
            .field("step", &self.st.as_ref().map(|s| s.step))
            .finish_non_exhaustive()
    }
}
