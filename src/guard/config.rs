//! [`GuardBuilder`]: the guard's settings, their validation, and the configuration its
//! services, futures and bodies share.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::StatusCode;

use super::breaker::Breaker;
use crate::controller::{splitmix64, ConfigError};
use crate::frame::{FrameConfig, Sse};
use crate::{BoxError, DrainWatch};

pub(crate) type CheckFuture = Pin<Box<dyn Future<Output = Result<bool, BoxError>> + Send>>;
/// A revalidation check.
#[derive(Clone)]
pub(crate) struct CheckFn(pub(crate) Arc<dyn Fn(&Parts) -> CheckFuture + Send + Sync>);

/// Which statuses count as breaker failures.
#[derive(Clone)]
pub(crate) struct FailureFn(pub(crate) Arc<dyn Fn(StatusCode) -> bool + Send + Sync>);

crate::macros::opaque_debug!(CheckFn, FailureFn);

/// Default consecutive failures that open the circuit.
const DEFAULT_THRESHOLD: u32 = 5;
/// Default cool-down of an open circuit.
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(30);

/// Everything a [`Guard`](super::Guard), its futures and bodies need; one per layer, behind an
/// `Arc`.
/// Its settings are reached through `Deref`; `breaker` is the circuit breaker itself.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) settings: Settings,
    pub(crate) breaker: Option<Breaker>,
    seq: Arc<AtomicU64>,
    seed: u64,
}

impl std::ops::Deref for Config {
    type Target = Settings;

    fn deref(&self) -> &Settings {
        &self.settings
    }
}

impl Config {
    /// The configuration of (valid) `settings`, with a new circuit breaker when it is on.
    pub(crate) fn new(settings: Settings) -> Self {
        debug_assert!(settings.validate().is_ok());
        let breaker = settings.breaker.then(|| {
            Breaker::new(
                settings.failure_threshold,
                settings.cooldown,
                settings.probe_timeout.unwrap_or(settings.cooldown),
                settings.frame.shared.metrics.clone(),
            )
        });
        Self {
            settings,
            breaker,
            seq: Arc::new(AtomicU64::new(1)),
            seed: crate::controller::random_seed(),
        }
    }

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

/// A guard's settings, as set on a [`GuardBuilder`](super::GuardBuilder).
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) frame: Arc<FrameConfig>,
    pub(crate) response_timeout: Option<Duration>,
    pub(crate) timeout_status: StatusCode,
    pub(crate) max_lifetime: Option<Duration>,
    pub(crate) lifetime_jitter: f64,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) first_frame_timeout: Option<Duration>,
    pub(crate) heartbeat: Option<Duration>,
    pub(crate) revalidate: Option<(Duration, CheckFn)>,
    pub(crate) breaker: bool,
    pub(crate) failure_threshold: u32,
    pub(crate) cooldown: Duration,
    pub(crate) probe_timeout: Option<Duration>,
    pub(crate) breaker_status: StatusCode,
    pub(crate) is_failure: FailureFn,
    pub(crate) pass_errors: bool,
}

/// `Ok` unless `d` is set and zero or over [`MAX_DURATION`](crate::controller::MAX_DURATION).
fn non_zero(setting: &'static str, d: Option<Duration>) -> Result<(), ConfigError> {
    match d {
        Some(d) if d.is_zero() => Err(ConfigError::new(setting, "must be greater than zero")),
        Some(d) => crate::controller::at_most_max(setting, d).map(drop),
        None => Ok(()),
    }
}

impl Settings {
    /// The defaults, reporting to `watch`'s controller (metrics, reconnect hints of final
    /// frames).
    pub(crate) fn new(watch: DrainWatch) -> Self {
        Self {
            frame: Arc::new(FrameConfig {
                shared: watch.shared,
                encoder: Arc::new(Sse::new()),
            }),
            response_timeout: None,
            timeout_status: StatusCode::GATEWAY_TIMEOUT,
            max_lifetime: None,
            lifetime_jitter: 0.0,
            idle_timeout: None,
            first_frame_timeout: None,
            heartbeat: None,
            revalidate: None,
            breaker: false,
            failure_threshold: DEFAULT_THRESHOLD,
            cooldown: DEFAULT_COOLDOWN,
            probe_timeout: None,
            breaker_status: StatusCode::SERVICE_UNAVAILABLE,
            is_failure: FailureFn(Arc::new(|s: StatusCode| s.is_server_error())),
            pass_errors: false,
        }
    }

    /// `Ok`, or the first invalid setting.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        non_zero("response_timeout", self.response_timeout)?;
        non_zero("max_lifetime", self.max_lifetime)?;
        if !(0.0..1.0).contains(&self.lifetime_jitter) {
            return Err(ConfigError::new(
                "lifetime_jitter",
                "must be at least 0 and less than 1",
            ));
        }
        non_zero("idle_timeout", self.idle_timeout)?;
        non_zero("first_frame_timeout", self.first_frame_timeout)?;
        non_zero("heartbeat", self.heartbeat)?;
        non_zero("revalidate", self.revalidate.as_ref().map(|r| r.0))?;
        if self.failure_threshold == 0 {
            return Err(ConfigError::new(
                "failure_threshold",
                "must be greater than zero",
            ));
        }
        non_zero("cooldown", Some(self.cooldown))?;
        non_zero("probe_timeout", self.probe_timeout)?;
        Ok(())
    }
}
