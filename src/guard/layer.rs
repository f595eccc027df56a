use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use super::breaker::Breaker;
use super::config::{Config, Settings};
use super::stream::GuardHook;
use crate::frame::FrameConfig;
use crate::hook::{HookBody, HookService};
use crate::DrainWatch;

/// Timeouts, stream lifetime, idle limit and heartbeat, revalidation, and an error circuit
/// breaker. Builds [`Guard`].
///
/// [`new`](Self::new) gives the defaults: no response timeout, no lifetime, idle or heartbeat
/// limit, no revalidation, the circuit breaker off, body errors ending the stream with an
/// error frame, final frames and heartbeats in SSE. Anything else is configured with a
/// [`GuardBuilder`](super::GuardBuilder) ([`builder`](Self::builder)), whose [`build`](super::GuardBuilder::build) checks
/// the settings; [`to_builder`](Self::to_builder) gives a layer's settings back to change them.
///
/// See the [module docs](super) for an example.
#[derive(Clone)]
#[must_use]
pub struct GuardLayer {
    pub(super) cfg: Arc<Config>,
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
        Self::of(Config::new(Settings::new(watch)))
    }

    /// The layer of `cfg`.
    pub(super) fn of(cfg: Config) -> Self {
        Self { cfg: Arc::new(cfg) }
    }

    /// Shares a frame layer's encoder (used by `DrainStack`).
    pub(crate) fn frame_config(mut self, frame: Arc<FrameConfig>) -> Self {
        Arc::make_mut(&mut self.cfg).settings.frame = frame;
        self
    }

    /// Whether this layer's final frames come from `frame` (the same configuration).
    pub(crate) fn shares_frame_config(&self, frame: &Arc<FrameConfig>) -> bool {
        Arc::ptr_eq(&self.cfg.frame, frame)
    }

    /// The circuit breaker shared by every service this layer builds, or `None` when it is off.
    /// Each [`build`](super::GuardBuilder::build) makes a new breaker: take the handle from the layer
    /// you serve with.
    ///
    /// ```
    /// use tower_drain::guard::{BreakerState, GuardLayer};
    /// let layer = GuardLayer::new(tower_drain::DrainController::new().watch());
    /// assert!(layer.breaker().is_none()); // off by default
    /// let layer = layer.to_builder().circuit_breaker(true).build().unwrap();
    /// assert_eq!(layer.breaker().unwrap().state(), BreakerState::Closed);
    /// ```
    pub fn breaker(&self) -> Option<Breaker> {
        self.cfg.breaker.clone()
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HookService::new(inner, Arc::new(self.clone()))
    }
}

/// The service built by [`GuardLayer`]: the inner service with the guard's call hook (the
/// layer itself).
pub type Guard<S> = HookService<S, GuardLayer>;

/// The response body of [`Guard`]: for streaming responses of the configured protocol it
/// enforces the maximum lifetime and the idle limit, injects heartbeats, runs revalidation
/// checks, and turns a mid-stream error into the final error frame, each only at an event
/// boundary. Every timer of a stream shares one pinned `Sleep`, moved with `Sleep::reset` only
/// when it fires; nothing is allocated per forwarded frame. Other responses pass through (an
/// error still counts for the breaker).
pub type GuardedBody<B> = HookBody<B, GuardHook>;

impl fmt::Debug for GuardLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("GuardLayer").field(&self.cfg).finish()
    }
}
