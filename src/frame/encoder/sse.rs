//! Server-Sent Events.

use http::HeaderMap;

use super::{
    content_type_starts_with, exact, json_into, push_u128, Final, FinalFrame, FrameContext,
};
use crate::frame::Boundary;

/// Server-Sent Events (the default): for a shutdown,
///
/// ```text
/// event: shutdown
/// data: {"type":"shutdown","message":"…","timestamp":"<RFC 3339>","reconnect_delay":30,"reason":"signal"}
/// retry: 27431
///
/// ```
///
/// `retry:` (the jittered reconnect delay in ms) makes a browser's `EventSource` reconnect by
/// itself after that delay. A forced shutdown adds `"forced":true`; timeouts, errors and
/// revoked credentials send `event: error` with `{"error":…,"code":…}`. The data is one line
/// of JSON, so no message can contain a line break that forges a second event.
///
/// Applies to `text/event-stream` responses; frames go in after a blank line.
///
/// ```
/// use tower_drain::frame::{FinalFrame, FrameContext, FrameKind, Sse};
/// let mut ctx = FrameContext::new(FrameKind::Timeout);
/// ctx.retry = std::time::Duration::from_millis(1500);
/// let out = Sse::new().encode(&ctx);
/// assert_eq!(
///     out.data_ref().unwrap(),
///     "event: error\ndata: {\"error\":\"Connection timeout\",\"code\":\"TIMEOUT\"}\nretry: 1500\n\n"
/// );
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Sse {
    _p: (),
}

impl Sse {
    /// The SSE encoder.
    pub const fn new() -> Self {
        Self { _p: () }
    }
}

impl FinalFrame for Sse {
    fn applies(&self, headers: &HeaderMap) -> bool {
        content_type_starts_with(headers, &["text/event-stream"])
    }

    /// An SSE comment line, `:\n\n`, which `EventSource` ignores.
    fn heartbeat(&self) -> Option<&'static [u8]> {
        Some(b":\n\n")
    }

    fn boundary(&self) -> Boundary {
        Boundary::Sse
    }

    fn encode(&self, ctx: &FrameContext<'_>) -> Final {
        let event = if ctx.kind.is_shutdown() {
            "shutdown"
        } else {
            "error"
        };
        Final::data(exact(|out| {
            out.extend_from_slice(b"event: ");
            out.extend_from_slice(event.as_bytes());
            out.extend_from_slice(b"\ndata: ");
            json_into(ctx, out);
            out.extend_from_slice(b"\nretry: ");
            push_u128(out, ctx.retry.as_millis());
            out.extend_from_slice(b"\n\n");
        }))
    }
}
