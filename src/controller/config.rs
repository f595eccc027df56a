use std::borrow::Cow;
use std::time::Duration;

use super::error::{at_most_max, ConfigError};
use crate::macros::setters;

/// Builds a [`DrainController`](super::DrainController); invalid settings are rejected by
/// [`build`](Self::build) with a [`ConfigError`] naming the setting.
///
/// | setting | default | environment variable ([`from_env`](Self::from_env)) |
/// |---|---|---|
/// | [`grace_period`](Self::grace_period) | 20 s | `SHUTDOWN_GRACE_PERIOD` (seconds) |
/// | [`propagation_delay`](Self::propagation_delay) | 0 | `PROPAGATION_DELAY_MS` |
/// | [`reconnect_delay`](Self::reconnect_delay) | 30 s | `RECONNECT_DELAY` (seconds) |
/// | [`reconnect_jitter`](Self::reconnect_jitter) | 0.2 | |
/// | [`drain_spread`](Self::drain_spread) | 0 | `DRAIN_SPREAD_MS` |
/// | [`progress_interval`](Self::progress_interval) | 5 s | |
/// | [`cleanup_timeout`](Self::cleanup_timeout) | 5 s | |
/// | [`force_linger`](Self::force_linger) | 1 s | |
/// | [`force_on_second_signal`](Self::force_on_second_signal) | `true` | |
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tower_drain::DrainController;
///
/// let drain = DrainController::builder()
///     .grace_period(Duration::from_secs(25))
///     .propagation_delay(Duration::from_secs(5))
///     .drain_spread(Duration::from_secs(10))
///     .build()
///     .unwrap();
/// assert_eq!(drain.config().grace_period(), Duration::from_secs(25));
///
/// let err = DrainController::builder().grace_period(Duration::ZERO).build().unwrap_err();
/// assert_eq!(err.setting(), "grace_period");
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct DrainBuilder {
    config: DrainConfig,
    names: Names,
}

/// The validated settings of a [`DrainController`](super::DrainController) (see [`DrainBuilder`]).
///
/// ```
/// let drain = tower_drain::DrainController::new();
/// assert_eq!(drain.config().reconnect_delay().as_secs(), 30);
/// ```
#[derive(Clone, Debug)]
pub struct DrainConfig {
    pub(crate) grace_period: Duration,
    pub(crate) propagation_delay: Duration,
    pub(crate) reconnect_delay: Duration,
    pub(crate) reconnect_jitter: f64,
    pub(crate) drain_spread: Duration,
    pub(crate) progress_interval: Duration,
    pub(crate) cleanup_timeout: Duration,
    pub(crate) force_linger: Duration,
    pub(crate) force_on_second_signal: bool,
    pub(crate) message: Cow<'static, str>,
}

impl DrainConfig {
    /// Time from `drain()` until remaining streams are force-closed.
    ///
    /// ```
    /// assert_eq!(tower_drain::DrainController::new().config().grace_period().as_secs(), 20);
    /// ```
    pub fn grace_period(&self) -> Duration {
        self.grace_period
    }
    /// Time between readiness turning `503` and `Closing`.
    ///
    /// ```
    /// assert!(tower_drain::DrainController::new().config().propagation_delay().is_zero());
    /// ```
    pub fn propagation_delay(&self) -> Duration {
        self.propagation_delay
    }
    /// Reconnect delay suggested to clients (`retry-after`, the frames' `reconnect_delay`).
    ///
    /// ```
    /// assert_eq!(tower_drain::DrainController::new().config().reconnect_delay().as_secs(), 30);
    /// ```
    pub fn reconnect_delay(&self) -> Duration {
        self.reconnect_delay
    }
    /// Fraction by which each stream's `retry:` hint may deviate from the reconnect delay.
    ///
    /// ```
    /// assert_eq!(tower_drain::DrainController::new().config().reconnect_jitter(), 0.2);
    /// ```
    pub fn reconnect_jitter(&self) -> f64 {
        self.reconnect_jitter
    }
    /// Window over which shutdown frames are spread.
    ///
    /// ```
    /// assert!(tower_drain::DrainController::new().config().drain_spread().is_zero());
    /// ```
    pub fn drain_spread(&self) -> Duration {
        self.drain_spread
    }
    /// Whether a second SIGTERM / SIGINT cuts a drain short (see
    /// [`DrainBuilder::force_on_second_signal`]).
    ///
    /// ```
    /// assert!(tower_drain::DrainController::new().config().force_on_second_signal());
    /// ```
    pub fn force_on_second_signal(&self) -> bool {
        self.force_on_second_signal
    }

    /// The force linger: after the grace deadline, how long forced streams (and, with the
    /// `hyper` feature, connections) get before they are dropped (see
    /// [`DrainBuilder::force_linger`]).
    ///
    /// ```
    /// assert_eq!(tower_drain::DrainController::new().config().force_linger().as_secs(), 1);
    /// ```
    pub fn force_linger(&self) -> Duration {
        self.force_linger
    }

    /// The human-readable message carried by shutdown frames.
    ///
    /// ```
    /// assert!(!tower_drain::DrainController::new().config().message().is_empty());
    /// ```
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(20),
            propagation_delay: Duration::ZERO,
            reconnect_delay: Duration::from_secs(30),
            reconnect_jitter: 0.2,
            drain_spread: Duration::ZERO,
            progress_interval: Duration::from_secs(5),
            cleanup_timeout: Duration::from_secs(5),
            force_linger: Duration::from_secs(1),
            force_on_second_signal: true,
            message: Cow::Borrowed("Server is shutting down, please reconnect"),
        }
    }
}

/// Names used in error messages: builder method names, or environment variables.
#[derive(Clone, Copy, Debug)]
struct Names {
    grace: &'static str,
    propagation: &'static str,
    reconnect: &'static str,
    spread: &'static str,
}

const METHOD_NAMES: Names = Names {
    grace: "grace_period",
    propagation: "propagation_delay",
    reconnect: "reconnect_delay",
    spread: "drain_spread",
};

const ENV_NAMES: Names = Names {
    grace: "SHUTDOWN_GRACE_PERIOD",
    propagation: "PROPAGATION_DELAY_MS",
    reconnect: "RECONNECT_DELAY",
    spread: "DRAIN_SPREAD_MS",
};

impl Default for DrainBuilder {
    fn default() -> Self {
        Self {
            config: DrainConfig::default(),
            names: METHOD_NAMES,
        }
    }
}

impl DrainBuilder {
    /// A builder with the defaults.
    ///
    /// ```
    /// let drain = tower_drain::DrainBuilder::new().build().unwrap();
    /// # drop(drain);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the settings from the environment, on top of the defaults:
    /// `SHUTDOWN_GRACE_PERIOD` (seconds), `PROPAGATION_DELAY_MS`, `RECONNECT_DELAY` (seconds)
    /// and `DRAIN_SPREAD_MS`. Unset variables keep the default.
    ///
    /// # Errors
    ///
    /// A value that is not a non-negative whole number is an error naming the variable; so are
    /// invalid combinations, reported by [`build`](Self::build) under the variable's name.
    ///
    /// ```
    /// // With none of the variables set, this is the default configuration.
    /// let drain = tower_drain::DrainBuilder::from_env().unwrap().build().unwrap();
    /// # drop(drain);
    /// ```
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Like [`from_env`](Self::from_env), with a custom lookup (handy in tests).
    ///
    /// ```
    /// let b = tower_drain::DrainBuilder::from_lookup(|k| {
    ///     (k == "SHUTDOWN_GRACE_PERIOD").then(|| "abc".to_string())
    /// });
    /// assert_eq!(b.unwrap_err().setting(), "SHUTDOWN_GRACE_PERIOD");
    /// ```
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut b = Self {
            config: DrainConfig::default(),
            names: ENV_NAMES,
        };
        if let Some(v) = env_u64(&lookup, "SHUTDOWN_GRACE_PERIOD")? {
            b.config.grace_period = Duration::from_secs(v);
        }
        if let Some(v) = env_u64(&lookup, "PROPAGATION_DELAY_MS")? {
            b.config.propagation_delay = Duration::from_millis(v);
        }
        if let Some(v) = env_u64(&lookup, "RECONNECT_DELAY")? {
            b.config.reconnect_delay = Duration::from_secs(v);
        }
        if let Some(v) = env_u64(&lookup, "DRAIN_SPREAD_MS")? {
            b.config.drain_spread = Duration::from_millis(v);
        }
        Ok(b)
    }

    setters! {
        /// Time from `drain()` until remaining streams are force-closed (default 20 s; must not
        /// be 0).
        ///
        /// ```
        /// use std::time::Duration;
        /// let drain = tower_drain::DrainController::builder()
        ///     .grace_period(Duration::from_secs(60))
        ///     .build()
        ///     .unwrap();
        /// assert_eq!(drain.config().grace_period(), Duration::from_secs(60));
        /// ```
        grace_period(d: Duration) => config.grace_period = d;

        /// Time between readiness turning `503` and new requests being rejected / streams
        /// notified (default 0), so load balancers can take the instance out of rotation first.
        ///
        /// ```
        /// use std::time::Duration;
        /// let drain = tower_drain::DrainController::builder()
        ///     .propagation_delay(Duration::from_secs(5))
        ///     .build()
        ///     .unwrap();
        /// assert_eq!(drain.config().propagation_delay(), Duration::from_secs(5));
        /// ```
        propagation_delay(d: Duration) => config.propagation_delay = d;

        /// Reconnect delay suggested to clients (default 30 s; 0 is allowed).
        ///
        /// ```
        /// use std::time::Duration;
        /// let drain = tower_drain::DrainController::builder()
        ///     .reconnect_delay(Duration::ZERO)
        ///     .build()
        ///     .unwrap();
        /// assert!(drain.config().reconnect_delay().is_zero());
        /// ```
        reconnect_delay(d: Duration) => config.reconnect_delay = d;

        /// Maximum fraction (0 ≤ j < 1, default 0.2) by which each stream's `retry:` hint
        /// deviates from the reconnect delay, so clients do not reconnect in the same
        /// millisecond.
        ///
        /// ```
        /// let b = || tower_drain::DrainController::builder();
        /// assert_eq!(b().reconnect_jitter(0.5).build().unwrap().config().reconnect_jitter(), 0.5);
        /// assert_eq!(b().reconnect_jitter(1.0).build().unwrap_err().setting(), "reconnect_jitter");
        /// ```
        reconnect_jitter(fraction: f64) => config.reconnect_jitter = fraction;

        /// Spread the shutdown frames evenly over this window, starting when `Closing` begins
        /// (default 0: all at once). Propagation delay plus spread must fit in the grace
        /// period.
        ///
        /// ```
        /// use std::time::Duration;
        /// let drain = tower_drain::DrainController::builder()
        ///     .drain_spread(Duration::from_secs(10))
        ///     .build()
        ///     .unwrap();
        /// assert_eq!(drain.config().drain_spread(), Duration::from_secs(10));
        /// ```
        drain_spread(d: Duration) => config.drain_spread = d;

        /// How often progress (streams left) is logged while waiting (default 5 s; must not be
        /// 0).
        ///
        /// ```
        /// use std::time::Duration;
        /// let b = || tower_drain::DrainController::builder();
        /// assert!(b().progress_interval(Duration::from_secs(1)).build().is_ok());
        /// let err = b().progress_interval(Duration::ZERO).build().unwrap_err();
        /// assert_eq!(err.setting(), "progress_interval");
        /// ```
        progress_interval(d: Duration) => config.progress_interval = d;

        /// Longest wait for the connection store's clean-up at the end of a drain (default
        /// 5 s).
        ///
        /// ```
        /// use std::time::Duration;
        /// let drain = tower_drain::DrainController::builder()
        ///     .cleanup_timeout(Duration::from_secs(2))
        ///     .build()
        ///     .unwrap();
        /// # drop(drain);
        /// ```
        cleanup_timeout(d: Duration) => config.cleanup_timeout = d;

        /// After force-closing at the grace deadline, how long to wait at most for those
        /// streams to hand over their forced frame and end before the store clean-up and
        /// `Stopped` (default 1 s). Streams whose connection cannot take the frame (full send
        /// buffer) are cut by the server when it stops.
        ///
        /// ```
        /// use std::time::Duration;
        /// let drain = tower_drain::DrainController::builder()
        ///     .force_linger(Duration::from_millis(500))
        ///     .build()
        ///     .unwrap();
        /// assert_eq!(drain.config().force_linger(), Duration::from_millis(500));
        /// ```
        force_linger(d: Duration) => config.force_linger = d;

        /// Whether a second SIGTERM / SIGINT during a drain started by a signal cuts it short
        /// (default `true`; see
        /// [`DrainController::listen_for_signals`](super::DrainController::listen_for_signals)
        /// and [`DrainController::force_now`](super::DrainController::force_now)). With `false`
        /// further signals are ignored and the
        /// drain always runs its course.
        ///
        /// ```
        /// let drain = tower_drain::DrainController::builder()
        ///     .force_on_second_signal(false)
        ///     .build()
        ///     .unwrap();
        /// assert!(!drain.config().force_on_second_signal());
        /// ```
        force_on_second_signal(yes: bool) => config.force_on_second_signal = yes;

        /// The human-readable message of shutdown frames.
        ///
        /// ```
        /// let drain = tower_drain::DrainController::builder()
        ///     .message("Back in a minute")
        ///     .build()
        ///     .unwrap();
        /// assert_eq!(drain.config().message(), "Back in a minute");
        /// ```
        message(message: impl Into<Cow<'static, str>>) => config.message = message.into();
    }

    // `build` itself is in the parent module, beside the controller it makes: this file
    // does not depend on the controller.

    /// The validated settings (what [`build`](Self::build) makes a controller of).
    pub(super) fn into_config(self) -> Result<DrainConfig, ConfigError> {
        self.validate()?;
        Ok(self.config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        let n = self.names;
        for (setting, d) in [
            (n.grace, c.grace_period),
            (n.propagation, c.propagation_delay),
            (n.reconnect, c.reconnect_delay),
            (n.spread, c.drain_spread),
            ("progress_interval", c.progress_interval),
            ("cleanup_timeout", c.cleanup_timeout),
            ("force_linger", c.force_linger),
        ] {
            at_most_max(setting, d)?;
        }
        if c.grace_period.is_zero() {
            return Err(ConfigError::new(n.grace, "must be greater than zero"));
        }
        if !(0.0..1.0).contains(&c.reconnect_jitter) {
            return Err(ConfigError::new(
                "reconnect_jitter",
                "must be at least 0 and less than 1",
            ));
        }
        if c.progress_interval.is_zero() {
            return Err(ConfigError::new(
                "progress_interval",
                "must be greater than zero",
            ));
        }
        if c.propagation_delay >= c.grace_period {
            return Err(ConfigError::new(
                n.propagation,
                "must be shorter than the grace period",
            ));
        }
        if c.propagation_delay + c.drain_spread >= c.grace_period {
            return Err(ConfigError::new(
                n.spread,
                "propagation delay plus drain spread must fit inside the grace period",
            ));
        }
        Ok(())
    }
}

fn env_u64(
    lookup: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<u64>, ConfigError> {
    match lookup(name) {
        None => Ok(None),
        Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
            ConfigError::new(
                name,
                format!("must be a non-negative whole number, got {v:?}"),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::MAX_DURATION;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn env_err(pairs: &'static [(&'static str, &'static str)]) -> &'static str {
        match DrainBuilder::from_lookup(env(pairs)) {
            Err(e) => e.setting(),
            Ok(b) => b.build().unwrap_err().setting(),
        }
    }

    #[test]
    fn absurd_durations_are_rejected_naming_the_setting() {
        let huge = Duration::from_secs(u64::MAX);
        let b = || DrainBuilder::new();
        let cases: [(DrainBuilder, &str); 7] = [
            (b().grace_period(huge), "grace_period"),
            (b().propagation_delay(huge), "propagation_delay"),
            (b().reconnect_delay(huge), "reconnect_delay"),
            (b().drain_spread(huge), "drain_spread"),
            (b().progress_interval(huge), "progress_interval"),
            (b().cleanup_timeout(huge), "cleanup_timeout"),
            (b().force_linger(huge), "force_linger"),
        ];
        for (builder, setting) in cases {
            assert_eq!(builder.build().unwrap_err().setting(), setting);
        }
        for var in [
            "SHUTDOWN_GRACE_PERIOD",
            "PROPAGATION_DELAY_MS",
            "RECONNECT_DELAY",
            "DRAIN_SPREAD_MS",
        ] {
            let got = DrainBuilder::from_lookup(|k| (k == var).then(|| u64::MAX.to_string()))
                .and_then(DrainBuilder::build)
                .unwrap_err();
            assert_eq!(got.setting(), var);
        }
        // The limit itself is accepted.
        b().grace_period(MAX_DURATION).build().unwrap();
    }

    #[test]
    fn invalid_settings_name_the_setting() {
        let b = || DrainBuilder::new();
        assert_eq!(
            b().grace_period(Duration::ZERO)
                .build()
                .unwrap_err()
                .setting(),
            "grace_period"
        );
        assert_eq!(
            b().reconnect_jitter(-0.1).build().unwrap_err().setting(),
            "reconnect_jitter"
        );
        assert_eq!(
            b().reconnect_jitter(1.0).build().unwrap_err().setting(),
            "reconnect_jitter"
        );
        assert_eq!(
            b().propagation_delay(Duration::from_secs(20))
                .build()
                .unwrap_err()
                .setting(),
            "propagation_delay"
        );
        assert_eq!(
            b().drain_spread(Duration::from_secs(25))
                .build()
                .unwrap_err()
                .setting(),
            "drain_spread"
        );
        assert_eq!(
            b().propagation_delay(Duration::from_secs(10))
                .drain_spread(Duration::from_secs(10))
                .build()
                .unwrap_err()
                .setting(),
            "drain_spread"
        );
        assert_eq!(
            b().progress_interval(Duration::ZERO)
                .build()
                .unwrap_err()
                .setting(),
            "progress_interval"
        );
        assert!(b()
            .propagation_delay(Duration::from_secs(5))
            .drain_spread(Duration::from_secs(10))
            .reconnect_delay(Duration::ZERO)
            .build()
            .is_ok());
    }

    #[test]
    fn environment_errors_name_the_variable() {
        assert_eq!(
            env_err(&[("SHUTDOWN_GRACE_PERIOD", "abc")]),
            "SHUTDOWN_GRACE_PERIOD"
        );
        assert_eq!(
            env_err(&[("SHUTDOWN_GRACE_PERIOD", "-1")]),
            "SHUTDOWN_GRACE_PERIOD"
        );
        assert_eq!(
            env_err(&[("SHUTDOWN_GRACE_PERIOD", "0")]),
            "SHUTDOWN_GRACE_PERIOD"
        );
        assert_eq!(env_err(&[("RECONNECT_DELAY", "1.5")]), "RECONNECT_DELAY");
        assert_eq!(
            env_err(&[("PROPAGATION_DELAY_MS", "x")]),
            "PROPAGATION_DELAY_MS"
        );
        assert_eq!(
            env_err(&[
                ("SHUTDOWN_GRACE_PERIOD", "2"),
                ("PROPAGATION_DELAY_MS", "1500"),
                ("DRAIN_SPREAD_MS", "600")
            ]),
            "DRAIN_SPREAD_MS"
        );
        let ok = DrainBuilder::from_lookup(env(&[
            ("SHUTDOWN_GRACE_PERIOD", "3"),
            ("PROPAGATION_DELAY_MS", "100"),
            ("RECONNECT_DELAY", "0"),
            ("DRAIN_SPREAD_MS", "200"),
        ]))
        .unwrap()
        .build()
        .unwrap();
        let c = ok.config();
        assert_eq!(c.grace_period(), Duration::from_secs(3));
        assert_eq!(c.propagation_delay(), Duration::from_millis(100));
        assert_eq!(c.reconnect_delay(), Duration::ZERO);
        assert_eq!(c.drain_spread(), Duration::from_millis(200));
    }
}
