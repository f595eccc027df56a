//! [`ConfigError`] and the bound every duration setting shares.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// The longest duration any setting of this crate accepts: 365 days. Longer values are
/// surely a unit mistake, and rejecting them keeps every deadline the crate computes
/// (`now + duration`, sums of settings) far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// `d` if it is at most [`MAX_DURATION`], else an error naming `setting`.
pub(crate) fn at_most_max(setting: &'static str, d: Duration) -> Result<Duration, ConfigError> {
    if d > MAX_DURATION {
        Err(ConfigError::new(
            setting,
            format!("must be at most 365 days, got {} s", d.as_secs()),
        ))
    } else {
        Ok(d)
    }
}

/// An invalid setting, named by [`setting`](Self::setting).
///
/// ```
/// let err = tower_drain::DrainController::builder().reconnect_jitter(1.5).build().unwrap_err();
/// assert_eq!(err.setting(), "reconnect_jitter");
/// assert!(err.to_string().starts_with("invalid reconnect_jitter:"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    setting: &'static str,
    message: Cow<'static, str>,
}

impl ConfigError {
    pub(crate) fn new(setting: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            setting,
            message: message.into(),
        }
    }

    /// The setting (builder method or environment variable) that is invalid.
    ///
    /// ```
    /// let err = tower_drain::DrainController::builder()
    ///     .grace_period(std::time::Duration::ZERO).build().unwrap_err();
    /// assert_eq!(err.setting(), "grace_period");
    /// ```
    pub fn setting(&self) -> &'static str {
        self.setting
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.setting, self.message)
    }
}

impl std::error::Error for ConfigError {}
