//! Drain the *connections*, not only the responses: hyper connections driven by the drain
//! phases (feature `hyper`).
//!
//! The layers end every tracked stream with a final frame. The connections that carry them
//! need their own treatment, which only the code that owns them (the accept loop) can give.
//! [`Connections`] serves each accepted connection with hyper-util's auto builder (HTTP/1.1
//! and cleartext HTTP/2 with prior knowledge on one port) and walks it through the phases:
//!
//! | phase | HTTP/2 connection | HTTP/1.1 connection |
//! |---|---|---|
//! | `Serving`, `Draining` | served as usual | served as usual |
//! | `Closing` begins | GOAWAY at once (hyper's `graceful_shutdown`): clients send their next request elsewhere; the open streams still get their final frames within the spread and end with `END_STREAM` | **not** closed while idle: a request may already be on its way (RFC 9112 §9.3), and a client that does not retry would see a reset. Every response from now on carries `connection: close`, so the connection closes after it |
//! | `Stopped` | (already shutting down) | idle ones are closed; one with a request in flight closes after its response |
//! | hard deadline | dropped | dropped |
//!
//! A connection accepted during `Closing` gets the same treatment: an HTTP/2 one receives
//! GOAWAY as soon as its first request has arrived (that request is answered, with the
//! `503` or gRPC `UNAVAILABLE` of the reject layer, or by an exempt route such as a health
//! check; a GOAWAY sent right after the preface would race it, and clients such as hyper's
//! then fail the call with a transport error instead); an HTTP/1.1 one gets
//! `connection: close` on its response. A connection that has not sent a request yet is left
//! alone until `Stopped`, for the same reason as an idle HTTP/1.1 one.
//!
//! The protocol is known from the first bytes the client sends (the HTTP/2 connection
//! preface), observed as hyper reads them: no extra read, no buffering.
//!
//! # The hard deadline
//!
//! The grace deadline (or the moment [`DrainController::force_now`] cut the drain short, as
//! a second SIGTERM does) plus the controller's
//! [`force_linger`](crate::DrainBuilder::force_linger). Whatever connection is still open
//! then is dropped: streams whose forced frame could not be written because the client
//! stopped reading (full send buffers), requests the stack does not track, peers that never
//! finish a request. So [`serve`](Connections::serve) returns, and the process can exit,
//! within `force_linger` of the grace deadline whatever the clients do.
//!
//! Upgraded connections (WebSockets) leave hyper when the upgrade completes; from then on
//! they belong to the task that handles the socket, not to this module.
//!
//! # Accepting until `Stopped`
//!
//! By default the listener keeps accepting until `Stopped`
//! ([`AcceptUntil::Stopped`]): a client whose load balancer has not caught up yet still gets
//! a proper answer (`503` with `retry-after` and `connection: close`, or a gRPC
//! Trailers-Only `UNAVAILABLE` with a retry pushback) and its HTTP/2 connection gets
//! GOAWAY, instead of a refused connection, which many HTTP clients report as a hard error.
//! [`AcceptUntil::Closing`] closes the listener when `Closing` begins instead: connection
//! attempts are then refused at once, which suits clients that retry connection errors on
//! another address by themselves (gRPC channels with several backends) and saves the
//! round trip. Either way, new connections are refused after `Stopped`.
//!
//! # What `axum::serve` users get
//!
//! `axum::serve(..).with_graceful_shutdown(drain.stopped())` has no per-connection control:
//! at `Stopped` it stops accepting and sends GOAWAY / disables keep-alive, then waits for
//! every connection without a bound. HTTP/2 clients keep multiplexing onto the closing
//! server until `Stopped`, and a client that stopped reading holds the process until the
//! orchestrator kills it. Serve the axum `Router` with [`Connections::serve`] instead (it is
//! a tower service), as in the example below.
//!
//! # Example
//!
//! An axum `Router` under the stack; the same works for any tower service whose request
//! body is hyper's `Incoming` (a hyper `service_fn` wrapped in tower, tonic's `Routes`).
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use tower_drain::conn::Connections;
//! use tower_drain::{probe::Probes, DrainController, DrainStack};
//!
//! # #[tokio::main] async fn main() -> std::io::Result<()> {
//! let drain = DrainController::new();
//! drain.listen_for_signals(); // SIGTERM / SIGINT; a second one cuts the drain short
//!
//! let probes = Probes::new(drain.clone());
//! let app = Router::new()
//!     .route("/events", get(|| async { "..." }))
//!     .layer(DrainStack::new(drain.watch()))
//!     .route_service("/readyz", probes);
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! // Returns once every connection is closed: by `Stopped`, or dropped at the hard deadline.
//! Connections::new(drain.watch()).serve(listener, app).await;
//! println!("{}", serde_json::to_string(&drain.report().await).unwrap());
//! # Ok(()) }
//! ```
//!
//! [`DrainController::force_now`]: crate::DrainController::force_now

mod service;
mod sniff;

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tower_service::Service;

pub use self::service::{CloseOnDrain, CloseOnDrainFuture};

use self::sniff::{Proto, Sniff};
use crate::{BoxError, DrainWatch, Phase};

/// When [`Connections::serve`] stops accepting new connections; see the
/// [module docs](self#accepting-until-stopped).
///
/// ```
/// use tower_drain::conn::{AcceptUntil, Connections};
/// let drain = tower_drain::DrainController::new();
/// let conns = Connections::new(drain.watch()).accept_until(AcceptUntil::Closing);
/// assert_eq!(conns.accepts_until(), AcceptUntil::Closing);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AcceptUntil {
    /// Keep accepting until `Stopped` (the default): late clients get a proper `503` /
    /// `UNAVAILABLE` answer and GOAWAY rather than a refused connection.
    #[default]
    Stopped,
    /// Close the listener when `Closing` begins: late clients get a refused connection.
    Closing,
}

/// How a connection served by [`Connections::serve_connection`] ended.
///
/// ```
/// use tower_drain::conn::ConnectionEnd;
/// assert_ne!(ConnectionEnd::Closed, ConnectionEnd::Dropped);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionEnd {
    /// The connection ended normally: closed by either side or upgraded.
    Closed,
    /// hyper ended it with an error (a reset, a protocol error); logged at `debug`.
    Failed,
    /// Still open at the hard deadline, and dropped.
    Dropped,
}

/// Serves hyper connections and drives each one through the drain phases; see the
/// [module docs](self).
///
/// Cheap to clone (a [`DrainWatch`] and hyper-util's builder).
#[derive(Clone, Debug)]
#[must_use]
pub struct Connections {
    watch: DrainWatch,
    http: auto::Builder<TokioExecutor>,
    accept_until: AcceptUntil,
}

impl Connections {
    /// Connections driven by `watch`'s drain, served with hyper-util's auto builder
    /// (HTTP/1.1, and HTTP/2 with prior knowledge) on the tokio executor; accepting until
    /// `Stopped`.
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let conns = tower_drain::conn::Connections::new(drain.watch());
    /// # drop(conns);
    /// ```
    pub fn new(watch: DrainWatch) -> Self {
        Self {
            watch,
            http: auto::Builder::new(TokioExecutor::new()),
            accept_until: AcceptUntil::Stopped,
        }
    }

    /// hyper-util's builder, to tune HTTP/1.1 and HTTP/2 settings (keep-alive pings, window
    /// sizes, `http1_only`, …).
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let mut conns = tower_drain::conn::Connections::new(drain.watch());
    /// conns.http_builder().http2().max_concurrent_streams(500);
    /// ```
    pub fn http_builder(&mut self) -> &mut auto::Builder<TokioExecutor> {
        &mut self.http
    }

    /// When [`serve`](Self::serve) stops accepting (default [`AcceptUntil::Stopped`]).
    pub fn accept_until(mut self, at: AcceptUntil) -> Self {
        self.accept_until = at;
        self
    }

    /// The [`AcceptUntil`] setting.
    pub fn accepts_until(&self) -> AcceptUntil {
        self.accept_until
    }

    /// Serves one connection with `service`, driven through the phases (see the
    /// [module docs](self)); resolves when the connection is closed, or dropped at the hard
    /// deadline. Spawn it from your own accept loop (TLS, Unix sockets, …); [`serve`] is
    /// that loop for a `TcpListener`.
    ///
    /// Responses on HTTP/1.x carry `connection: close` from `Closing` on (see
    /// [`CloseOnDrain`]). Upgrades (WebSockets) are supported.
    ///
    /// [`serve`]: Self::serve
    ///
    /// ```no_run
    /// # use std::convert::Infallible;
    /// # use http::{Request, Response};
    /// # use hyper::body::Incoming;
    /// # #[tokio::main] async fn main() -> std::io::Result<()> {
    /// let drain = tower_drain::DrainController::new();
    /// let conns = tower_drain::conn::Connections::new(drain.watch());
    /// let svc = tower::service_fn(|_req: Request<Incoming>| async {
    ///     Ok::<_, Infallible>(Response::new(String::from("hello")))
    /// });
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// loop {
    ///     let (tcp, _) = listener.accept().await?;
    ///     tokio::spawn(conns.serve_connection(tcp, svc.clone()));
    /// }
    /// # }
    /// ```
    pub fn serve_connection<I, S, B>(
        &self,
        io: I,
        service: S,
    ) -> impl Future<Output = ConnectionEnd> + Send + 'static
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
    {
        let watch = self.watch.clone();
        let http = self.http.clone();
        async move {
            let proto = Arc::new(Proto::default());
            let io = TokioIo::new(Sniff::new(io, proto.clone()));
            let svc = CloseOnDrain::for_connection(
                TowerToHyperService::new(service),
                watch.clone(),
                proto.clone(),
            );
            // Accepted while closing: GOAWAY only once its first request is in, so that
            // request is answered (503 / UNAVAILABLE) rather than racing the GOAWAY.
            let late = watch.phase() >= Phase::Closing;
            let shared = watch.shared.clone();
            let mut conn = pin!(http.serve_connection_with_upgrades(io, svc));
            let mut closing = pin!(watch.closing());
            let mut stopped = pin!(watch.stopped());
            let mut hard = pin!(shared.hard_deadline());
            let (mut is_closing, mut is_stopped, mut shut) = (false, false, false);
            let end = poll_fn(|cx| {
                if hard.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                if !is_closing {
                    is_closing =
                        watch.phase() >= Phase::Closing || closing.as_mut().poll(cx).is_ready();
                }
                if !is_stopped {
                    is_stopped = stopped.as_mut().poll(cx).is_ready();
                }
                loop {
                    if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                        return Poll::Ready(Some(r));
                    }
                    // The protocol becomes known inside `conn.poll` (hyper reads the
                    // preface there), so this is checked after every poll of it.
                    let goaway =
                        is_closing && proto.get() == Proto::H2 && (!late || proto.saw_request());
                    if !shut && (goaway || is_stopped) {
                        shut = true;
                        tracing::debug!(
                            http2 = proto.get() == Proto::H2,
                            phase = watch.phase().as_str(),
                            "tower-drain shutting a connection down gracefully"
                        );
                        conn.as_mut().graceful_shutdown();
                        continue; // let it write the GOAWAY now
                    }
                    return Poll::Pending;
                }
            })
            .await;
            match end {
                Some(Ok(())) => ConnectionEnd::Closed,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "tower-drain connection ended with an error");
                    ConnectionEnd::Failed
                }
                None => {
                    tracing::debug!("tower-drain connection dropped at the hard deadline");
                    ConnectionEnd::Dropped
                }
            }
        }
    }

    /// Accepts connections from `listener` and serves each with
    /// [`serve_connection`](Self::serve_connection) on its own task, until `Stopped` (or
    /// `Closing`, see [`accept_until`](Self::accept_until)); then closes the listener and
    /// waits for the connections, which all end by the hard deadline at the latest.
    ///
    /// Accepted sockets get `TCP_NODELAY` (streams want each event on the wire at once).
    /// Accept errors (such as running out of file descriptors) are logged, and accepting
    /// resumes after 10 ms. Connections dropped at the hard deadline are logged once, as a
    /// count.
    ///
    /// See the [module docs](self) for an example.
    pub async fn serve<S, B>(self, listener: TcpListener, service: S)
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
    {
        let mut conns = tokio::task::JoinSet::new();
        let mut dropped = 0u64;
        let mut count = |r: Result<ConnectionEnd, _>| {
            if let Ok(ConnectionEnd::Dropped) = r {
                dropped += 1;
            }
        };
        {
            // One allocation per server, not per connection.
            let mut stop: Pin<Box<dyn Future<Output = ()> + Send>> = match self.accept_until {
                AcceptUntil::Stopped => Box::pin(self.watch.stopped()),
                AcceptUntil::Closing => Box::pin(self.watch.closing()),
            };
            loop {
                tokio::select! {
                    biased;
                    () = &mut stop => break,
                    Some(r) = conns.join_next(), if !conns.is_empty() => count(r),
                    r = listener.accept() => match r {
                        Ok((tcp, _)) => {
                            let _ = tcp.set_nodelay(true);
                            conns.spawn(self.serve_connection(tcp, service.clone()));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "tower-drain accept failed");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    },
                }
            }
        }
        drop(listener);
        tracing::debug!(
            connections = conns.len(),
            "tower-drain stopped accepting; waiting for connections"
        );
        while let Some(r) = conns.join_next().await {
            count(r);
        }
        if dropped > 0 {
            tracing::warn!(
                connections = dropped,
                "tower-drain dropped connections still open at the hard deadline"
            );
        }
    }
}
