use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::controller::Shared;
use crate::track::StreamGuard;
use crate::ConfigError;

/// The close code sent by default: `1001 Going Away`.
pub const GOING_AWAY: u16 = 1001;

/// The close reason sent at a drain by default.
pub const DEFAULT_DRAIN_REASON: &str = "server going away, reconnect";

/// The close reason sent when a socket reaches the guard's maximum lifetime.
pub const LIFETIME_REASON: &str = "maximum connection lifetime reached, reconnect";

/// How long a socket closed for its lifetime (not a drain) waits for the peer's close frame.
pub const LIFETIME_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest close reason a close frame can carry (its payload is at most 125 bytes).
const MAX_REASON: usize = 123;

/// Why a socket's [`WsHandle::notified`] resolved: what the socket should now be told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseCause {
    /// The drain reached this socket's share of the spread: send the close frame.
    Drain,
    /// The socket reached the guard's maximum lifetime.
    Lifetime,
    /// The grace deadline passed before the socket was closed: end it now.
    Deadline,
}

/// How [`close`](super::close) ended a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Closed {
    /// The close frame was sent and the peer answered with its own.
    Clean,
    /// The peer went away (or the socket failed) before answering.
    PeerGone,
    /// No answer before the grace deadline (or, for a lifetime end, within
    /// [`LIFETIME_CLOSE_TIMEOUT`]): the socket was dropped.
    Forced,
}

/// The track layer's registration of an upgrade request until a handler takes it: a request
/// extension (extensions must be `Clone`; every clone shares the one registration).
#[derive(Clone)]
pub(crate) struct Slot(Arc<Mutex<Option<Pending>>>);

pub(crate) struct Pending {
    guard: StreamGuard,
    shared: Arc<Shared>,
    started: Instant,
    lifetime: Option<Duration>,
}

impl Slot {
    pub(crate) fn new(guard: StreamGuard) -> Self {
        Self(Arc::new(Mutex::new(Some(Pending {
            shared: Arc::clone(guard.shared()),
            guard,
            started: Instant::now(),
            lifetime: None,
        }))))
    }

    /// The guard layer's maximum lifetime, applied to the socket.
    pub(crate) fn set_lifetime(&self, d: Duration) {
        if let Some(p) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            p.lifetime = Some(d);
        }
    }

    fn take(&self) -> Option<Pending> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// One WebSocket's place in the drain: counted as an open stream from the upgrade request until
/// this handle is dropped, told when to close, and holding its per-key lease, if any.
///
/// [`TrackLayer`](crate::track::TrackLayer) (alone or in [`DrainStack`](crate::DrainStack))
/// leaves one in the extensions of every upgrade request; the handler takes it with
/// [`take`](Self::take) (or axum's extractor, feature `axum-ws`) and moves it into the
/// socket's task. Dropping it — the task ended, returned early, panicked or was aborted — is
/// the only release, so the count is exact on every path. A handle that no handler takes is
/// released with the request.
///
/// See the [module docs](super) for the loop it is made for.
pub struct WsHandle {
    guard: Option<StreamGuard>,
    shared: Arc<Shared>,
    lifetime_at: Option<Instant>,
    code: u16,
    reason: Cow<'static, str>,
    state: State,
    closing: Pin<Box<WaitForCancellationFutureOwned>>,
    forced: Pin<Box<WaitForCancellationFutureOwned>>,
    spread: Option<Pin<Box<Sleep>>>,
    lifetime: Option<Pin<Box<Sleep>>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for `Closing` (or the lifetime).
    Watching,
    /// `Closing` began; waiting for this socket's share of the spread.
    Scheduled,
    /// `notified` resolved with this cause.
    Fired(CloseCause),
}

impl WsHandle {
    /// Takes the tracking handle of an upgrade request from its extensions (`None` if the
    /// request is not an upgrade, no track layer saw it, or it was taken already).
    ///
    /// ```
    /// # use tower::{Layer, ServiceExt};
    /// use tower_drain::{track::TrackLayer, ws::WsHandle, DrainController};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let drain = DrainController::new();
    /// let (tx, rx) = std::sync::mpsc::channel();
    /// let svc = TrackLayer::new(drain.watch()).layer(tower::service_fn(move |mut req: http::Request<()>| {
    ///     // A real handler moves the handle into the socket's task.
    ///     tx.send(WsHandle::take(req.extensions_mut())).unwrap();
    ///     async { Ok::<_, std::convert::Infallible>(http::Response::new(String::new())) }
    /// }));
    /// let req = http::Request::builder()
    ///     .header("connection", "upgrade")
    ///     .header("upgrade", "websocket")
    ///     .body(())
    ///     .unwrap();
    /// drop(svc.oneshot(req).await.unwrap()); // the (101) response is over
    /// assert_eq!(drain.active_streams(), 1); // the socket still counts
    /// let handle = rx.recv().unwrap().expect("an upgrade request carries a handle");
    /// drop(handle); // the socket's task ended
    /// assert_eq!(drain.active_streams(), 0);
    /// # }
    /// ```
    pub fn take(extensions: &mut http::Extensions) -> Option<Self> {
        let p = extensions.remove::<Slot>()?.take()?;
        Some(Self::new(p))
    }

    fn new(p: Pending) -> Self {
        let Pending {
            guard,
            shared,
            started,
            lifetime,
        } = p;
        Self {
            lifetime_at: lifetime.map(|d| started + d),
            closing: Box::pin(shared.closing_token().clone().cancelled_owned()),
            forced: Box::pin(shared.forced_token().clone().cancelled_owned()),
            guard: Some(guard),
            shared,
            code: GOING_AWAY,
            reason: Cow::Borrowed(DEFAULT_DRAIN_REASON),
            state: State::Watching,
            spread: None,
            lifetime: None,
        }
    }

    /// The close code and reason sent at a drain (default `1001` and
    /// [`DEFAULT_DRAIN_REASON`]); `1012 Service Restart` is the other usual choice.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming `close_code` for a code an endpoint may not send (only 1000–1003,
    /// 1007–1014 and 3000–4999 may be sent), or `close_reason` for a reason longer than 123
    /// bytes.
    pub fn close_frame(
        mut self,
        code: u16,
        reason: impl Into<Cow<'static, str>>,
    ) -> Result<Self, ConfigError> {
        let reason = reason.into();
        validate(code, &reason)?;
        self.code = code;
        self.reason = reason;
        Ok(self)
    }

    /// The close code sent at a drain.
    pub fn code(&self) -> u16 {
        self.code
    }

    /// The close reason sent at a drain.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// When the guard's maximum lifetime ends this socket, if it has one.
    pub fn lifetime_deadline(&self) -> Option<Instant> {
        self.lifetime_at
    }

    /// The close code and reason for `cause`.
    pub(crate) fn frame_for(&self, cause: CloseCause) -> (u16, &str) {
        match cause {
            CloseCause::Lifetime => (GOING_AWAY, LIFETIME_REASON),
            CloseCause::Drain | CloseCause::Deadline => (self.code, &self.reason),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Resolves when this socket must close: at its share of the drain spread
    /// ([`CloseCause::Drain`]), at the guard's maximum lifetime ([`CloseCause::Lifetime`]), or
    /// at the grace deadline if neither came first ([`CloseCause::Deadline`]). Then pass the
    /// cause to [`close`](super::close).
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe, made for `tokio::select!` in the socket's loop: the state (including the
    /// timer of the spread) lives in the handle, so a new `notified()` each turn of the loop
    /// loses nothing. Once resolved, it resolves at once with the same cause.
    pub fn notified(&mut self) -> Notified<'_> {
        Notified { handle: self }
    }

    fn poll_notified(&mut self, cx: &mut Context<'_>) -> Poll<CloseCause> {
        loop {
            match self.state {
                State::Fired(cause) => return Poll::Ready(cause),
                State::Watching => {
                    if self.forced.as_mut().poll(cx).is_ready() {
                        self.state = State::Fired(CloseCause::Deadline);
                        continue;
                    }
                    if self.closing.as_mut().poll(cx).is_ready() {
                        let (delay, _slot) = self.shared.take_slot();
                        if delay.is_zero() {
                            self.state = State::Fired(CloseCause::Drain);
                        } else {
                            self.spread = Some(Box::pin(tokio::time::sleep(delay)));
                            self.state = State::Scheduled;
                        }
                        continue;
                    }
                    if self.poll_lifetime(cx) {
                        self.state = State::Fired(CloseCause::Lifetime);
                        continue;
                    }
                    return Poll::Pending;
                }
                State::Scheduled => {
                    if self.forced.as_mut().poll(cx).is_ready() {
                        self.state = State::Fired(CloseCause::Deadline);
                        continue;
                    }
                    if let Some(s) = self.spread.as_mut() {
                        if s.as_mut().poll(cx).is_ready() {
                            self.spread = None;
                            self.state = State::Fired(CloseCause::Drain);
                            continue;
                        }
                    }
                    if self.poll_lifetime(cx) {
                        self.state = State::Fired(CloseCause::Lifetime);
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn poll_lifetime(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(at) = self.lifetime_at else {
            return false;
        };
        let sleep = self
            .lifetime
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        sleep.as_mut().poll(cx).is_ready()
    }

    /// Resolves at the grace deadline (at once if it has passed).
    pub(crate) fn forced(&mut self) -> &mut Pin<Box<WaitForCancellationFutureOwned>> {
        &mut self.forced
    }

    /// Ends the registration now (the socket is gone); dropping the handle does the same.
    pub(crate) fn release(&mut self) {
        self.guard.take();
    }
}

/// Whether `code` may be sent in a close frame and `reason` fits in one.
pub(crate) fn validate(code: u16, reason: &str) -> Result<(), ConfigError> {
    if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
        return Err(ConfigError::new(
            "close_code",
            format!("{code} may not be sent in a close frame (1000-1003, 1007-1014, 3000-4999)"),
        ));
    }
    if reason.len() > MAX_REASON {
        return Err(ConfigError::new(
            "close_reason",
            format!(
                "{} bytes, at most {MAX_REASON} fit in a close frame",
                reason.len()
            ),
        ));
    }
    Ok(())
}

impl fmt::Debug for WsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsHandle")
            .field("code", &self.code)
            .field("reason", &self.reason)
            .field("lifetime_at", &self.lifetime_at)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// The future of [`WsHandle::notified`].
#[must_use = "futures do nothing unless polled"]
pub struct Notified<'a> {
    handle: &'a mut WsHandle,
}

impl Future for Notified<'_> {
    type Output = CloseCause;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CloseCause> {
        self.handle.poll_notified(cx)
    }
}

impl fmt::Debug for Notified<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notified").finish_non_exhaustive()
    }
}
