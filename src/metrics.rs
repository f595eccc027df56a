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

/// Defines the name constants, [`describe`] and the registration at zero of every metric
/// from one table: `kind NAME = "name" [by "label" in ["value", …]], "description";`.
macro_rules! metric_table {
    ($(
        $(#[$doc:meta])*
        $kind:ident $name:ident = $value:literal $(by $key:literal in [$($label:literal),+])?,
            $desc:literal;
    )+) => {
        $( $(#[$doc])* pub const $name: &str = $value; )+

        /// Registers a description for every metric of this crate with the current recorder.
        ///
        /// Building a [`DrainController`](crate::DrainController) calls it, and also registers
        /// every counter and gauge at zero so that exporters show them before their first use.
        ///
        /// # Example
        ///
        /// ```
        /// tower_drain::metrics::describe();
        /// ```
        pub fn describe() {
            $( metric_table!(@describe $kind $name $desc); )+
        }

        /// Registers every counter (each label value) and gauge at zero, so exporters list
        /// them before their first use.
        fn register_at_zero() {
            $( metric_table!(@zero $kind $name $($key [$($label)+])?); )+
        }
    };
    (@describe gauge $name:ident $desc:literal) => { metrics::describe_gauge!($name, $desc) };
    (@describe counter $name:ident $desc:literal) => { metrics::describe_counter!($name, $desc) };
    (@describe histogram $name:ident $desc:literal) => {
        metrics::describe_histogram!($name, Unit::Seconds, $desc)
    };
    (@zero gauge $name:ident) => { metrics::gauge!($name).set(0.0) };
    (@zero counter $name:ident) => { metrics::counter!($name).increment(0) };
    (@zero counter $name:ident $key:literal [$($label:literal)+]) => {
        $( metrics::counter!($name, $key => $label).increment(0); )+
    };
    (@zero histogram $name:ident) => {};
}

metric_table! {
    /// Gauge: streams (tracked requests) currently open.
    gauge ACTIVE_STREAMS = "tower_drain_active_streams", "Streams currently open";
    /// Counter: streams opened since start.
    counter STREAMS_TOTAL = "tower_drain_streams_total", "Streams opened";
    /// Histogram: how long each stream lived, in seconds.
    histogram STREAM_DURATION_SECONDS = "tower_drain_stream_duration_seconds", "How long each stream lived";
    /// Counter: requests answered without calling the service, by `reason`.
    counter REJECTED_TOTAL = "tower_drain_rejected_total"
        by "reason" in ["draining", "limit", "breaker"],
        "Requests answered without calling the service";
    /// Counter: streams handed a shutdown frame.
    counter NOTIFIED_TOTAL = "tower_drain_notified_total", "Streams handed a shutdown frame";
    /// Counter: streams still open at the grace deadline.
    counter FORCE_CLOSED_TOTAL = "tower_drain_force_closed_total", "Streams still open at the grace deadline";
    /// Counter: timeouts, by `kind`.
    counter TIMEOUTS_TOTAL = "tower_drain_timeouts_total"
        by "kind" in ["response", "lifetime", "idle"],
        "Timeouts by kind";
    /// Gauge: 1 while the error circuit breaker is open, else 0.
    gauge BREAKER_OPEN = "tower_drain_breaker_open", "1 while the error circuit breaker is open";
    /// Counter: times the error circuit breaker opened.
    counter BREAKER_TRIPS_TOTAL = "tower_drain_breaker_trips_total", "Times the error circuit breaker opened";
    /// Counter: response bodies that ended in an error (seen by the guard layer).
    counter STREAM_ERRORS_TOTAL = "tower_drain_stream_errors_total", "Response bodies that ended in an error";
    /// Histogram: time from the start of a drain to `Stopped`, in seconds.
    histogram SHUTDOWN_DURATION_SECONDS = "tower_drain_shutdown_duration_seconds", "Time from the start of a drain to Stopped";
    /// Counter: connection-store operations that failed, labelled `op` = `acquire` (counted by
    /// `TrackLayer`), `release`, `heartbeat`, `sweep` or `cleanup` (counted by the store).
    counter STORE_ERRORS_TOTAL = "tower_drain_store_errors_total"
        by "op" in ["acquire", "release", "heartbeat", "sweep", "cleanup"],
        "Connection store operations that failed";
    /// Counter: leases removed by clean-up sweeps (expired ones and those released at shutdown).
    counter STALE_LEASES_CLEANED_TOTAL = "tower_drain_stale_leases_cleaned_total", "Leases removed by clean-up sweeps";
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
        };
        register_at_zero();
        m
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}
