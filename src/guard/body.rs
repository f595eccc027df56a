use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::config::{CheckFn, CheckFuture, Config};
use super::future::CallState;
use crate::frame::{FinalGate, FrameKind, GateRef, Tracker};
use crate::route::RoutePath;

/// How long a stream whose limit was reached mid-event may take to reach the event's end
/// before it is ended without a final frame (clients discard an incomplete event).
pub(crate) const MID_EVENT_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Forwarding the inner body; timers armed.
    Streaming,
    /// A limit was reached: the final frame of this kind goes out at the next boundary.
    Due(FrameKind),
    /// The final data went out; trailers (if any) follow, then the end.
    Trailers,
    /// The inner body is ending by itself, or already sent its own final frame: forward the
    /// rest, add nothing.
    Passthrough,
    /// Ended.
    Done,
    /// Ended in the middle of a record (a limit with no boundary in time): the body reports
    /// [`Aborted`](crate::Aborted).
    Aborted,
}

/// A running revalidation: the request's parts, the check, and the check in flight.
struct Reval {
    parts: Parts,
    check: CheckFn,
    every: Duration,
    next_at: Option<Instant>,
    // The boxed check future is `Send` but not `Sync`; a `Mutex` only reached through
    // `get_mut` (never locked) keeps the body `Sync` at no cost.
    running: Mutex<Option<CheckFuture>>,
}

/// The guard's state of one stream that gets a final frame: boxed by a [`GuardedBody`], or
/// part of the fused [`DrainBody`](crate::stack::DrainBody)'s one allocation per stream.
pub(crate) struct Stream {
    cfg: Arc<Config>,
    id: u64,
    uri: RoutePath,
    step: Step,
    tracker: Tracker,
    trailers: Option<Box<HeaderMap>>,
    errored: bool,
    /// Boxed, and only created when a limit is configured (lifetime, idle, heartbeat,
    /// revalidation): without one, a stream needs no clock and no timer, and is smaller.
    lim: Option<Box<Limits>>,
}

/// The timers and checks of a stream with limits.
struct Limits {
    /// Created on first use: a `Sleep` is large and shared by all the stream's deadlines.
    timer: Option<Pin<Box<Sleep>>>,
    lifetime_at: Option<Instant>,
    last_inner: Instant,
    last_output: Instant,
    heartbeat: Option<&'static [u8]>,
    heartbeat_due: bool,
    reval: Option<Box<Reval>>,
    armed: bool,
    /// A deadline moved earlier than the armed one could cover (a heartbeat went out while
    /// the timer was parked): re-arm on the next poll.
    rearm: bool,
    cut_at: Option<Instant>,
    cut: bool,
}

pin_project! {
    /// The response body of [`Guard`](super::Guard).
    ///
    /// For streaming responses of the configured protocol it enforces the maximum lifetime and
    /// the idle limit, injects heartbeats, runs revalidation checks, and turns a mid-stream
    /// error into the final error frame; each final frame or heartbeat goes in only at an event
    /// boundary. Every timer of a stream shares one pinned `Sleep`, moved with `Sleep::reset`
    /// only when it fires (a forwarded frame just records the time); nothing is allocated per
    /// forwarded frame. Other responses pass through (errors still count for the breaker).
    ///
    /// While a frame may still be added, `size_hint` keeps the inner lower bound but has no
    /// upper bound, and `is_end_stream` is `false`.
    pub struct GuardedBody<B> {
        #[pin]
        inner: Option<B>,
        watched: Watched,
        // Boxed: only streaming responses carry the per-stream state, so every other
        // response stays small (responses are moved through every layer).
        st: Option<Box<Stream>>,
        // Shared with the inner frame layer's body (see `FinalGate`); streams only.
        gate: Option<FinalGate>,
    }
}

impl<B> Default for GuardedBody<B> {
    /// An empty body (what the guard's own `503`/`504` answers carry).
    fn default() -> Self {
        Self::empty()
    }
}

impl<B> GuardedBody<B> {
    pub(crate) fn empty() -> Self {
        Self {
            inner: None,
            watched: None,
            st: None,
            gate: None,
        }
    }

    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            inner: Some(inner),
            watched: None,
            st: None,
            gate: None,
        }
    }

    /// Forwards `inner` unchanged; an error counts for the breaker.
    pub(crate) fn watched(inner: B, cfg: Arc<Config>, uri: RoutePath) -> Self {
        Self {
            inner: Some(inner),
            watched: Some((cfg, uri)),
            st: None,
            gate: None,
        }
    }

    /// A stream's body, its final frame shared with the inner frame layer's through `gate`.
    pub(crate) fn stream(inner: B, st: Stream, gate: Option<FinalGate>) -> Self {
        Self {
            inner: Some(inner),
            watched: None,
            st: Some(Box::new(st)),
            gate,
        }
    }
}

impl Stream {
    /// The state of a stream the guard gives a final frame, for whoever holds it.
    pub(crate) fn new(call: CallState) -> Self {
        let cfg = call.cfg;
        let (id, jitter) = cfg.next_stream();
        let lim = (cfg.max_lifetime.is_some()
            || cfg.idle_timeout.is_some()
            || cfg.heartbeat.is_some()
            || cfg.revalidate.is_some())
        .then(|| Limits::new(&cfg, call.started, call.parts, jitter));
        Self {
            tracker: Tracker::new(cfg.frame.encoder.boundary()),
            id,
            uri: call.uri,
            step: Step::Streaming,
            trailers: None,
            errored: false,
            lim,
            cfg,
        }
    }
}

impl Limits {
    fn new(
        cfg: &Config,
        started: Option<Instant>,
        parts: Option<Box<Parts>>,
        jitter: u64,
    ) -> Box<Self> {
        let now = Instant::now();
        let started = started.unwrap_or(now);
        // Two independent fractions in [0, 1) from one mixed value.
        let u1 = (jitter >> 11) as f64 / (1u64 << 53) as f64;
        let u2 = (crate::controller::splitmix64(jitter) >> 11) as f64 / (1u64 << 53) as f64;
        let lifetime_at = cfg
            .max_lifetime
            .map(|d| started + d.mul_f64(1.0 - cfg.lifetime_jitter * u1));
        let heartbeat = cfg.heartbeat.and_then(|_| cfg.frame.encoder.heartbeat());
        let reval = match (&cfg.revalidate, parts) {
            (Some((every, check)), Some(parts)) => Some(Box::new(Reval {
                parts: *parts,
                check: check.clone(),
                every: *every,
                // Staggered: the first check after 50–100 % of the interval.
                next_at: Some(started + every.mul_f64(0.5 + 0.5 * u2)),
                running: Mutex::new(None),
            })),
            _ => None,
        };
        let mut lim = Box::new(Limits {
            timer: None,
            lifetime_at,
            last_inner: now,
            last_output: now,
            heartbeat,
            heartbeat_due: false,
            reval,
            armed: false,
            rearm: false,
            cut_at: None,
            cut: false,
        });
        if let Some(d) = lim.next_deadline(cfg, Step::Streaming) {
            lim.armed = true;
            lim.timer = Some(Box::pin(tokio::time::sleep_until(d)));
        }
        lim
    }

    /// The earliest moment one of this stream's timers needs attention.
    fn next_deadline(&self, cfg: &Config, step: Step) -> Option<Instant> {
        match step {
            Step::Streaming => {
                let idle = cfg.idle_timeout.map(|d| self.last_inner + d);
                let hb = match (&self.heartbeat, cfg.heartbeat) {
                    (Some(_), Some(d)) if !self.heartbeat_due => Some(self.last_output + d),
                    _ => None,
                };
                let reval = self.reval.as_ref().and_then(|r| r.next_at);
                [self.lifetime_at, idle, hb, reval]
                    .into_iter()
                    .flatten()
                    .min()
            }
            Step::Due(_) if !self.cut => self.cut_at,
            _ => None,
        }
    }
}

impl Stream {
    /// Whether a heartbeat is due (only with a heartbeat configured).
    #[inline]
    fn heartbeat_due(&self) -> bool {
        self.lim.as_ref().is_some_and(|l| l.heartbeat_due)
    }

    /// Whether a stream past its limit found no boundary within the grace period.
    #[inline]
    fn cut(&self) -> bool {
        self.lim.as_ref().is_some_and(|l| l.cut)
    }

    fn due(&mut self, kind: FrameKind, now: Instant) {
        self.step = Step::Due(kind);
        if let Some(l) = self.lim.as_mut() {
            l.cut_at = Some(now + MID_EVENT_GRACE);
            l.heartbeat_due = false;
        }
    }

    /// The shared timer fired at `now`: act on every deadline that has passed.
    fn on_timer(&mut self, now: Instant) {
        let Some(l) = self.lim.as_mut() else {
            return;
        };
        match self.step {
            Step::Streaming => {
                let cfg = self.cfg.clone();
                let m = &cfg.frame.shared.metrics;
                if l.lifetime_at.is_some_and(|t| t <= now) {
                    m.timeouts_lifetime.increment(1);
                    tracing::debug!(
                        guard.stream = self.id,
                        path = self.uri.path(),
                        "stream reached its maximum lifetime"
                    );
                    return self.due(FrameKind::Timeout, now);
                }
                if cfg.idle_timeout.is_some_and(|d| l.last_inner + d <= now) {
                    m.timeouts_idle.increment(1);
                    tracing::debug!(
                        guard.stream = self.id,
                        path = self.uri.path(),
                        "stream idle for too long"
                    );
                    return self.due(FrameKind::Timeout, now);
                }
                if let (Some(_), Some(d)) = (&l.heartbeat, cfg.heartbeat) {
                    if l.last_output + d <= now {
                        l.heartbeat_due = true;
                    }
                }
                if let Some(r) = l.reval.as_mut() {
                    if r.next_at.is_some_and(|t| t <= now) {
                        r.next_at = None;
                        let fut = (r.check)(&r.parts);
                        *r.running.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(fut);
                    }
                }
            }
            Step::Due(_) if l.cut_at.is_some_and(|t| t <= now) => l.cut = true,
            _ => {}
        }
    }

    /// Polls a revalidation check in flight; `true` if it finished.
    fn poll_check(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(r) = self.lim.as_mut().and_then(|l| l.reval.as_mut()) else {
            return false;
        };
        let running = r.running.get_mut().unwrap_or_else(|e| e.into_inner());
        let Some(fut) = running.as_mut() else {
            return false;
        };
        let Poll::Ready(out) = fut.as_mut().poll(cx) else {
            return false;
        };
        *running = None;
        let now = Instant::now();
        r.next_at = Some(now + r.every);
        match out {
            Ok(true) => {}
            Ok(false) => {
                r.next_at = None;
                tracing::info!(
                    guard.stream = self.id,
                    path = self.uri.path(),
                    "revalidation failed: ending stream"
                );
                if self.step == Step::Streaming {
                    self.due(FrameKind::Unauthorized, now);
                }
            }
            Err(e) => {
                tracing::warn!(
                    guard.stream = self.id,
                    path = self.uri.path(),
                    error = %e,
                    "revalidation check failed; the stream goes on"
                );
                if let Some(b) = &self.cfg.breaker {
                    b.failure();
                }
            }
        }
        true
    }

    /// Polls the revalidation check and the shared timer until neither has news, re-arming the
    /// timer (`Sleep::reset`) only after one of them changed a deadline. Nothing to do (and
    /// no call) for a stream without limits.
    #[inline]
    fn poll_timers(&mut self, cx: &mut Context<'_>) {
        if self.lim.is_some() {
            self.poll_limits(cx);
        }
    }

    fn poll_limits(&mut self, cx: &mut Context<'_>) {
        let Some(l) = self.lim.as_mut() else {
            return;
        };
        let mut rearm = std::mem::take(&mut l.rearm);
        loop {
            if self.poll_check(cx) {
                rearm = true;
            }
            let Some(l) = self.lim.as_mut() else {
                return;
            };
            if rearm {
                match l.next_deadline(&self.cfg, self.step) {
                    Some(d) => {
                        match l.timer.as_mut() {
                            Some(t) => t.as_mut().reset(d),
                            None => l.timer = Some(Box::pin(tokio::time::sleep_until(d))),
                        }
                        l.armed = true;
                    }
                    None => l.armed = false,
                }
            }
            if !l.armed {
                return;
            }
            let Some(t) = l.timer.as_mut() else {
                return;
            };
            if t.as_mut().poll(cx).is_pending() {
                return;
            }
            let now = Instant::now().max(t.deadline());
            self.on_timer(now);
            rearm = true;
        }
    }

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
    /// `gate`: also end on the inner frame body's final frame (a stream with limits, which
    /// could otherwise add a heartbeat after it); the fast paths pass none.
    #[inline(always)]
    fn forwarded(&mut self, frame: &Frame<Bytes>, inner_end: bool, gate: GateRef<'_>) {
        if let Some(d) = frame.data_ref() {
            self.tracker.update(d);
        }
        if let Some(l) = self.lim.as_mut() {
            if self.cfg.idle_timeout.is_some() || l.heartbeat.is_some() {
                let now = Instant::now();
                l.last_inner = now;
                l.last_output = now;
                if std::mem::take(&mut l.heartbeat_due) {
                    l.rearm = true;
                }
            }
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
        gate: GateRef<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, E>>> {
        Poll::Ready(match res {
            // Not an end; the callers forward data frames themselves.
            Some(Ok(frame)) => Some(Ok(frame)),
            Some(Err(e)) if gate.is_claimed() => {
                // The inner frame layer ended mid-record at the deadline (its final frame is
                // claimed, so it sent nothing more): not a failure of the service.
                self.step = Step::Done;
                Some(Err(e))
            }
            Some(Err(e)) => {
                self.record_error(&e);
                if self.cfg.pass_errors {
                    self.step = Step::Passthrough;
                    Some(Err(e))
                } else if self.tracker.at_boundary() && gate.claim() {
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

impl<B> Body for GuardedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display + Into<crate::BoxError>,
{
    type Data = Bytes;
    type Error = crate::BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::BoxError>>> {
        let this = self.project();
        let res = poll_parts(
            this.inner.as_pin_mut(),
            this.watched,
            this.st.as_deref_mut(),
            GateRef::of(this.gate),
            cx,
        );
        let st = this.st;
        crate::boxed_result(res, || st.as_mut().is_some_and(|s| s.take_aborted()))
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        end_of(
            self.inner.as_ref().map(|i| || i.is_end_stream()),
            self.st.as_deref(),
        )
    }

    fn size_hint(&self) -> SizeHint {
        hint_of(
            self.inner.as_ref().map(|i| || i.size_hint()),
            self.st.as_deref(),
        )
    }
}

/// [`GuardedBody::poll_frame`] over parts held apart, so that
/// [`DrainBody`](crate::stack::DrainBody) can run it without owning a `GuardedBody`.
#[inline(always)]
pub(crate) fn poll_parts<B>(
    inner: Option<Pin<&mut B>>,
    watched: &mut Option<(Arc<Config>, RoutePath)>,
    st: Option<&mut Stream>,
    gate: GateRef<'_>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    let Some(mut inner) = inner else {
        return Poll::Ready(None);
    };
    let Some(st) = st else {
        let res = inner.poll_frame(cx);
        if let Poll::Ready(r) = &res {
            watch(watched, r);
        }
        return res;
    };
    // Fast path of a stream without limits (no timers, no heartbeat), small enough to
    // inline into the layer around it; everything else is `poll_stream`, out of line.
    if st.step == Step::Streaming && st.lim.is_none() {
        let res = inner.as_mut().poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                // No look at the shared gate here: without limits this body adds a final
                // frame only for an error, and that claims the gate first.
                st.forwarded(frame, inner.is_end_stream(), GateRef::default());
                return res;
            }
            Poll::Pending => return res,
            Poll::Ready(_) => {}
        }
        return st.inner_ended(ready!(res), gate);
    }
    poll_stream(inner, st, gate, cx)
}

/// A plain response's result: an error counts for the breaker (once).
#[inline]
pub(crate) fn watch<E: fmt::Display>(watched: &mut Watched, r: &Option<Result<Frame<Bytes>, E>>) {
    if let Some(Err(e)) = r {
        if let Some((cfg, uri)) = watched.take() {
            record_error(&cfg, None, &uri, e);
        }
    }
}

/// [`GuardedBody::is_end_stream`] over parts held apart; `inner` tells the inner body's.
#[inline]
pub(crate) fn end_of(inner: Option<impl FnOnce() -> bool>, st: Option<&Stream>) -> bool {
    match (inner, st) {
        (None, _) => true,
        (Some(i), None) => i(),
        (Some(i), Some(s)) => match s.step {
            Step::Done => true,
            Step::Passthrough => i(),
            _ => false,
        },
    }
}

/// [`GuardedBody::size_hint`] over parts held apart; `inner` tells the inner body's.
pub(crate) fn hint_of(inner: Option<impl FnOnce() -> SizeHint>, st: Option<&Stream>) -> SizeHint {
    match (inner, st) {
        (None, _) => SizeHint::with_exact(0),
        (Some(i), None) => i(),
        (Some(i), Some(s)) => match s.step {
            Step::Done => SizeHint::with_exact(0),
            Step::Passthrough => i(),
            _ => {
                let mut h = SizeHint::new();
                h.set_lower(i().lower());
                h
            }
        },
    }
}

/// What the guard keeps around a body, taken apart (see [`GuardedBody::into_parts`]).
pub(crate) type Watched = Option<(Arc<Config>, RoutePath)>;

impl<B> GuardedBody<B> {
    /// The inner body (none for the guard's own answers), the breaker watch of a plain
    /// response, and a stream's state, for [`DrainBody`](crate::stack::DrainBody) (which
    /// keeps the final-frame flag itself).
    pub(crate) fn into_parts(self) -> (Option<B>, Watched, Option<Box<Stream>>) {
        (self.inner, self.watched, self.st)
    }
}

/// A [`GuardedBody`] taken apart, its inner body (itself a view) borrowed.
pub(crate) struct GuardView<'a, B> {
    pub(crate) inner: Pin<&'a mut B>,
    pub(crate) watched: &'a mut Watched,
    pub(crate) st: Option<&'a mut Stream>,
    pub(crate) gate: GateRef<'a>,
}

impl<B> Body for GuardView<'_, B>
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
        let this = self.get_mut();
        poll_parts(
            Some(this.inner.as_mut()),
            this.watched,
            this.st.as_deref_mut(),
            this.gate,
            cx,
        )
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        end_of(Some(|| self.inner.is_end_stream()), self.st.as_deref())
    }

    fn size_hint(&self) -> SizeHint {
        hint_of(Some(|| self.inner.size_hint()), self.st.as_deref())
    }
}

impl Stream {
    /// Whether the stream ended in the middle of a record (the body then reports
    /// [`Aborted`](crate::Aborted), once).
    #[inline]
    pub(crate) fn take_aborted(&mut self) -> bool {
        let aborted = self.step == Step::Aborted;
        if aborted {
            self.step = Step::Done;
        }
        aborted
    }

    /// The frame configuration of the stream's encoder (the frame layer's state of a fused
    /// stream is made with it).
    pub(crate) fn frame_config(&self) -> Arc<crate::frame::FrameConfig> {
        self.cfg.frame.clone()
    }

    /// Whether the fused fast path of [`DrainBody`](crate::stack::DrainBody) may forward
    /// frames for this stream without the guard's own bookkeeping: streaming, and no limits
    /// (no timers, no heartbeats), so this body adds a frame only when the inner one fails.
    pub(crate) fn fusable(&self) -> bool {
        self.step == Step::Streaming && self.lim.is_none()
    }

    /// Catches up with frames the fused fast path forwarded: until either body adds a frame,
    /// the guard has seen exactly what the frame body saw.
    pub(crate) fn sync_tracker(&mut self, t: &Tracker) {
        self.tracker = t.clone();
    }

    /// One result of the inner body as [`poll_parts`]'s fast path treats it, for a stream
    /// whose tracker is up to date; `inner_end` is the inner body's `is_end_stream` after it.
    #[inline]
    pub(crate) fn handle<E: fmt::Display>(
        &mut self,
        res: Option<Result<Frame<Bytes>, E>>,
        inner_end: bool,
        gate: GateRef<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, E>>> {
        if let Some(Ok(frame)) = &res {
            self.forwarded(frame, inner_end, GateRef::default());
            return Poll::Ready(res);
        }
        self.inner_ended(res, gate)
    }
}

/// Everything but the fast path of [`GuardedBody::poll_frame`]: timers, heartbeats,
/// revalidation and final frames.
#[inline(never)]
fn poll_stream<B>(
    mut inner: Pin<&mut B>,
    st: &mut Stream,
    gate: GateRef<'_>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    loop {
        match st.step {
            Step::Done | Step::Aborted => return Poll::Ready(None),
            Step::Trailers => {
                st.step = Step::Done;
                if let Some(t) = st.trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(*t))));
                }
                continue;
            }
            Step::Passthrough => {
                let res = ready!(inner.as_mut().poll_frame(cx));
                match &res {
                    Some(Err(e)) => st.record_error(e),
                    None => st.step = Step::Done,
                    Some(Ok(_)) => {}
                }
                return Poll::Ready(res);
            }
            Step::Streaming | Step::Due(_) => {}
        }

        st.poll_timers(cx);

        match st.step {
            Step::Due(kind) => {
                if st.tracker.at_boundary() {
                    if !gate.claim() {
                        // The inner frame body sent its final frame first.
                        st.step = Step::Passthrough;
                        continue;
                    }
                    match st.emit(kind) {
                        Some(f) => return Poll::Ready(Some(Ok(f))),
                        None => continue,
                    }
                }
                if st.cut() {
                    tracing::debug!(
                        guard.stream = st.id,
                        path = st.uri.path(),
                        "no event boundary within the grace period: ending without a final frame"
                    );
                    st.step = Step::Aborted;
                    return Poll::Ready(None);
                }
            }
            Step::Streaming if st.heartbeat_due() && st.tracker.at_boundary() => {
                if let Some(l) = st.lim.as_mut() {
                    if let Some(hb) = l.heartbeat {
                        l.heartbeat_due = false;
                        l.rearm = true;
                        l.last_output = Instant::now();
                        // A static `Bytes`: allocates nothing.
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(hb)))));
                    }
                }
            }
            _ => {}
        }

        let res = inner.as_mut().poll_frame(cx);
        // A forwarded frame is inspected in place and returned as it came (no copy).
        if let Poll::Ready(Some(Ok(frame))) = &res {
            st.forwarded(frame, inner.is_end_stream(), gate);
            return res;
        }
        return st.inner_ended(ready!(res), gate);
    }
}

impl<B> fmt::Debug for GuardedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardedBody")
            .field("empty", &self.inner.is_none())
            .field("step", &self.st.as_ref().map(|s| s.step))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::task::Poll;

    use http::Request;
    use tokio::time::advance;
    use tokio_test::{assert_pending, task::spawn};
    use tower_layer::Layer;

    use super::*;
    use crate::frame::{FrameLayer, Grpc, NdJson};
    use crate::guard::test_util::{poll, sse, streaming, text, through};
    use crate::guard::{BreakerState, GuardLayer};
    use crate::{DrainController, DrainReason};

    const TIMEOUT_FRAME: &str =
        "event: error\ndata: {\"error\":\"Connection timeout\",\"code\":\"TIMEOUT\"}\nretry: ";

    fn _auto_traits() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<GuardedBody<crate::guard::test_util::TestBody>>();
        send_sync::<GuardedBody<http_body_util::Full<Bytes>>>();
    }

    fn assert_open<B: Body>(b: &B) {
        assert!(!b.is_end_stream());
        assert_eq!(b.size_hint().upper(), None);
    }

    fn assert_ended<B: Body>(b: &B) {
        assert!(b.is_end_stream());
        assert_eq!(b.size_hint().exact(), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn lifetime_frame_arrives_at_the_limit_and_the_body_ends() {
        let drain = DrainController::new();
        let layer = GuardLayer::builder(drain.watch())
            .max_lifetime(Duration::from_secs(10))
            .build()
            .unwrap();
        let (feed, res) = sse();
        let mut body = spawn(through(&layer, Request::new(()), res).await.into_body());
        feed.data("data: 1\n\n");
        assert_eq!(text(poll(&mut body)), "data: 1\n\n");
        body.enter(|_, b| assert_open(&*b));
        assert_pending!(poll(&mut body));

        advance(Duration::from_millis(9_999)).await;
        assert_pending!(poll(&mut body));
        advance(Duration::from_millis(1)).await;
        assert!(body.is_woken());
        assert!(text(poll(&mut body)).starts_with(TIMEOUT_FRAME));
        body.enter(|_, b| assert_open(&*b));
        assert!(matches!(poll(&mut body), Poll::Ready(None)));
        body.enter(|_, b| assert_ended(&*b));
        drop(feed);
    }

    #[tokio::test(start_paused = true)]
    async fn lifetime_jitter_only_shortens_and_spreads() {
        let drain = DrainController::new();
        let layer = GuardLayer::builder(drain.watch())
            .max_lifetime(Duration::from_secs(100))
            .lifetime_jitter(0.5)
            .build()
            .unwrap();
        let start = Instant::now();
        let mut ends = Vec::new();
        for _ in 0..8 {
            let (feed, res) = sse();
            let mut body = Box::pin(through(&layer, Request::new(()), res).await.into_body());
            let t0 = Instant::now();
            let f = http_body_util::BodyExt::frame(&mut body)
                .await
                .unwrap()
                .unwrap();
            assert!(f.into_data().unwrap().starts_with(TIMEOUT_FRAME.as_bytes()));
            let lived = t0.elapsed();
            assert!(lived >= Duration::from_secs(50) && lived <= Duration::from_secs(100));
            ends.push(lived);
            drop(feed);
        }
        ends.sort();
        ends.dedup();
        assert!(ends.len() > 1, "jitter spreads expiries: {ends:?}");
        assert!(start.elapsed() > Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_reached_mid_event_waits_for_the_boundary() {
        let drain = DrainController::new();
        let layer = GuardLayer::builder(drain.watch())
            .max_lifetime(Duration::from_secs(10))
            .build()
            .unwrap();
        let (feed, res) = sse();
        let mut body = spawn(through(&layer, Request::new(()), res).await.into_body());
        feed.data("event: tick\n");
        assert_eq!(text(poll(&mut body)), "event: tick\n");
        advance(Duration::from_secs(10)).await;
        assert_pending!(poll(&mut body)); // mid-event: no frame yet
        feed.data("data: 1\n\n");
        assert_eq!(text(poll(&mut body)), "data: 1\n\n");
        assert!(text(poll(&mut body)).starts_with(TIMEOUT_FRAME));
        assert!(matches!(poll(&mut body), Poll::Ready(None)));

        // An event that never completes: after the grace, the body fails (no whole frame
        // can go out), so the client sees an aborted response, not a clean end.
        let (feed, res) = sse();
        let mut body = spawn(through(&layer, Request::new(()), res).await.into_body());
        feed.data("data: half");
        assert_eq!(text(poll(&mut body)), "data: half");
        advance(Duration::from_secs(10)).await;
        assert_pending!(poll(&mut body));
        advance(MID_EVENT_GRACE).await;
        match poll(&mut body) {
            Poll::Ready(Some(Err(e))) => assert!(e.is::<crate::Aborted>(), "{e}"),
            other => panic!("expected the abort, got {other:?}"),
        }
        assert!(matches!(poll(&mut body), Poll::Ready(None)));
        drop(feed);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_counts_from_the_last_frame() {
        let drain = DrainController::new();
        let layer = GuardLayer::builder(drain.watch())
            .idle_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let (feed, res) = sse();
        let mut body = spawn(through(&layer, Request::new(()), res).await.into_body());
        for i in 0..4 {
            advance(Duration::from_secs(4)).await;
            assert_pending!(poll(&mut body), "frame {i}");
            feed.data("data: x\n\n");
            assert_eq!(text(poll(&mut body)), "data: x\n\n");
        }
        advance(Duration::from_millis(4_999)).await;
        assert_pending!(poll(&mut body));
        advance(Duration::from_millis(1)).await;
        assert!(text(poll(&mut body)).starts_with(TIMEOUT_FRAME));
        assert!(matches!(poll(&mut body), Poll::Ready(None)));
        drop(feed);
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_keep_an_idle_stream_open_and_never_split_an_event() {
        let drain = DrainController::new();
        let layer = GuardLayer::builder(drain.watch())
            .heartbeat(Duration::from_secs(15))
            .build()
            .unwrap();
        let (feed, res) = sse();
        let mut body = spawn(through(&layer, Request::new(()), res).await.into_body());
        advance(Duration::from_secs(15)).await;
        assert_eq!(text(poll(&mut body)), ":\n\n");
        assert_pending!(poll(&mut body));
        advance(Duration::from_secs(15)).await;
        assert_eq!(text(poll(&mut body)), ":\n\n");

        // Mid-event: no heartbeat, however long the pause.
        feed.data("event: tick\n");
        assert_eq!(text(poll(&mut body)), "event: tick\n");
        advance(Duration::from_secs(60)).await;
        assert_pending!(poll(&mut body));
        feed.data("data: 1\n\n");
        assert_eq!(text(poll(&mut body)), "data: 1\n\n");
        // The event is complete; the next heartbeat follows once 15 s have passed since then.
        advance(Duration::from_secs(14)).await;
        assert_pending!(poll(&mut body));
        advance(Duration::from_secs(1)).await;
        assert_eq!(text(poll(&mut body)), ":\n\n");
        body.enter(|_, b| assert_open(&*b));
        drop(feed);
    }

    #[tokio::test(start_paused = true)]
    async fn ndjson_heartbeat_is_a_json_record_and_grpc_gets_deadline_exceeded_trailers() {
        let drain = DrainController::new();
        let layer = GuardLayer::builder(drain.watch())
            .encoder(NdJson::new())
            .heartbeat(Duration::from_secs(1))
            .build()
            .unwrap();
        let (feed, res) = streaming("application/x-ndjson");
        let mut body = spawn(through(&layer, Request::new(()), res).await.into_body());
        advance(Duration::from_secs(1)).await;
        // A whole JSON Lines record, never a blank line.
        assert_eq!(text(poll(&mut body)), "{\"type\":\"heartbeat\"}\n");
        drop(feed);

        let layer = GuardLayer::builder(drain.watch())
            .encoder(Grpc::new())
            .max_lifetime(Duration::from_secs(3))
            .heartbeat(Duration::from_secs(1))
            .build()
            .unwrap();
        let (feed, res) = streaming("application/grpc");
        let mut body = spawn(through(&layer, Request::new(()), res).await.into_body());
        feed.0
            .try_send(Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 1, 7]))))
            .unwrap();
        assert!(matches!(poll(&mut body), Poll::Ready(Some(Ok(_)))));
        advance(Duration::from_secs(3)).await;
        match poll(&mut body) {
            Poll::Ready(Some(Ok(f))) => {
                let t = f.into_trailers().expect("trailers");
                assert_eq!(t["grpc-status"], "4");
            }
            other => panic!("expected trailers, got {other:?}"),
        }
        assert!(matches!(poll(&mut body), Poll::Ready(None)));
        drop(feed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_error_becomes_an_error_frame_and_a_clean_end() {
        let drain = DrainController::new();
        let layer = GuardLayer::builder(drain.watch())
            .circuit_breaker(true)
            .build()
            .unwrap();
        let breaker = layer.breaker().unwrap();
        let (feed, res) = sse();
        let mut body = spawn(through(&layer, Request::new(()), res).await.into_body());
        feed.data("data: 1\n\n");
        feed.error();
        assert_eq!(text(poll(&mut body)), "data: 1\n\n");
        let last = text(poll(&mut body));
        assert!(
            last.starts_with(
                "event: error\ndata: {\"error\":\"Stream error\",\"code\":\"STREAM_ERROR\"}\n"
            ),
            "{last}"
        );
        assert!(matches!(poll(&mut body), Poll::Ready(None)));
        body.enter(|_, b| assert_ended(&*b));
        assert_eq!(breaker.consecutive_failures(), 1);

        // Passed through when configured so.
        let layer = GuardLayer::builder(drain.watch())
            .pass_through_errors(true)
            .build()
            .unwrap();
        let (feed, res) = sse();
        let mut body = spawn(through(&layer, Request::new(()), res).await.into_body());
        feed.error();
        assert!(matches!(poll(&mut body), Poll::Ready(Some(Err(_)))));
        drop(feed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_error_mid_event_or_in_grpc_ends_the_stream_the_protocol_way() {
        let drain = DrainController::new();
        // Mid-event: no frame (it would corrupt the event); the error goes on, so the
        // response is aborted rather than ended cleanly after half an event.
        let layer = GuardLayer::new(drain.watch());
        let (feed, res) = sse();
        let mut body = spawn(through(&layer, Request::new(()), res).await.into_body());
        feed.data("data: par");
        feed.error();
        assert_eq!(text(poll(&mut body)), "data: par");
        assert!(matches!(poll(&mut body), Poll::Ready(Some(Err(_)))));
        body.enter(|_, b| assert_ended(&*b));

        // gRPC (no limits set): the error travels as trailers only, then the end.
        let layer = GuardLayer::builder(drain.watch())
            .encoder(Grpc::new())
            .build()
            .unwrap();
        let (feed, res) = streaming("application/grpc");
        let mut body = spawn(through(&layer, Request::new(()), res).await.into_body());
        feed.0
            .try_send(Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 1, 7]))))
            .unwrap();
        feed.error();
        assert!(matches!(poll(&mut body), Poll::Ready(Some(Ok(_)))));
        match poll(&mut body) {
            Poll::Ready(Some(Ok(f))) => {
                let t = f.into_trailers().expect("trailers");
                assert_ne!(t["grpc-status"], "0");
            }
            other => panic!("expected trailers, got {other:?}"),
        }
        assert!(matches!(poll(&mut body), Poll::Ready(None)));
        body.enter(|_, b| assert_ended(&*b));
    }

    #[tokio::test(start_paused = true)]
    async fn revalidation_closes_exactly_the_stream_whose_check_fails() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let drain = DrainController::new();
        let checks = Arc::new(AtomicUsize::new(0));
        let c = checks.clone();
        let layer = GuardLayer::builder(drain.watch())
            .revalidate(Duration::from_secs(60), move |parts: &Parts| {
                c.fetch_add(1, Ordering::Relaxed);
                let ok = parts.headers.get("x-user").is_some_and(|v| v != "revoked");
                async move { Ok::<_, std::convert::Infallible>(ok) }
            })
            .build()
            .unwrap();
        let req = |user: &'static str| Request::builder().header("x-user", user).body(()).unwrap();
        let mut bodies = Vec::new();
        let mut feeds = Vec::new();
        for user in ["alice", "revoked", "bob", "carol"] {
            let (feed, res) = sse();
            bodies.push(spawn(through(&layer, req(user), res).await.into_body()));
            feeds.push(feed);
        }
        for b in bodies.iter_mut() {
            assert_pending!(poll(b));
        }
        // No check before half the interval; every stream checked by its end, not all at once.
        let mut first_check = Vec::new();
        for step in 1..=60u32 {
            advance(Duration::from_secs(1)).await;
            for (i, b) in bodies.iter_mut().enumerate() {
                if b.is_woken() {
                    let _ = poll(b);
                    if !first_check.iter().any(|(j, _)| *j == i) {
                        first_check.push((i, step));
                    }
                }
            }
            if step < 30 {
                assert_eq!(checks.load(Ordering::Relaxed), 0, "at {step} s");
            }
        }
        assert_eq!(checks.load(Ordering::Relaxed), 4);
        let mut times: Vec<u32> = first_check.iter().map(|(_, t)| *t).collect();
        times.dedup();
        assert!(times.len() > 1, "checks staggered: {first_check:?}");

        // Exactly the revoked stream got the unauthorized frame (on the poll that saw it).
        let mut ended = Vec::new();
        for (i, b) in bodies.iter_mut().enumerate() {
            b.enter(|_, body| {
                if body.is_end_stream() || body.st.as_ref().unwrap().step != Step::Streaming {
                    ended.push(i);
                }
            });
        }
        assert_eq!(ended, vec![1]);
        assert!(matches!(poll(&mut bodies[0]), Poll::Pending));
        drop(feeds);
    }

    #[tokio::test(start_paused = true)]
    async fn revalidation_sends_the_unauthorized_frame() {
        let drain = DrainController::new();
        let layer = GuardLayer::builder(drain.watch())
            .revalidate(Duration::from_secs(2), |_: &Parts| async {
                Ok::<_, std::convert::Infallible>(false)
            })
            .build()
            .unwrap();
        let (feed, res) = sse();
        let mut body = Box::pin(through(&layer, Request::new(()), res).await.into_body());
        let f = http_body_util::BodyExt::frame(&mut body)
            .await
            .unwrap()
            .unwrap();
        let s = String::from_utf8(f.into_data().unwrap().to_vec()).unwrap();
        assert!(s.contains("\"code\":\"UNAUTHORIZED\""), "{s}");
        assert!(http_body_util::BodyExt::frame(&mut body).await.is_none());
        drop(feed);
    }

    #[tokio::test(start_paused = true)]
    async fn revalidation_errors_count_for_the_breaker_not_against_the_client() {
        let drain = DrainController::new();
        let layer = GuardLayer::builder(drain.watch())
            .failure_threshold(2)
            .revalidate(Duration::from_secs(2), |_: &Parts| async {
                Err::<bool, _>(std::io::Error::other("auth service down"))
            })
            .build()
            .unwrap();
        let breaker = layer.breaker().unwrap();
        let (feed, res) = sse();
        let mut body = spawn(through(&layer, Request::new(()), res).await.into_body());
        for _ in 0..2 {
            advance(Duration::from_secs(2)).await;
            assert_pending!(poll(&mut body)); // the stream goes on
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        feed.data("data: still here\n\n");
        assert_eq!(text(poll(&mut body)), "data: still here\n\n");
    }

    /// A stream that is both expiring and being drained, at the very same instant, gets exactly
    /// one final frame.
    #[tokio::test(start_paused = true)]
    async fn expiring_and_draining_at_the_same_instant_gives_one_final_frame() {
        let drain = DrainController::new();
        let guard = GuardLayer::builder(drain.watch())
            .max_lifetime(Duration::from_secs(10))
            .build()
            .unwrap();
        let frame = FrameLayer::new(drain.watch());
        let (feed, res) = sse();
        let mut slot = Some(res);
        let svc = guard.layer(frame.layer(tower::service_fn(move |_req: Request<()>| {
            let res = slot.take().unwrap();
            async move { Ok::<_, std::convert::Infallible>(res) }
        })));
        let res = tower::ServiceExt::oneshot(svc, Request::new(()))
            .await
            .unwrap();
        let mut body = spawn(res.into_body());
        feed.data("data: 1\n\n");
        assert_eq!(text(poll(&mut body)), "data: 1\n\n");
        assert_pending!(poll(&mut body));

        advance(Duration::from_secs(10)).await; // the lifetime is over ...
        drain.drain(DrainReason::Manual);
        drain.closing().await; // ... and Closing begins, in the same instant
        assert_eq!(Instant::now() - Instant::now(), Duration::ZERO);
        assert!(body.is_woken());

        let last = text(poll(&mut body));
        assert!(last.starts_with(TIMEOUT_FRAME), "{last}");
        assert!(matches!(poll(&mut body), Poll::Ready(None)));
        body.enter(|_, b| assert_ended(&*b));
        drop(feed);
    }

    /// The drain's frame first: the lifetime passing afterwards adds nothing.
    #[tokio::test(start_paused = true)]
    async fn a_drained_stream_gets_no_timeout_frame_afterwards() {
        for encoder in ["sse", "grpc"] {
            let drain = DrainController::new();
            let mut guard = GuardLayer::builder(drain.watch())
                .max_lifetime(Duration::from_secs(10))
                .heartbeat(Duration::from_secs(1))
                .build()
                .unwrap();
            let mut frame = FrameLayer::new(drain.watch());
            let ct = if encoder == "grpc" {
                guard = guard.to_builder().encoder(Grpc::new()).build().unwrap();
                frame = FrameLayer::with_encoder(drain.watch(), Grpc::new());
                "application/grpc"
            } else {
                "text/event-stream"
            };
            let (feed, res) = streaming(ct);
            let mut slot = Some(res);
            let svc = guard.layer(frame.layer(tower::service_fn(move |_req: Request<()>| {
                let res = slot.take().unwrap();
                async move { Ok::<_, std::convert::Infallible>(res) }
            })));
            let res = tower::ServiceExt::oneshot(svc, Request::new(()))
                .await
                .unwrap();
            let mut body = spawn(res.into_body());
            assert_pending!(poll(&mut body));
            advance(Duration::from_millis(9_999)).await;
            drain.drain(DrainReason::Manual);
            drain.closing().await;
            let mut finals = 0;
            loop {
                match poll(&mut body) {
                    Poll::Ready(Some(Ok(f))) => {
                        if f.is_trailers() {
                            finals += 1;
                        } else {
                            let d = f.into_data().unwrap();
                            if d.starts_with(b"event:") {
                                assert!(d.starts_with(b"event: shutdown"));
                                finals += 1;
                            }
                        }
                    }
                    Poll::Ready(None) => break,
                    Poll::Ready(Some(Err(e))) => panic!("{e}"),
                    Poll::Pending => advance(Duration::from_secs(1)).await,
                }
            }
            assert_eq!(finals, 1, "{encoder}");
            drop(feed);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn other_responses_pass_through_untouched() {
        let drain = DrainController::new();
        let layer = GuardLayer::builder(drain.watch())
            .max_lifetime(Duration::from_secs(1))
            .build()
            .unwrap();
        let res = http::Response::new(http_body_util::Full::new(Bytes::from_static(b"hello")));
        let mut body = spawn(through(&layer, Request::new(()), res).await.into_body());
        body.enter(|_, b| assert_eq!(b.size_hint().exact(), Some(5)));
        advance(Duration::from_secs(5)).await;
        assert_eq!(text(poll(&mut body)), "hello");
        body.enter(|_, b| assert!(b.is_end_stream()));
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_body_mid_stream_releases_the_stream() {
        let drain = DrainController::new();
        let stack = crate::DrainStack::new(drain.watch())
            .guard(|g| g.max_lifetime(Duration::from_secs(10)))
            .unwrap();
        let (feed, res) = sse();
        let slot = Arc::new(Mutex::new(Some(res)));
        let svc = stack.layer(tower::service_fn(move |_req: Request<()>| {
            let res = slot.lock().unwrap().take().unwrap();
            async move { Ok::<_, std::convert::Infallible>(res) }
        }));
        let res = tower::ServiceExt::oneshot(svc, Request::new(()))
            .await
            .unwrap();
        let mut body = spawn(res.into_body());
        feed.data("data: 1\n\n");
        assert_eq!(text(poll(&mut body)), "data: 1\n\n");
        assert_eq!(drain.active_streams(), 1);
        drop(body);
        assert_eq!(drain.active_streams(), 0);
        drop(feed);
    }
}
