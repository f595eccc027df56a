use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::StatusCode;
use tower_layer::Layer;

use super::breaker::Breaker;
use super::call::GuardCall;
use super::stream::GuardHook;
use crate::controller::{splitmix64, ConfigError};
use crate::frame::{FinalFrame, FrameConfig, Sse};
use crate::hook::{HookBody, HookService};
use crate::{BoxError, DrainWatch};

pub(crate) type CheckFuture = Pin<Box<dyn Future<Output = Result<bool, BoxError>> + Send>>;
pub(crate) type CheckFn = Arc<dyn Fn(&Parts) -> CheckFuture + Send + Sync>;
type FailureFn = Arc<dyn Fn(StatusCode) -> bool + Send + Sync>;

/// Default consecutive failures that open the circuit.
const DEFAULT_THRESHOLD: u32 = 5;
/// Default cool-down of an open circuit.
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(30);

/// Everything a [`Guard`], its futures and bodies need; one per layer, behind an `Arc`.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) frame: Arc<FrameConfig>,
    pub(crate) response_timeout: Option<Duration>,
    pub(crate) timeout_status: StatusCode,
    pub(crate) max_lifetime: Option<Duration>,
    pub(crate) lifetime_jitter: f64,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) heartbeat: Option<Duration>,
    pub(crate) revalidate: Option<(Duration, CheckFn)>,
    pub(crate) breaker: Option<Breaker>,
    /// Set by `probe_timeout`; else the breaker waits a cool-down for its probe.
    pub(crate) probe_timeout: Option<Duration>,
    pub(crate) breaker_status: StatusCode,
    pub(crate) is_failure: FailureFn,
    pub(crate) pass_errors: bool,
    seq: Arc<AtomicU64>,
    seed: u64,
}

impl Config {
    /// A number for a new stream (for logs) and a well-mixed value for its jitter and stagger.
    pub(crate) fn next_stream(&self) -> (u64, u64) {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        (n, self.jitter_of(n))
    }

    /// The mixed value of stream `n` (recomputed rather than stored per stream).
    pub(crate) fn jitter_of(&self, n: u64) -> u64 {
        splitmix64(self.seed ^ n)
    }
}

/// Timeouts, stream lifetime, idle limit and heartbeat, revalidation, and an error circuit
/// breaker. Builds [`Guard`].
///
/// Defaults: no response timeout (when set, `504` on expiry), no lifetime, idle or heartbeat
/// limit, no revalidation, the circuit breaker off (when on: 5 consecutive failures, 30 s
/// cool-down, `503` while open, `5xx` count as failures, the probe waited for a cool-down at
/// most; one breaker for every route under the layer), body errors end the stream with an error frame,
/// final frames and heartbeats in SSE. Settings that can be invalid return
/// `Result<Self, ConfigError>` naming the setting.
///
/// See the [module docs](super) for an example.
#[derive(Clone)]
#[must_use]
pub struct GuardLayer {
    cfg: Arc<Config>,
}

/// `d` if it is neither zero nor over [`MAX_DURATION`](crate::controller::MAX_DURATION).
fn non_zero(setting: &'static str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        Err(ConfigError::new(setting, "must be greater than zero"))
    } else {
        crate::controller::at_most_max(setting, d)
    }
}

impl GuardLayer {
    /// A guard with the defaults (only clean stream errors are on), reporting to `watch`'s
    /// controller (metrics, reconnect hints of final frames).
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::new(drain.watch());
    /// assert!(layer.breaker().is_none()); // the breaker is opt-in
    /// ```
    pub fn new(watch: DrainWatch) -> Self {
        let shared = watch.shared;
        let seed = crate::controller::random_seed();
        Self {
            cfg: Arc::new(Config {
                frame: Arc::new(FrameConfig {
                    shared,
                    encoder: Arc::new(Sse::new()),
                }),
                response_timeout: None,
                timeout_status: StatusCode::GATEWAY_TIMEOUT,
                max_lifetime: None,
                lifetime_jitter: 0.0,
                idle_timeout: None,
                heartbeat: None,
                revalidate: None,
                breaker: None,
                probe_timeout: None,
                breaker_status: StatusCode::SERVICE_UNAVAILABLE,
                is_failure: Arc::new(|s: StatusCode| s.is_server_error()),
                pass_errors: false,
                seq: Arc::new(AtomicU64::new(1)),
                seed,
            }),
        }
    }

    fn cfg(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.cfg)
    }

    /// The inner service must produce response headers within `d`, else the inner future is
    /// dropped and the client gets [`timeout_status`](Self::timeout_status) (default `504`),
    /// counted as `timeouts_total{kind="response"}` and as a breaker failure. Off by default.
    ///
    /// A response that is ready at the same instant as the deadline wins (the inner future is
    /// polled first, as in tower's `Timeout`).
    ///
    /// # Errors
    ///
    /// `d` is zero or longer than [`MAX_DURATION`](crate::controller::MAX_DURATION).
    ///
    /// ```
    /// use std::time::Duration;
    /// let drain = tower_drain::DrainController::new();
    /// let err = tower_drain::guard::GuardLayer::new(drain.watch())
    ///     .response_timeout(Duration::ZERO).unwrap_err();
    /// assert_eq!(err.setting(), "response_timeout");
    /// ```
    pub fn response_timeout(mut self, d: Duration) -> Result<Self, ConfigError> {
        self.cfg().response_timeout = Some(non_zero("response_timeout", d)?);
        Ok(self)
    }

    /// The status of the answer to a response timeout (default `504 Gateway Timeout`).
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::new(drain.watch())
    ///     .timeout_status(http::StatusCode::REQUEST_TIMEOUT);
    /// # drop(layer);
    /// ```
    pub fn timeout_status(mut self, status: StatusCode) -> Self {
        self.cfg().timeout_status = status;
        self
    }

    /// A stream older than `d` (counted from the request) receives the final *timeout* frame
    /// at its next event boundary and ends cleanly; `timeouts_total{kind="lifetime"}`. Off by
    /// default.
    ///
    /// # Errors
    ///
    /// `d` is zero or longer than [`MAX_DURATION`](crate::controller::MAX_DURATION).
    ///
    /// ```
    /// use std::time::Duration;
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::new(drain.watch())
    ///     .max_lifetime(Duration::from_secs(1800)).unwrap();
    /// # drop(layer);
    /// ```
    pub fn max_lifetime(mut self, d: Duration) -> Result<Self, ConfigError> {
        self.cfg().max_lifetime = Some(non_zero("max_lifetime", d)?);
        Ok(self)
    }

    /// Shortens each stream's lifetime by a random fraction of up to `fraction`
    /// (`0 ≤ fraction < 1`, default 0), so streams opened together do not all expire together.
    /// A stream never lives longer than [`max_lifetime`](Self::max_lifetime).
    ///
    /// # Errors
    ///
    /// `fraction` is outside `0..1`.
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::new(drain.watch()).lifetime_jitter(0.1).unwrap();
    /// # drop(layer);
    /// ```
    pub fn lifetime_jitter(mut self, fraction: f64) -> Result<Self, ConfigError> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(ConfigError::new(
                "lifetime_jitter",
                "must be at least 0 and less than 1",
            ));
        }
        self.cfg().lifetime_jitter = fraction;
        Ok(self)
    }

    /// A stream whose inner body produces no frame for `d` receives the final *timeout* frame
    /// and ends cleanly; `timeouts_total{kind="idle"}`. Off by default. Heartbeats do not count
    /// as activity here: combine both to keep proxies happy while still ending a stream whose
    /// source went silent.
    ///
    /// # Errors
    ///
    /// `d` is zero or longer than [`MAX_DURATION`](crate::controller::MAX_DURATION).
    ///
    /// ```
    /// use std::time::Duration;
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::new(drain.watch())
    ///     .idle_timeout(Duration::from_secs(300)).unwrap();
    /// # drop(layer);
    /// ```
    pub fn idle_timeout(mut self, d: Duration) -> Result<Self, ConfigError> {
        self.cfg().idle_timeout = Some(non_zero("idle_timeout", d)?);
        Ok(self)
    }

    /// After `d` without anything sent, inject the encoder's keep-alive
    /// ([`FinalFrame::heartbeat`](crate::frame::FinalFrame::heartbeat)) at an event boundary:
    /// an SSE comment (`:\n\n`) or, for NDJSON, the record `{"type":"heartbeat"}\n`, so
    /// proxies keep the connection open. Protocols without an in-band keep-alive (gRPC: use
    /// HTTP/2 PING) get none. Off by default.
    ///
    /// # Errors
    ///
    /// `d` is zero or longer than [`MAX_DURATION`](crate::controller::MAX_DURATION).
    ///
    /// ```
    /// use std::time::Duration;
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::new(drain.watch())
    ///     .heartbeat(Duration::from_secs(15)).unwrap();
    /// # drop(layer);
    /// ```
    pub fn heartbeat(mut self, d: Duration) -> Result<Self, ConfigError> {
        self.cfg().heartbeat = Some(non_zero("heartbeat", d)?);
        Ok(self)
    }

    /// Runs `check` with the request's parts about every `every` while a stream is open (for
    /// example: is this bearer token still valid?). `Ok(false)` ends the stream with the final
    /// *unauthorized* frame; `Err` is logged and counted as a breaker failure, and the stream
    /// goes on. The check runs inside the body's `poll_frame` (no task per stream); each
    /// stream's first check comes after a random 50–100 % of `every`, so streams opened
    /// together are not all checked in the same instant.
    ///
    /// # Errors
    ///
    /// `every` is zero or longer than [`MAX_DURATION`](crate::controller::MAX_DURATION).
    ///
    /// ```
    /// use std::time::Duration;
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::new(drain.watch())
    ///     .revalidate(Duration::from_secs(60), |parts: &http::request::Parts| {
    ///         let token = parts.headers.get("authorization").cloned();
    ///         async move { Ok::<_, std::convert::Infallible>(token.is_some()) }
    ///     })
    ///     .unwrap();
    /// # drop(layer);
    /// ```
    pub fn revalidate<F, Fut, E>(mut self, every: Duration, check: F) -> Result<Self, ConfigError>
    where
        F: Fn(&Parts) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<bool, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let every = non_zero("revalidate", every)?;
        let check: CheckFn = Arc::new(move |parts: &Parts| {
            let fut = check(parts);
            Box::pin(async move { fut.await.map_err(Into::into) }) as CheckFuture
        });
        self.cfg().revalidate = Some((every, check));
        Ok(self)
    }

    /// Turns the circuit breaker on or off (off by default). One breaker covers every route
    /// under this layer; see [`Breaker`] for its scope and how to have one per route.
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::new(drain.watch()).circuit_breaker(false);
    /// assert!(layer.breaker().is_none());
    /// ```
    pub fn circuit_breaker(mut self, on: bool) -> Self {
        if on == self.cfg.breaker.is_some() {
            return self;
        }
        let (threshold, cooldown) = self.breaker_settings();
        self.cfg().breaker = None;
        if on {
            self.set_breaker(threshold, cooldown);
        }
        self
    }

    fn breaker_settings(&self) -> (u32, Duration) {
        self.cfg
            .breaker
            .as_ref()
            .map(|b| (b.threshold(), b.cooldown()))
            .unwrap_or((DEFAULT_THRESHOLD, DEFAULT_COOLDOWN))
    }

    /// (Re)creates the breaker with these settings and the probe timeout (default: the
    /// cool-down).
    fn set_breaker(&mut self, threshold: u32, cooldown: Duration) {
        let probe = self.cfg.probe_timeout.unwrap_or(cooldown);
        let metrics = self.cfg.frame.shared.metrics.clone();
        self.cfg().breaker = Some(Breaker::new(threshold, cooldown, probe, metrics));
    }

    /// Consecutive failures that open the circuit (default 5). Turns the breaker on.
    ///
    /// # Errors
    ///
    /// `n` is zero.
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let err = tower_drain::guard::GuardLayer::new(drain.watch()).failure_threshold(0).unwrap_err();
    /// assert_eq!(err.setting(), "failure_threshold");
    /// ```
    pub fn failure_threshold(mut self, n: u32) -> Result<Self, ConfigError> {
        if n == 0 {
            return Err(ConfigError::new(
                "failure_threshold",
                "must be greater than zero",
            ));
        }
        let (_, cooldown) = self.breaker_settings();
        self.set_breaker(n, cooldown);
        Ok(self)
    }

    /// How long an open circuit answers `503` before letting one probe through (default 30 s).
    /// Turns the breaker on.
    ///
    /// # Errors
    ///
    /// `d` is zero or longer than [`MAX_DURATION`](crate::controller::MAX_DURATION).
    ///
    /// ```
    /// use std::time::Duration;
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::new(drain.watch())
    ///     .cooldown(Duration::from_secs(10)).unwrap();
    /// assert_eq!(layer.breaker().unwrap().cooldown(), Duration::from_secs(10));
    /// ```
    pub fn cooldown(mut self, d: Duration) -> Result<Self, ConfigError> {
        let d = non_zero("cooldown", d)?;
        let (threshold, _) = self.breaker_settings();
        self.set_breaker(threshold, d);
        Ok(self)
    }

    /// How long the half-open probe's outcome is waited for (default: the cool-down). A probe
    /// whose response has not arrived by then (a hung handler, a long poll) counts as a
    /// failure: the circuit opens for another cool-down and the next probe follows it, so no
    /// single request can hold the circuit half-open. Turns the breaker on.
    ///
    /// # Errors
    ///
    /// `d` is zero or longer than [`MAX_DURATION`](crate::controller::MAX_DURATION).
    ///
    /// ```
    /// use std::time::Duration;
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::new(drain.watch())
    ///     .probe_timeout(Duration::from_secs(2)).unwrap();
    /// assert_eq!(layer.breaker().unwrap().probe_timeout(), Duration::from_secs(2));
    /// ```
    pub fn probe_timeout(mut self, d: Duration) -> Result<Self, ConfigError> {
        let d = non_zero("probe_timeout", d)?;
        self.cfg().probe_timeout = Some(d);
        let (threshold, cooldown) = self.breaker_settings();
        self.set_breaker(threshold, cooldown);
        Ok(self)
    }

    /// The status of the answer while the circuit is open (default `503 Service
    /// Unavailable`); it carries `retry-after` with the rest of the cool-down.
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::new(drain.watch())
    ///     .breaker_status(http::StatusCode::TOO_MANY_REQUESTS);
    /// # drop(layer);
    /// ```
    pub fn breaker_status(mut self, status: StatusCode) -> Self {
        self.cfg().breaker_status = status;
        self
    }

    /// Which response statuses count as breaker failures (default: `5xx`).
    ///
    /// ```
    /// use http::StatusCode;
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::new(drain.watch())
    ///     .failure_status(|s: StatusCode| s.is_server_error() && s != StatusCode::NOT_IMPLEMENTED);
    /// # drop(layer);
    /// ```
    pub fn failure_status<F>(mut self, f: F) -> Self
    where
        F: Fn(StatusCode) -> bool + Send + Sync + 'static,
    {
        self.cfg().is_failure = Arc::new(f);
        self
    }

    /// When the inner body yields an error mid-stream: `false` (the default) sends the final
    /// *error* frame at an event boundary and ends the body cleanly instead of resetting it
    /// (mid-record no whole frame can go out, so the error is passed on and the response is
    /// aborted); `true` always passes the error on. Either way the error is
    /// logged with the stream's number and path, counted in `stream_errors_total` and as a
    /// breaker failure.
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::new(drain.watch()).pass_through_errors(true);
    /// # drop(layer);
    /// ```
    pub fn pass_through_errors(mut self, yes: bool) -> Self {
        self.cfg().pass_errors = yes;
        self
    }

    /// Final frames and heartbeats for the protocol of `encoder` instead of SSE
    /// ([`NdJson`](crate::frame::NdJson), [`Grpc`](crate::frame::Grpc), …). Only responses the
    /// encoder applies to (by content type, or with [`Inject`](crate::frame::Inject)) get
    /// lifetime/idle limits, heartbeats, revalidation and error frames.
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::new(drain.watch())
    ///     .encoder(tower_drain::frame::NdJson::new());
    /// # drop(layer);
    /// ```
    pub fn encoder(mut self, encoder: impl FinalFrame) -> Self {
        let shared = self.cfg.frame.shared.clone();
        self.cfg().frame = Arc::new(FrameConfig {
            shared,
            encoder: Arc::new(encoder),
        });
        self
    }

    /// Shares a frame layer's encoder (used by `DrainStack`).
    pub(crate) fn frame_config(mut self, frame: Arc<FrameConfig>) -> Self {
        self.cfg().frame = frame;
        self
    }

    /// Whether this layer's final frames come from `frame` (the same configuration).
    pub(crate) fn shares_frame_config(&self, frame: &Arc<FrameConfig>) -> bool {
        Arc::ptr_eq(&self.cfg.frame, frame)
    }

    /// The circuit breaker shared by every service this layer builds, or `None` when it is off.
    /// Configure first: changing the breaker's settings replaces it.
    ///
    /// ```
    /// use tower_drain::guard::{BreakerState, GuardLayer};
    /// let layer = GuardLayer::new(tower_drain::DrainController::new().watch());
    /// assert!(layer.breaker().is_none()); // off by default
    /// let layer = layer.circuit_breaker(true);
    /// assert_eq!(layer.breaker().unwrap().state(), BreakerState::Closed);
    /// ```
    pub fn breaker(&self) -> Option<Breaker> {
        self.cfg.breaker.clone()
    }
}

impl GuardLayer {
    /// The call hook of this layer.
    pub(crate) fn call(&self) -> GuardCall {
        GuardCall {
            cfg: self.cfg.clone(),
        }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HookService::new(inner, Arc::new(self.call()))
    }
}

/// The service built by [`GuardLayer`]: the inner service with the guard's call hook.
pub type Guard<S> = HookService<S, GuardCall>;

/// The response body of [`Guard`]: for streaming responses of the configured protocol it
/// enforces the maximum lifetime and the idle limit, injects heartbeats, runs revalidation
/// checks, and turns a mid-stream error into the final error frame, each only at an event
/// boundary. Every timer of a stream shares one pinned `Sleep`, moved with `Sleep::reset` only
/// when it fires; nothing is allocated per forwarded frame. Other responses pass through (an
/// error still counts for the breaker).
pub type GuardedBody<B> = HookBody<B, GuardHook>;

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardConfig")
            .field("response_timeout", &self.response_timeout)
            .field("timeout_status", &self.timeout_status)
            .field("max_lifetime", &self.max_lifetime)
            .field("lifetime_jitter", &self.lifetime_jitter)
            .field("idle_timeout", &self.idle_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("revalidate", &self.revalidate.as_ref().map(|r| r.0))
            .field("breaker", &self.breaker)
            .field("breaker_status", &self.breaker_status)
            .field("pass_through_errors", &self.pass_errors)
            .field("boundary", &self.frame.encoder.boundary())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for GuardLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("GuardLayer").field(&self.cfg).finish()
    }
}
