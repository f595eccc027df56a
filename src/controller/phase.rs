use std::borrow::Cow;
use std::fmt;

use serde::{Serialize, Serializer};

/// Where a [`DrainController`](super::DrainController) is in its life.
///
/// ```text
/// Serving ──drain(reason)──▶ Draining ──propagation delay──▶ Closing ──idle or grace over──▶ Stopped
/// ```
///
/// # Example
///
/// ```
/// use tower_drain::{DrainController, Phase};
/// let drain = DrainController::new();
/// assert_eq!(drain.phase(), Phase::Serving);
/// assert!(Phase::Serving < Phase::Draining && Phase::Closing < Phase::Stopped);
/// assert_eq!(Phase::Closing.as_str(), "closing");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Normal operation.
    Serving,
    /// A drain has started: readiness answers `503`, new requests are still served until the
    /// propagation delay has passed so load balancers can deregister the instance.
    Draining,
    /// New requests are rejected and open streams receive their final frame.
    Closing,
    /// Every stream has ended or was force-closed; the store has been cleaned up.
    Stopped,
}

impl Phase {
    pub(crate) const fn from_u8(v: u8) -> Self {
        match v {
            0 => Phase::Serving,
            1 => Phase::Draining,
            2 => Phase::Closing,
            _ => Phase::Stopped,
        }
    }

    /// The lowercase name used in logs, `/status` and the report.
    ///
    /// ```
    /// assert_eq!(tower_drain::Phase::Serving.as_str(), "serving");
    /// ```
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Draining => "draining",
            Phase::Closing => "closing",
            Phase::Stopped => "stopped",
        }
    }
}

/// `Display` and `Serialize` as the label of `as_str`, for each of the given types.
macro_rules! labelled {
    ($($t:ty),+) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    )+};
}

labelled!(Phase, DrainReason);

/// Why a drain started. The first reason given to
/// [`DrainController::drain`](super::DrainController::drain) wins.
///
/// # Example
///
/// ```
/// use tower_drain::DrainReason;
/// assert_eq!(DrainReason::Signal.as_str(), "signal");
/// assert_eq!(DrainReason::Programmatic("deploy").as_str(), "deploy");
/// assert_eq!(DrainReason::custom(String::from("oom-risk")).as_str(), "oom-risk");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DrainReason {
    /// SIGTERM or SIGINT (see [`DrainController::listen_for_signals`](super::DrainController::listen_for_signals)).
    Signal,
    /// An operator called the drain endpoint.
    Manual,
    /// The application decided, with a static label.
    Programmatic(&'static str),
    /// Any other reason, with an owned label.
    Custom(Cow<'static, str>),
}

impl DrainReason {
    /// A custom reason.
    ///
    /// ```
    /// let r = tower_drain::DrainReason::custom("memory pressure");
    /// assert_eq!(r.to_string(), "memory pressure");
    /// ```
    pub fn custom(label: impl Into<Cow<'static, str>>) -> Self {
        DrainReason::Custom(label.into())
    }

    /// The label used in logs, frames and the report: `signal`, `manual`, or the given label.
    ///
    /// ```
    /// assert_eq!(tower_drain::DrainReason::Manual.as_str(), "manual");
    /// ```
    pub fn as_str(&self) -> &str {
        match self {
            DrainReason::Signal => "signal",
            DrainReason::Manual => "manual",
            DrainReason::Programmatic(s) => s,
            DrainReason::Custom(s) => s,
        }
    }
}
