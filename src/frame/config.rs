//! [`FrameConfig`]: what the frame layer's hooks share.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::encoder::{FinalFrame, FrameContext, FrameKind};
use crate::controller::Shared;

/// What the frame layer's hooks (and the guard's final frames) need: the controller's state and the encoder.
pub(crate) struct FrameConfig {
    pub(crate) shared: Arc<Shared>,
    pub(crate) encoder: Arc<dyn FinalFrame>,
}

impl FrameConfig {
    /// Encodes a final frame of `kind` for one stream.
    pub(crate) fn encode(&self, kind: FrameKind, jitter_seed: u64) -> super::Final {
        let shared = &self.shared;
        let reason = shared.reason().map(|r| r.as_str());
        let ctx = FrameContext {
            kind,
            reason,
            message: shared.config.message(),
            reconnect_delay: shared.config.reconnect_delay,
            retry: Duration::from_millis(shared.jittered_retry_ms(jitter_seed)),
            timestamp: SystemTime::now(),
        };
        self.encoder.encode(&ctx)
    }
}

impl std::fmt::Debug for FrameConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameConfig")
            .field("boundary", &self.encoder.boundary())
            .finish_non_exhaustive()
    }
}
