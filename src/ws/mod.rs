//! WebSockets drain too: an upgraded connection counts as a stream from its upgrade request
//! until its task ends, and is closed with `1001 Going Away` at its share of the drain spread.
//!
//! A middleware cannot take hyper's `OnUpgrade` out of a request without starving the
//! handler's own upgrade (axum's `WebSocketUpgrade`, or hyper's `upgrade::on`), so the tracking
//! is cooperative:
//!
//! 1. [`TrackLayer`](crate::track::TrackLayer) (alone or in [`DrainStack`](crate::DrainStack))
//!    recognises an upgrade request — HTTP/1.1 `Upgrade: websocket`, or any HTTP/2 `CONNECT`
//!    (an extended CONNECT's `:protocol` is kept by hyper in its own extension type, which this
//!    crate does not depend on) — registers it as a stream, applies the per-key limit
//!    (`429` over it), and leaves a [`WsHandle`] in the request's extensions instead of tying the
//!    registration to the response body (a `101` has an empty body, which would end it at once).
//! 2. The handler takes the handle ([`WsHandle::take`], or the axum extractor with feature
//!    `axum-ws`) and moves it into the socket's task. The socket counts in
//!    [`active_streams`](crate::DrainController::active_streams), `streams_at_drain` and the
//!    [`ShutdownReport`](crate::ShutdownReport) until the handle is dropped, on every path
//!    (end, error, panic, abort). A handle no handler takes is released with the request.
//! 3. The socket's loop selects on [`WsHandle::notified`] next to its own work. It resolves at
//!    the socket's share of the drain spread, at the guard's
//!    [`max_lifetime`](crate::guard::GuardBuilder::max_lifetime), or at the grace deadline, and
//!    [`close`] then does the rest: it sends `Close(1001, reason)` (configurable with
//!    [`WsHandle::close_frame`]) — between messages, since the loop is not inside a send when
//!    the branch is taken —, waits for the peer's close frame until the grace deadline, and
//!    drops the socket. A socket still open at the deadline is dropped and counted as
//!    `force_closed`; one that ended before counts as `closed_gracefully`; a delivered close
//!    frame counts as `notified` (report and `tower_drain_notified_total`).
//!
//! [`close`] works on any [`DrainSocket`]; this crate implements it for axum's `WebSocket`
//! (feature `axum-ws`) and tokio-tungstenite's `WebSocketStream` (feature `tungstenite`).
//!
//! # Limits, idle and heartbeat
//!
//! The per-key limit applies at the upgrade request, and the socket holds its slot (lease)
//! until its handle drops. The guard's `max_lifetime` (without its lifetime jitter) ends a
//! socket with
//! `Close(1001, "maximum connection lifetime reached, reconnect")`, after which it waits up to
//! [`LIFETIME_CLOSE_TIMEOUT`] for the peer. The guard's idle timeout and heartbeat are not
//! applied to sockets: they act on response-body frames, and after the upgrade no body is
//! left. WebSocket keep-alive is ping/pong, which axum and tungstenite already answer; a server
//! that wants to detect dead peers sends its own `Ping` on a timer in the same loop.
//!
//! # Rejection
//!
//! An upgrade attempted while `Closing` is answered `503` + `retry-after` by the reject layer,
//! as any request. Browsers do not expose a failed handshake's status: the page sees an
//! `error` event and a `close` event with code `1006` and `wasClean === false`. A client should
//! therefore treat `1001` (and `1012`) as "reconnect now, probably to another server" and
//! `1006` as "reconnect with backoff and jitter"; both end up on a server that is not draining.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
//! use axum::{response::Response, routing::get, Router};
//! use tower_drain::ws::{self, WsHandle};
//! use tower_drain::{DrainController, DrainStack};
//!
//! async fn handler(upgrade: WebSocketUpgrade, handle: WsHandle) -> Response {
//!     upgrade.on_upgrade(move |socket| ticks(socket, handle))
//! }
//!
//! async fn ticks(mut socket: WebSocket, mut handle: WsHandle) {
//!     let mut every = tokio::time::interval(Duration::from_secs(1));
//!     loop {
//!         tokio::select! {
//!             cause = handle.notified() => {
//!                 ws::close(socket, handle, cause).await;
//!                 return;
//!             }
//!             _ = every.tick() => {
//!                 if socket.send(Message::text("tick")).await.is_err() {
//!                     return; // the peer left; dropping `handle` releases the stream
//!                 }
//!             }
//!             msg = socket.recv() => match msg {
//!                 Some(Ok(_)) => {}
//!                 _ => return,
//!             },
//!         }
//!     }
//! }
//!
//! # #[tokio::main] async fn main() {
//! let drain = DrainController::new();
//! let app: Router = Router::new()
//!     .route("/ws", get(handler))
//!     .layer(DrainStack::new(drain.watch()));
//! # let _ = app;
//! # }
//! ```

mod handle;

#[cfg(feature = "axum-ws")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum-ws")))]
mod axum;
#[cfg(feature = "tungstenite")]
#[cfg_attr(docsrs, doc(cfg(feature = "tungstenite")))]
mod tungstenite;

use std::future::Future;
use std::time::Duration;

use http::request::Parts;
use http::{header, Method, Version};

pub(crate) use self::handle::Slot;
pub use self::handle::{
    CloseCause, Closed, Notified, WsHandle, DEFAULT_DRAIN_REASON, GOING_AWAY,
    LIFETIME_CLOSE_TIMEOUT, LIFETIME_REASON,
};

use crate::track::StreamGuard;

/// How long [`close`] tries to hand a close frame to a socket at the grace deadline before it
/// drops it anyway (a peer that stopped reading would hold the send forever).
const FORCED_SEND: Duration = Duration::from_millis(100);

/// A WebSocket that [`close`] can close: send a close frame, then read until the peer's.
///
/// Implemented for axum's `WebSocket` (feature `axum-ws`) and tokio-tungstenite's
/// `WebSocketStream` (feature `tungstenite`); implement it for another socket type to use
/// [`close`] with it.
pub trait DrainSocket {
    /// Sends a close frame with `code` and `reason` and flushes it; `false` if the socket
    /// failed or is closed already.
    fn send_close(&mut self, code: u16, reason: &str) -> impl Future<Output = bool> + Send;

    /// Reads (and discards) messages until the peer's close frame (`true`) or the end of the
    /// socket (`false`).
    fn recv_close(&mut self) -> impl Future<Output = bool> + Send;
}

/// Closes `socket` for `cause` (from [`WsHandle::notified`]) and releases its registration.
///
/// - [`CloseCause::Drain`]: sends the handle's close frame (`1001` by default), waits for the
///   peer's close frame until the grace deadline, then drops the socket. Unanswered at the
///   deadline: dropped, and counted as force-closed in the report.
/// - [`CloseCause::Lifetime`]: sends `Close(1001, LIFETIME_REASON)` and waits up to
///   [`LIFETIME_CLOSE_TIMEOUT`] (or the grace deadline of a drain under way).
/// - [`CloseCause::Deadline`]: tries the close frame for at most 100 ms, then drops the socket.
///
/// The socket is dropped before the handle, so the stream counts until its connection is
/// closed.
pub async fn close<S: DrainSocket>(
    mut socket: S,
    mut handle: WsHandle,
    cause: CloseCause,
) -> Closed {
    let shared = handle.shared().clone();
    let (code, reason) = handle.frame_for(cause);
    let reason = reason.to_owned();
    if cause == CloseCause::Lifetime {
        shared.metrics.timeouts_lifetime.increment(1);
    }
    tracing::debug!(code, reason = %reason, ?cause, "tower-drain closing WebSocket");
    let outcome = if cause == CloseCause::Deadline {
        if let Ok(true) = tokio::time::timeout(FORCED_SEND, socket.send_close(code, &reason)).await
        {
            shared.count_notified();
        }
        Closed::Forced
    } else {
        let exchange = async {
            if !socket.send_close(code, &reason).await {
                return Closed::PeerGone;
            }
            if cause == CloseCause::Drain {
                shared.count_notified();
            }
            if socket.recv_close().await {
                Closed::Clean
            } else {
                Closed::PeerGone
            }
        };
        let limit = async {
            match cause {
                CloseCause::Lifetime => tokio::time::sleep(LIFETIME_CLOSE_TIMEOUT).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = handle.forced().as_mut() => Closed::Forced,
            r = exchange => r,
            _ = limit => Closed::Forced,
        }
    };
    tracing::debug!(outcome = ?outcome, "tower-drain WebSocket closed");
    // The connection first, then its registration.
    drop(socket);
    handle.release();
    outcome
}

/// Whether `parts` may be an upgrade (a cheap test before [`is_upgrade`]).
#[inline]
pub(crate) fn may_upgrade(parts: &Parts) -> bool {
    parts.method == Method::CONNECT || parts.headers.contains_key(header::UPGRADE)
}

/// Whether `parts` asks for a WebSocket (or, over HTTP/2, any `CONNECT`).
pub(crate) fn is_upgrade(parts: &Parts) -> bool {
    if parts.method == Method::CONNECT && parts.version == Version::HTTP_2 {
        return true;
    }
    parts.headers.get_all(header::UPGRADE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
        })
    })
}

/// The track hook's step for an upgrade request: the registration goes into a [`Slot`] in the
/// request's extensions (for the socket's [`WsHandle`]) instead of the response body. Other
/// requests keep it.
#[inline]
pub(crate) fn hand_over(parts: &mut Parts, guard: StreamGuard) -> Option<StreamGuard> {
    if !may_upgrade(parts) || !is_upgrade(parts) {
        return Some(guard);
    }
    parts.extensions.insert(Slot::new(guard));
    None
}

/// The guard's step: a tracked upgrade request gets the guard's maximum lifetime.
#[inline]
pub(crate) fn set_lifetime(parts: &Parts, d: Duration) {
    if let Some(slot) = parts.extensions.get::<Slot>() {
        slot.set_lifetime(d);
    }
}

#[cfg(test)]
mod tests;
