//! A stream's limits: its lifetime, idle limit, heartbeat and revalidation, all on one timer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use http::request::Parts;
use tokio::time::{Instant, Sleep};

use super::config::{CheckFn, CheckFuture, Config};
use crate::frame::FrameKind;
use crate::route::RoutePath;

/// How long a stream whose limit was reached mid-event may take to reach the event's end
/// before it is ended without a final frame (clients discard an incomplete event).
pub(crate) const MID_EVENT_GRACE: Duration = Duration::from_secs(5);

/// Where a guarded stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
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

/// The timers and checks of a stream with limits. Boxed, and only made when a limit is
/// configured: without one, a stream needs no clock and no timer.
pub(super) struct Limits {
    /// Created on first use: a `Sleep` is large and shared by all the stream's deadlines.
    timer: Option<Pin<Box<Sleep>>>,
    lifetime_at: Option<Instant>,
    /// Until the inner body's first frame: when it is due.
    first_frame_at: Option<Instant>,
    last_inner: Instant,
    last_output: Instant,
    pub(super) heartbeat: Option<&'static [u8]>,
    pub(super) heartbeat_due: bool,
    reval: Option<Box<Reval>>,
    armed: bool,
    /// A deadline moved earlier than the armed one could cover (a heartbeat went out while
    /// the timer was parked): re-arm on the next poll.
    rearm: bool,
    cut_at: Option<Instant>,
    pub(super) cut: bool,
}

/// Who a stream is, for logs.
pub(super) struct Named<'a> {
    pub(super) id: u64,
    pub(super) uri: &'a RoutePath,
}

impl Limits {
    /// A stream's limits, if `cfg` sets any.
    pub(super) fn new(
        cfg: &Config,
        started: Option<Instant>,
        parts: Option<Box<Parts>>,
        jitter: u64,
    ) -> Option<Box<Self>> {
        if cfg.max_lifetime.is_none()
            && cfg.idle_timeout.is_none()
            && cfg.first_frame_timeout.is_none()
            && cfg.heartbeat.is_none()
            && cfg.revalidate.is_none()
        {
            return None;
        }
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
            first_frame_at: cfg.first_frame_timeout.map(|d| started + d),
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
        Some(lim)
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
                [self.lifetime_at, self.first_frame_at, idle, hb, reval]
                    .into_iter()
                    .flatten()
                    .min()
            }
            Step::Due(_) if !self.cut => self.cut_at,
            _ => None,
        }
    }

    /// A limit was reached at `now`: the final frame of `kind` is due.
    fn due(&mut self, step: &mut Step, kind: FrameKind, now: Instant) {
        *step = Step::Due(kind);
        self.cut_at = Some(now + MID_EVENT_GRACE);
        self.heartbeat_due = false;
    }

    /// The shared timer fired at `now`: act on every deadline that has passed.
    fn on_timer(&mut self, step: &mut Step, cfg: &Config, who: &Named<'_>, now: Instant) {
        match *step {
            Step::Streaming => {
                let m = &cfg.frame.shared.metrics;
                let expired = if self.lifetime_at.is_some_and(|t| t <= now) {
                    Some((&m.timeouts_lifetime, "stream reached its maximum lifetime"))
                } else if self.first_frame_at.is_some_and(|t| t <= now) {
                    Some((&m.timeouts_idle, "no first frame in time"))
                } else if cfg.idle_timeout.is_some_and(|d| self.last_inner + d <= now) {
                    Some((&m.timeouts_idle, "stream idle for too long"))
                } else {
                    None
                };
                if let Some((counter, why)) = expired {
                    counter.increment(1);
                    tracing::debug!(guard.stream = who.id, path = who.uri.path(), "{why}");
                    return self.due(step, FrameKind::Timeout, now);
                }
                if let (Some(_), Some(d)) = (&self.heartbeat, cfg.heartbeat) {
                    if self.last_output + d <= now {
                        self.heartbeat_due = true;
                    }
                }
                if let Some(r) = self.reval.as_mut() {
                    if r.next_at.is_some_and(|t| t <= now) {
                        r.next_at = None;
                        let fut = (r.check.0)(&r.parts);
                        *r.running.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(fut);
                    }
                }
            }
            Step::Due(_) if self.cut_at.is_some_and(|t| t <= now) => self.cut = true,
            _ => {}
        }
    }

    /// Polls a revalidation check in flight; `true` if it finished.
    fn poll_check(
        &mut self,
        step: &mut Step,
        cfg: &Config,
        who: &Named<'_>,
        cx: &mut Context<'_>,
    ) -> bool {
        let Some(r) = self.reval.as_mut() else {
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
                    guard.stream = who.id,
                    path = who.uri.path(),
                    "revalidation failed: ending stream"
                );
                if *step == Step::Streaming {
                    self.due(step, FrameKind::Unauthorized, now);
                }
            }
            Err(e) => {
                tracing::warn!(
                    guard.stream = who.id,
                    path = who.uri.path(),
                    error = %e,
                    "revalidation check failed; the stream goes on"
                );
                if let Some(b) = &cfg.breaker {
                    b.failure();
                }
            }
        }
        true
    }

    /// Polls the revalidation check and the shared timer until neither has news, re-arming
    /// the timer (`Sleep::reset`) only after one of them changed a deadline.
    pub(super) fn poll(
        &mut self,
        step: &mut Step,
        cfg: &Config,
        who: &Named<'_>,
        cx: &mut Context<'_>,
    ) {
        let mut rearm = std::mem::take(&mut self.rearm);
        loop {
            if self.poll_check(step, cfg, who, cx) {
                rearm = true;
            }
            if rearm {
                match self.next_deadline(cfg, *step) {
                    Some(d) => {
                        match self.timer.as_mut() {
                            Some(t) => t.as_mut().reset(d),
                            None => self.timer = Some(Box::pin(tokio::time::sleep_until(d))),
                        }
                        self.armed = true;
                    }
                    None => self.armed = false,
                }
            }
            if !self.armed {
                return;
            }
            let Some(t) = self.timer.as_mut() else {
                return;
            };
            if t.as_mut().poll(cx).is_pending() {
                return;
            }
            let now = Instant::now().max(t.deadline());
            self.on_timer(step, cfg, who, now);
            rearm = true;
        }
    }

    /// A frame of the inner body went out.
    #[inline]
    pub(super) fn forwarded(&mut self, cfg: &Config) {
        self.first_frame_at = None;
        if cfg.idle_timeout.is_some() || self.heartbeat.is_some() {
            let now = Instant::now();
            self.last_inner = now;
            self.last_output = now;
            if std::mem::take(&mut self.heartbeat_due) {
                self.rearm = true;
            }
        }
    }

    /// A heartbeat went out.
    pub(super) fn heartbeat_sent(&mut self) {
        self.heartbeat_due = false;
        self.rearm = true;
        self.last_output = Instant::now();
    }
}
