//! [`GuardBuilder`]: a guard's settings, checked once by [`build`](GuardBuilder::build).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::StatusCode;

use super::config::{CheckFn, CheckFuture, Config, FailureFn, Settings};
use super::layer::GuardLayer;
use crate::controller::{setters, ConfigError};
use crate::frame::{FinalFrame, FrameConfig};
use crate::{BoxError, DrainWatch};

/// Builds a [`GuardLayer`]: timeouts, stream lifetime, idle limit and heartbeat,
/// revalidation, and an error circuit breaker. The setters only record their value;
/// [`build`](Self::build) checks them all and fails with a [`ConfigError`] naming the first
/// invalid setting.
///
/// | setting | default |
/// |---|---|
/// | [`response_timeout`](Self::response_timeout) | off (when set, [`timeout_status`](Self::timeout_status) `504` on expiry) |
/// | [`max_lifetime`](Self::max_lifetime) | off |
/// | [`lifetime_jitter`](Self::lifetime_jitter) | 0 |
/// | [`idle_timeout`](Self::idle_timeout) | off |
/// | [`first_frame_timeout`](Self::first_frame_timeout) | off |
/// | [`heartbeat`](Self::heartbeat) | off |
/// | [`revalidate`](Self::revalidate) | off |
/// | [`circuit_breaker`](Self::circuit_breaker) | off |
/// | [`failure_threshold`](Self::failure_threshold) | 5 |
/// | [`cooldown`](Self::cooldown) | 30 s |
/// | [`probe_timeout`](Self::probe_timeout) | the cool-down |
/// | [`breaker_status`](Self::breaker_status) | `503` |
/// | [`failure_status`](Self::failure_status) | `5xx` |
/// | [`pass_through_errors`](Self::pass_through_errors) | `false` (an error frame and a clean end) |
/// | [`encoder`](Self::encoder) | [`Sse`](crate::frame::Sse) |
///
/// One breaker covers every route under the built layer; see [`Breaker`](super::Breaker) for its scope and how
/// to have one per route.
///
/// ```
/// use std::time::Duration;
/// use tower_drain::{DrainController, guard::GuardLayer};
///
/// let drain = DrainController::new();
/// let guard = GuardLayer::builder(drain.watch())
///     .max_lifetime(Duration::from_secs(1800))
///     .heartbeat(Duration::from_secs(15))
///     .build()
///     .unwrap();
/// # drop(guard);
///
/// let err = GuardLayer::builder(drain.watch()).heartbeat(Duration::ZERO).build().unwrap_err();
/// assert_eq!(err.setting(), "heartbeat");
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct GuardBuilder {
    settings: Settings,
}

impl GuardBuilder {
    setters! {
        /// The inner service must produce response headers within `d`, else the inner future is
        /// dropped and the client gets [`timeout_status`](Self::timeout_status) (default `504`),
        /// counted as `timeouts_total{kind="response"}` and as a breaker failure. Off by default.
        ///
        /// A response that is ready at the same instant as the deadline wins (the inner future is
        /// polled first, as in tower's `Timeout`). [`build`](Self::build) fails if `d` is zero or
        /// longer than [`MAX_DURATION`](crate::controller::MAX_DURATION).
        ///
        /// ```
        /// use std::time::Duration;
        /// let drain = tower_drain::DrainController::new();
        /// let err = tower_drain::guard::GuardLayer::builder(drain.watch())
        ///     .response_timeout(Duration::ZERO)
        ///     .build()
        ///     .unwrap_err();
        /// assert_eq!(err.setting(), "response_timeout");
        /// ```
        response_timeout(d: Duration) => settings.response_timeout = Some(d);

        /// The status of the answer to a response timeout (default `504 Gateway Timeout`).
        ///
        /// ```
        /// let drain = tower_drain::DrainController::new();
        /// let layer = tower_drain::guard::GuardLayer::builder(drain.watch())
        ///     .timeout_status(http::StatusCode::REQUEST_TIMEOUT)
        ///     .build()
        ///     .unwrap();
        /// # drop(layer);
        /// ```
        timeout_status(status: StatusCode) => settings.timeout_status = status;

        /// A stream older than `d` (counted from the request) receives the final *timeout* frame
        /// at its next event boundary and ends cleanly; `timeouts_total{kind="lifetime"}`. Off by
        /// default. [`build`](Self::build) fails if `d` is zero or longer than
        /// [`MAX_DURATION`](crate::controller::MAX_DURATION).
        ///
        /// ```
        /// use std::time::Duration;
        /// let drain = tower_drain::DrainController::new();
        /// let layer = tower_drain::guard::GuardLayer::builder(drain.watch())
        ///     .max_lifetime(Duration::from_secs(1800))
        ///     .build()
        ///     .unwrap();
        /// # drop(layer);
        /// ```
        max_lifetime(d: Duration) => settings.max_lifetime = Some(d);

        /// Shortens each stream's lifetime by a random fraction of up to `fraction`
        /// (`0 ≤ fraction < 1`, default 0), so streams opened together do not all expire together.
        /// A stream never lives longer than [`max_lifetime`](Self::max_lifetime).
        /// [`build`](Self::build) fails if `fraction` is outside `0..1`.
        ///
        /// ```
        /// let drain = tower_drain::DrainController::new();
        /// let b = || tower_drain::guard::GuardLayer::builder(drain.watch());
        /// assert!(b().lifetime_jitter(0.1).build().is_ok());
        /// assert_eq!(b().lifetime_jitter(1.0).build().unwrap_err().setting(), "lifetime_jitter");
        /// ```
        lifetime_jitter(fraction: f64) => settings.lifetime_jitter = fraction;

        /// A stream whose inner body produces no frame for `d` receives the final *timeout* frame
        /// and ends cleanly; `timeouts_total{kind="idle"}`. Off by default. Heartbeats do not count
        /// as activity here: combine both to keep proxies happy while still ending a stream whose
        /// source went silent. [`build`](Self::build) fails if `d` is zero or longer than
        /// [`MAX_DURATION`](crate::controller::MAX_DURATION).
        ///
        /// ```
        /// use std::time::Duration;
        /// let drain = tower_drain::DrainController::new();
        /// let layer = tower_drain::guard::GuardLayer::builder(drain.watch())
        ///     .idle_timeout(Duration::from_secs(300))
        ///     .build()
        ///     .unwrap();
        /// # drop(layer);
        /// ```
        idle_timeout(d: Duration) => settings.idle_timeout = Some(d);

        /// A stream whose inner body produces no frame at all within `d` of the request (a
        /// subscription that never gets going) receives the final *timeout* frame and ends
        /// cleanly; `timeouts_total{kind="idle"}`. Once the first frame is out, only
        /// [`idle_timeout`](Self::idle_timeout) watches the silences. Off by default.
        /// [`build`](Self::build) fails if `d` is zero or longer than
        /// [`MAX_DURATION`](crate::controller::MAX_DURATION).
        ///
        /// ```
        /// use std::time::Duration;
        /// let drain = tower_drain::DrainController::new();
        /// let layer = tower_drain::guard::GuardLayer::builder(drain.watch())
        ///     .first_frame_timeout(Duration::from_secs(10))
        ///     .build()
        ///     .unwrap();
        /// # drop(layer);
        /// ```
        first_frame_timeout(d: Duration) => settings.first_frame_timeout = Some(d);

        /// After `d` without anything sent, inject the encoder's keep-alive
        /// ([`FinalFrame::heartbeat`](crate::frame::FinalFrame::heartbeat)) at an event boundary:
        /// an SSE comment (`:\n\n`) or, for NDJSON, the record `{"type":"heartbeat"}\n`, so
        /// proxies keep the connection open. Protocols without an in-band keep-alive (gRPC: use
        /// HTTP/2 PING) get none. Off by default. [`build`](Self::build) fails if `d` is zero or
        /// longer than [`MAX_DURATION`](crate::controller::MAX_DURATION).
        ///
        /// ```
        /// use std::time::Duration;
        /// let drain = tower_drain::DrainController::new();
        /// let layer = tower_drain::guard::GuardLayer::builder(drain.watch())
        ///     .heartbeat(Duration::from_secs(15))
        ///     .build()
        ///     .unwrap();
        /// # drop(layer);
        /// ```
        heartbeat(d: Duration) => settings.heartbeat = Some(d);
    }

    /// Runs `check` with the request's parts about every `every` while a stream is open (for
    /// example: is this bearer token still valid?). `Ok(false)` ends the stream with the final
    /// *unauthorized* frame; `Err` is logged and counted as a breaker failure, and the stream
    /// goes on. The check runs inside the body's `poll_frame` (no task per stream); each
    /// stream's first check comes after a random 50–100 % of `every`, so streams opened
    /// together are not all checked in the same instant. [`build`](Self::build) fails, naming
    /// `revalidate`, if `every` is zero or longer than
    /// [`MAX_DURATION`](crate::controller::MAX_DURATION).
    ///
    /// ```
    /// use std::time::Duration;
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::builder(drain.watch())
    ///     .revalidate(Duration::from_secs(60), |parts: &http::request::Parts| {
    ///         let token = parts.headers.get("authorization").cloned();
    ///         async move { Ok::<_, std::convert::Infallible>(token.is_some()) }
    ///     })
    ///     .build()
    ///     .unwrap();
    /// # drop(layer);
    /// ```
    pub fn revalidate<F, Fut, E>(mut self, every: Duration, check: F) -> Self
    where
        F: Fn(&Parts) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<bool, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let check = CheckFn(Arc::new(move |parts: &Parts| {
            let fut = check(parts);
            Box::pin(async move { fut.await.map_err(Into::into) }) as CheckFuture
        }));
        self.settings.revalidate = Some((every, check));
        self
    }

    setters! {
        /// Turns the circuit breaker on or off (off by default; any of its settings turns it on).
        /// Turning it off keeps its settings for when it is turned on again.
        ///
        /// ```
        /// let drain = tower_drain::DrainController::new();
        /// let layer = tower_drain::guard::GuardLayer::builder(drain.watch())
        ///     .failure_threshold(3)
        ///     .circuit_breaker(false)
        ///     .build()
        ///     .unwrap();
        /// assert!(layer.breaker().is_none());
        /// ```
        circuit_breaker(on: bool) => settings.breaker = on;

        /// Consecutive failures that open the circuit (default 5). Turns the breaker on.
        /// [`build`](Self::build) fails if `n` is zero.
        ///
        /// ```
        /// let drain = tower_drain::DrainController::new();
        /// let b = || tower_drain::guard::GuardLayer::builder(drain.watch());
        /// assert_eq!(b().failure_threshold(3).build().unwrap().breaker().unwrap().threshold(), 3);
        /// assert_eq!(b().failure_threshold(0).build().unwrap_err().setting(), "failure_threshold");
        /// ```
        failure_threshold(n: u32) => settings.failure_threshold = n, settings.breaker = true;

        /// How long an open circuit answers `503` before letting one probe through (default 30 s).
        /// Turns the breaker on. [`build`](Self::build) fails if `d` is zero or longer than
        /// [`MAX_DURATION`](crate::controller::MAX_DURATION).
        ///
        /// ```
        /// use std::time::Duration;
        /// let drain = tower_drain::DrainController::new();
        /// let layer = tower_drain::guard::GuardLayer::builder(drain.watch())
        ///     .cooldown(Duration::from_secs(10))
        ///     .build()
        ///     .unwrap();
        /// assert_eq!(layer.breaker().unwrap().cooldown(), Duration::from_secs(10));
        /// ```
        cooldown(d: Duration) => settings.cooldown = d, settings.breaker = true;

        /// How long the half-open probe's outcome is waited for (default: the cool-down). A probe
        /// whose response has not arrived by then (a hung handler, a long poll) counts as a
        /// failure: the circuit opens for another cool-down and the next probe follows it, so no
        /// single request can hold the circuit half-open. Turns the breaker on.
        /// [`build`](Self::build) fails if `d` is zero or longer than
        /// [`MAX_DURATION`](crate::controller::MAX_DURATION).
        ///
        /// ```
        /// use std::time::Duration;
        /// let drain = tower_drain::DrainController::new();
        /// let layer = tower_drain::guard::GuardLayer::builder(drain.watch())
        ///     .probe_timeout(Duration::from_secs(2))
        ///     .build()
        ///     .unwrap();
        /// assert_eq!(layer.breaker().unwrap().probe_timeout(), Duration::from_secs(2));
        /// ```
        probe_timeout(d: Duration) => settings.probe_timeout = Some(d), settings.breaker = true;

        /// The status of the answer while the circuit is open (default `503 Service
        /// Unavailable`); it carries `retry-after` with the rest of the cool-down.
        ///
        /// ```
        /// let drain = tower_drain::DrainController::new();
        /// let layer = tower_drain::guard::GuardLayer::builder(drain.watch())
        ///     .circuit_breaker(true)
        ///     .breaker_status(http::StatusCode::TOO_MANY_REQUESTS)
        ///     .build()
        ///     .unwrap();
        /// # drop(layer);
        /// ```
        breaker_status(status: StatusCode) => settings.breaker_status = status;
    }

    /// Which response statuses count as breaker failures (default: `5xx`).
    ///
    /// ```
    /// use http::StatusCode;
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::builder(drain.watch())
    ///     .circuit_breaker(true)
    ///     .failure_status(|s: StatusCode| s.is_server_error() && s != StatusCode::NOT_IMPLEMENTED)
    ///     .build()
    ///     .unwrap();
    /// # drop(layer);
    /// ```
    pub fn failure_status<F>(mut self, f: F) -> Self
    where
        F: Fn(StatusCode) -> bool + Send + Sync + 'static,
    {
        self.settings.is_failure = FailureFn(Arc::new(f));
        self
    }

    setters! {
        /// When the inner body yields an error mid-stream: `false` (the default) sends the final
        /// *error* frame at an event boundary and ends the body cleanly instead of resetting it
        /// (mid-record no whole frame can go out, so the error is passed on and the response is
        /// aborted); `true` always passes the error on. Either way the error is
        /// logged with the stream's number and path, counted in `stream_errors_total` and as a
        /// breaker failure.
        ///
        /// ```
        /// let drain = tower_drain::DrainController::new();
        /// let layer = tower_drain::guard::GuardLayer::builder(drain.watch())
        ///     .pass_through_errors(true)
        ///     .build()
        ///     .unwrap();
        /// # drop(layer);
        /// ```
        pass_through_errors(yes: bool) => settings.pass_errors = yes;
    }

    /// Final frames and heartbeats for the protocol of `encoder` instead of SSE
    /// ([`NdJson`](crate::frame::NdJson), [`Grpc`](crate::frame::Grpc), …). Only responses the
    /// encoder applies to (by content type, or with [`Inject`](crate::frame::Inject)) get
    /// lifetime/idle limits, heartbeats, revalidation and error frames. Under a
    /// [`DrainStack`](crate::DrainStack) the stack's encoder is used instead
    /// ([`DrainStack::encoder`](crate::DrainStack::encoder)).
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::builder(drain.watch())
    ///     .encoder(tower_drain::frame::NdJson::new())
    ///     .build()
    ///     .unwrap();
    /// # drop(layer);
    /// ```
    pub fn encoder(mut self, encoder: impl FinalFrame) -> Self {
        self.settings.frame = Arc::new(FrameConfig {
            shared: self.settings.frame.shared.clone(),
            encoder: Arc::new(encoder),
        });
        self
    }

    /// Checks the settings and builds the layer, with a new circuit breaker when it is on.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first invalid setting: a duration that is zero or longer
    /// than [`MAX_DURATION`](crate::controller::MAX_DURATION) (`response_timeout`,
    /// `max_lifetime`, `idle_timeout`, `first_frame_timeout`, `heartbeat`, `revalidate`, `cooldown`,
    /// `probe_timeout`), a `lifetime_jitter` outside `0..1`, or a `failure_threshold` of zero.
    ///
    /// ```
    /// use std::time::Duration;
    /// let drain = tower_drain::DrainController::new();
    /// let err = tower_drain::guard::GuardLayer::builder(drain.watch())
    ///     .max_lifetime(Duration::from_secs(600))
    ///     .cooldown(Duration::from_secs(400 * 24 * 3600))
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(err.setting(), "cooldown");
    /// assert!(err.to_string().starts_with("invalid cooldown: must be at most 365 days"));
    /// ```
    pub fn build(self) -> Result<GuardLayer, ConfigError> {
        self.settings.validate()?;
        Ok(GuardLayer::of(Config::new(self.settings)))
    }
}

impl GuardLayer {
    /// A [`GuardBuilder`] with the defaults, reporting to `watch`'s controller.
    ///
    /// ```
    /// use std::time::Duration;
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::builder(drain.watch())
    ///     .response_timeout(Duration::from_secs(5))
    ///     .failure_threshold(10)
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(layer.breaker().unwrap().threshold(), 10);
    /// ```
    pub fn builder(watch: DrainWatch) -> GuardBuilder {
        GuardBuilder {
            settings: Settings::new(watch),
        }
    }

    /// The settings this layer was built from, to change some and [`build`](GuardBuilder::build)
    /// a new layer. The new layer has its own circuit breaker (and its own stream numbering).
    ///
    /// ```
    /// use std::time::Duration;
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::guard::GuardLayer::builder(drain.watch())
    ///     .failure_threshold(3)
    ///     .build()
    ///     .unwrap();
    /// let layer = layer.to_builder().cooldown(Duration::from_secs(10)).build().unwrap();
    /// let breaker = layer.breaker().unwrap();
    /// assert_eq!((breaker.threshold(), breaker.cooldown()), (3, Duration::from_secs(10)));
    /// ```
    pub fn to_builder(&self) -> GuardBuilder {
        GuardBuilder {
            settings: self.cfg.settings.clone(),
        }
    }
}
