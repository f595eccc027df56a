//! Metric names and cached handles.
//!
//! Every metric goes through the [`metrics`] facade, so it reaches whatever recorder the
//! application installed (Prometheus exporter, StatsD, …). Handles are created once, when a
//! [`DrainController`](crate::DrainController) is built, and cloned from there: install the
//! recorder **before** building the controller, or the handles stay bound to the no-op recorder.
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `tower_drain_active_streams` | gauge | |
//! | `tower_drain_streams_total` | counter | |
//! | `tower_drain_stream_duration_seconds` | histogram | |
//! | `tower_drain_rejected_total` | counter | `reason` = `draining` \| `limit` \| `breaker` |
//! | `tower_drain_notified_total` | counter | |
//! | `tower_drain_force_closed_total` | counter | |
//! | `tower_drain_timeouts_total` | counter | `kind` = `response` \| `lifetime` \| `idle` |
//! | `tower_drain_breaker_open` | gauge | |
//! | `tower_drain_breaker_trips_total` | counter | |
//! | `tower_drain_stream_errors_total` | counter | |
//! | `tower_drain_shutdown_duration_seconds` | histogram | |
//! | `tower_drain_store_errors_total` | counter | `op` = `acquire` \| `release` \| `heartbeat` \| `sweep` \| `cleanup` |
//! | `tower_drain_stale_leases_cleaned_total` | counter | |
//!
//! # Example
//!
//! ```
//! use tower_drain::metrics::ACTIVE_STREAMS;
//! assert_eq!(ACTIVE_STREAMS, "tower_drain_active_streams");
//! ```

use metrics::{Counter, Gauge, Histogram, Unit};

/// Gauge: streams (tracked requests) currently open.
pub const ACTIVE_STREAMS: &str = "tower_drain_active_streams";
/// Counter: streams opened since start.
pub const STREAMS_TOTAL: &str = "tower_drain_streams_total";
/// Histogram: how long each stream lived, in seconds.
pub const STREAM_DURATION_SECONDS: &str = "tower_drain_stream_duration_seconds";
/// Counter: requests answered without calling the service, by `reason`.
pub const REJECTED_TOTAL: &str = "tower_drain_rejected_total";
/// Counter: streams handed a shutdown frame.
pub const NOTIFIED_TOTAL: &str = "tower_drain_notified_total";
/// Counter: streams still open at the grace deadline.
pub const FORCE_CLOSED_TOTAL: &str = "tower_drain_force_closed_total";
/// Counter: timeouts, by `kind`.
pub const TIMEOUTS_TOTAL: &str = "tower_drain_timeouts_total";
/// Gauge: 1 while the error circuit breaker is open, else 0.
pub const BREAKER_OPEN: &str = "tower_drain_breaker_open";
/// Counter: times the error circuit breaker opened.
pub const BREAKER_TRIPS_TOTAL: &str = "tower_drain_breaker_trips_total";
/// Counter: response bodies that ended in an error (seen by the guard layer).
pub const STREAM_ERRORS_TOTAL: &str = "tower_drain_stream_errors_total";
/// Histogram: time from the start of a drain to `Stopped`, in seconds.
pub const SHUTDOWN_DURATION_SECONDS: &str = "tower_drain_shutdown_duration_seconds";
/// Counter: connection-store operations that failed, labelled `op` = `acquire` (counted by
/// `TrackLayer`), `release`, `heartbeat`, `sweep` or `cleanup` (counted by the store).
pub const STORE_ERRORS_TOTAL: &str = "tower_drain_store_errors_total";
/// Counter: leases removed by clean-up sweeps (expired ones and those released at shutdown).
pub const STALE_LEASES_CLEANED_TOTAL: &str = "tower_drain_stale_leases_cleaned_total";

/// Registers a description for every metric of this crate with the current recorder.
///
/// Building a [`DrainController`](crate::DrainController) calls it, and also registers every
/// counter and gauge at zero so that exporters show them before their first use.
///
/// # Example
///
/// ```
/// tower_drain::metrics::describe();
/// ```
pub fn describe() {
    metrics::describe_gauge!(ACTIVE_STREAMS, "Streams currently open");
    metrics::describe_counter!(STREAMS_TOTAL, "Streams opened");
    metrics::describe_histogram!(
        STREAM_DURATION_SECONDS,
        Unit::Seconds,
        "How long each stream lived"
    );
    metrics::describe_counter!(
        REJECTED_TOTAL,
        "Requests answered without calling the service"
    );
    metrics::describe_counter!(NOTIFIED_TOTAL, "Streams handed a shutdown frame");
    metrics::describe_counter!(
        FORCE_CLOSED_TOTAL,
        "Streams still open at the grace deadline"
    );
    metrics::describe_counter!(TIMEOUTS_TOTAL, "Timeouts by kind");
    metrics::describe_gauge!(BREAKER_OPEN, "1 while the error circuit breaker is open");
    metrics::describe_counter!(
        BREAKER_TRIPS_TOTAL,
        "Times the error circuit breaker opened"
    );
    metrics::describe_counter!(
        STREAM_ERRORS_TOTAL,
        "Response bodies that ended in an error"
    );
    metrics::describe_histogram!(
        SHUTDOWN_DURATION_SECONDS,
        Unit::Seconds,
        "Time from the start of a drain to Stopped"
    );
    metrics::describe_counter!(
        STORE_ERRORS_TOTAL,
        "Connection store operations that failed"
    );
    metrics::describe_counter!(
        STALE_LEASES_CLEANED_TOTAL,
        "Leases removed by clean-up sweeps"
    );
}

/// Handles to every metric, created once per controller.
#[derive(Clone)]
pub(crate) struct Metrics {
    pub(crate) active_streams: Gauge,
    pub(crate) streams_total: Counter,
    pub(crate) stream_duration: Histogram,
    pub(crate) rejected_draining: Counter,
    pub(crate) rejected_limit: Counter,
    pub(crate) rejected_breaker: Counter,
    pub(crate) notified: Counter,
    pub(crate) force_closed: Counter,
    pub(crate) timeouts_response: Counter,
    pub(crate) timeouts_lifetime: Counter,
    pub(crate) timeouts_idle: Counter,
    pub(crate) breaker_open: Gauge,
    pub(crate) breaker_trips: Counter,
    pub(crate) stream_errors: Counter,
    pub(crate) shutdown_duration: Histogram,
    pub(crate) store_errors: Counter,
    pub(crate) stale_leases_cleaned: Counter,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        describe();
        let m = Self {
            active_streams: metrics::gauge!(ACTIVE_STREAMS),
            streams_total: metrics::counter!(STREAMS_TOTAL),
            stream_duration: metrics::histogram!(STREAM_DURATION_SECONDS),
            rejected_draining: metrics::counter!(REJECTED_TOTAL, "reason" => "draining"),
            rejected_limit: metrics::counter!(REJECTED_TOTAL, "reason" => "limit"),
            rejected_breaker: metrics::counter!(REJECTED_TOTAL, "reason" => "breaker"),
            notified: metrics::counter!(NOTIFIED_TOTAL),
            force_closed: metrics::counter!(FORCE_CLOSED_TOTAL),
            timeouts_response: metrics::counter!(TIMEOUTS_TOTAL, "kind" => "response"),
            timeouts_lifetime: metrics::counter!(TIMEOUTS_TOTAL, "kind" => "lifetime"),
            timeouts_idle: metrics::counter!(TIMEOUTS_TOTAL, "kind" => "idle"),
            breaker_open: metrics::gauge!(BREAKER_OPEN),
            breaker_trips: metrics::counter!(BREAKER_TRIPS_TOTAL),
            stream_errors: metrics::counter!(STREAM_ERRORS_TOTAL),
            shutdown_duration: metrics::histogram!(SHUTDOWN_DURATION_SECONDS),
            store_errors: metrics::counter!(STORE_ERRORS_TOTAL, "op" => "acquire"),
            stale_leases_cleaned: metrics::counter!(STALE_LEASES_CLEANED_TOTAL),
        };
        // Register every counter and gauge at zero so exporters list them before first use.
        for c in [
            &m.streams_total,
            &m.rejected_draining,
            &m.rejected_limit,
            &m.rejected_breaker,
            &m.notified,
            &m.force_closed,
            &m.timeouts_response,
            &m.timeouts_lifetime,
            &m.timeouts_idle,
            &m.breaker_trips,
            &m.stream_errors,
            &m.store_errors,
            &m.stale_leases_cleaned,
        ] {
            c.increment(0);
        }
        // The store's own operations, so every label is listed from the start too.
        for op in ["release", "heartbeat", "sweep", "cleanup"] {
            metrics::counter!(STORE_ERRORS_TOTAL, "op" => op).increment(0);
        }
        m.active_streams.set(0.0);
        m.breaker_open.set(0.0);
        m
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}
