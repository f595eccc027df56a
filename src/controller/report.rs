use std::time::Duration;

use serde::{Serialize, Serializer};

use super::DrainReason;

/// What a drain did, returned by [`DrainController::report`](super::DrainController::report),
/// logged at `info` when the controller reaches [`Stopped`](super::Phase::Stopped), and
/// serializable to JSON.
///
/// The counts add up, stream by stream, under any concurrency:
///
/// ```text
/// streams_at_drain + opened_while_closing == closed_gracefully + force_closed
/// notified <= streams_at_drain + opened_while_closing
/// ```
///
/// Every stream open when `Closing` begins, or opened after it (an exempt route, a layer
/// without `RejectLayer`), ends in exactly one of `closed_gracefully` and `force_closed`, and
/// is notified at most once. The counts are frozen when the report is made, just before
/// `Stopped`: a stream opened after the grace deadline counts as force-closed (its body ends
/// at once), and so does one still open when the report is made; streams opened later are not
/// part of the report. (`notified` also counts streams of a `FrameLayer` used without a
/// `TrackLayer`, which no other count sees.)
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// use tower_drain::{DrainController, DrainReason};
/// let drain = DrainController::new();
/// drain.drain(DrainReason::Manual);
/// let report = drain.report().await;
/// assert_eq!(report.reason, DrainReason::Manual);
/// assert_eq!(report.streams_at_drain, 0);
/// let json = serde_json::to_value(&report).unwrap();
/// assert_eq!(json["reason"], "manual");
/// # }
/// ```
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Why the drain started.
    pub reason: DrainReason,
    /// Streams open when `Closing` began (those opened during the propagation delay count).
    pub streams_at_drain: u64,
    /// Streams handed a shutdown frame (graceful or forced).
    pub notified: u64,
    /// Streams that ended after `Closing` began and before the grace deadline, by any means but
    /// force (frame delivered, client left, stream finished).
    pub closed_gracefully: u64,
    /// Streams still open at the grace deadline, opened after it, or still open when the
    /// report was made.
    pub force_closed: u64,
    /// Requests answered `503` while draining.
    pub rejected: u64,
    /// Streams opened after `Closing` began (exempt routes, or routes without `RejectLayer`).
    pub opened_while_closing: u64,
    /// Time in `Draining` (the propagation delay).
    #[serde(rename = "draining_ms", serialize_with = "ms")]
    pub draining: Duration,
    /// Time in `Closing` (until idle or the grace deadline).
    #[serde(rename = "closing_ms", serialize_with = "ms")]
    pub closing: Duration,
    /// Time spent cleaning up the connection store.
    #[serde(rename = "cleanup_ms", serialize_with = "ms")]
    pub cleanup: Duration,
    /// From `drain()` to `Stopped`.
    #[serde(rename = "duration_ms", serialize_with = "ms")]
    pub duration: Duration,
    /// The connection store's clean-up summary, for stores that hold state outside the process.
    pub store_cleanup: Option<CleanupSummary>,
}

/// What a connection store's final clean-up did (see
/// [`ConnectionStore::shutdown`](crate::track::ConnectionStore::shutdown)).
///
/// # Example
///
/// ```
/// use tower_drain::CleanupSummary;
/// let s = CleanupSummary::default();
/// assert_eq!(s.total_cleaned, 0);
/// assert!(!s.max_iterations_reached);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CleanupSummary {
    /// Leases removed by the clean-up.
    pub total_cleaned: u64,
    /// Rounds it took.
    pub iterations: u32,
    /// Leases this process still held when the clean-up began.
    pub before: u64,
    /// Leases still held when it gave up (0 on success).
    pub after: u64,
    /// How long it took.
    #[serde(rename = "duration_ms", serialize_with = "ms")]
    pub duration: Duration,
    /// Whether it stopped because it reached its maximum number of rounds.
    pub max_iterations_reached: bool,
}

impl CleanupSummary {
    /// A summary with the given figures.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let s = tower_drain::CleanupSummary::new(10, 1, 10, 0, Duration::from_millis(3), false);
    /// assert_eq!(s.after, 0);
    /// ```
    pub fn new(
        total_cleaned: u64,
        iterations: u32,
        before: u64,
        after: u64,
        duration: Duration,
        max_iterations_reached: bool,
    ) -> Self {
        Self {
            total_cleaned,
            iterations,
            before,
            after,
            duration,
            max_iterations_reached,
        }
    }
}

fn ms<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}
