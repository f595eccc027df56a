//! [`FrameLayer`]: the frame layer's configuration, and what it builds.

use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use super::config::FrameConfig;
use super::encoder::{FinalFrame, Sse};
use super::stream::FrameHook;
use crate::hook::{HookBody, HookService};
use crate::DrainWatch;

/// Injects the protocol's final frame into streaming responses when the controller closes.
/// Builds [`Frame`], whose streams' bodies get a frame hook ([`FrameBody`]).
///
/// See the [module docs](super) for an example.
#[derive(Clone)]
#[must_use]
pub struct FrameLayer {
    pub(crate) cfg: Arc<FrameConfig>,
}

impl FrameLayer {
    /// Injects Server-Sent Events frames ([`Sse`]).
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::frame::FrameLayer::new(drain.watch());
    /// # drop(layer);
    /// ```
    pub fn new(watch: DrainWatch) -> Self {
        Self::with_encoder(watch, Sse::new())
    }

    /// Injects frames made by `encoder` ([`NdJson`](super::NdJson), [`Grpc`](super::Grpc),
    /// [`FnFrame`](super::FnFrame), …).
    ///
    /// ```
    /// use tower_drain::frame::{FrameLayer, Grpc};
    /// let drain = tower_drain::DrainController::new();
    /// let layer = FrameLayer::with_encoder(drain.watch(), Grpc::new());
    /// # drop(layer);
    /// ```
    pub fn with_encoder(watch: DrainWatch, encoder: impl FinalFrame) -> Self {
        Self {
            cfg: Arc::new(FrameConfig {
                shared: watch.shared,
                encoder: Arc::new(encoder),
            }),
        }
    }
}

impl<S> Layer<S> for FrameLayer {
    type Service = Frame<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HookService::new(inner, Arc::new(self.clone()))
    }
}

impl fmt::Debug for FrameLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameLayer")
            .field("boundary", &self.cfg.encoder.boundary())
            .finish_non_exhaustive()
    }
}

/// The service built by [`FrameLayer`]: the inner service with the frame layer's call hook
/// (the layer itself).
pub type Frame<S> = HookService<S, FrameLayer>;

/// The response body of [`Frame`]: the inner body, plus one final frame injected at an event
/// boundary once the controller is `Closing` (after this stream's share of the drain
/// spread), after which the body ends. Responses the encoder does not apply to pass through.
pub type FrameBody<B> = HookBody<B, FrameHook>;
