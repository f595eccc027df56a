//! gRPC trailers.

use std::borrow::Cow;

use http::{HeaderMap, HeaderValue};

use super::{content_type_starts_with, Final, FinalFrame, FrameContext, FrameKind};
use crate::frame::Boundary;

/// gRPC: ends the stream with trailers, `grpc-status: 14` (UNAVAILABLE, so clients retry) for
/// a shutdown, `4` (DEADLINE_EXCEEDED) for a timeout, `16` (UNAUTHENTICATED) for revoked
/// credentials and `13` (INTERNAL) for an error, with a percent-encoded `grpc-message`.
///
/// Applies to `application/grpc` responses; trailers go in between whole messages.
///
/// ```
/// use tower_drain::frame::{FinalFrame, FrameContext, FrameKind, Grpc};
/// let out = Grpc::new().encode(&FrameContext::new(FrameKind::Shutdown));
/// let t = out.trailers_ref().unwrap();
/// assert_eq!(t["grpc-status"], "14");
/// assert!(t["grpc-message"].to_str().unwrap().contains("shutting%20down"));
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Grpc {
    _p: (),
}

impl Grpc {
    /// The gRPC encoder.
    pub const fn new() -> Self {
        Self { _p: () }
    }

    /// The gRPC status code for a frame kind.
    ///
    /// ```
    /// use tower_drain::frame::{FrameKind, Grpc};
    /// assert_eq!(Grpc::status(FrameKind::Shutdown), 14);
    /// ```
    pub const fn status(kind: FrameKind) -> u16 {
        match kind {
            FrameKind::Shutdown | FrameKind::ForcedShutdown => 14,
            FrameKind::Timeout => 4,
            FrameKind::Unauthorized => 16,
            FrameKind::Error => 13,
        }
    }
}

/// What a `grpc-message` percent-encodes: bytes outside 0x20..=0x7E (controls and, through
/// UTF-8, every non-ASCII character), `%` itself, and the space (as grpc-go does).
const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b' ').add(b'%');

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 spec asks.
pub(crate) fn grpc_percent_encode(msg: &str) -> String {
    percent_encoding::utf8_percent_encode(msg, GRPC_MESSAGE).to_string()
}

impl FinalFrame for Grpc {
    fn applies(&self, headers: &HeaderMap) -> bool {
        content_type_starts_with(headers, &["application/grpc"])
            && !content_type_starts_with(headers, &["application/grpc-web"])
    }

    fn boundary(&self) -> Boundary {
        Boundary::LengthPrefixed
    }

    fn encode(&self, ctx: &FrameContext<'_>) -> Final {
        let mut t = HeaderMap::with_capacity(2);
        t.insert("grpc-status", HeaderValue::from(Self::status(ctx.kind)));
        let msg: Cow<'_, str> = match ctx.kind {
            FrameKind::Shutdown | FrameKind::ForcedShutdown => Cow::Borrowed(ctx.message),
            FrameKind::Timeout => Cow::Borrowed("stream timeout"),
            FrameKind::Unauthorized => Cow::Borrowed("credentials no longer valid"),
            FrameKind::Error => Cow::Borrowed("stream error"),
        };
        if let Ok(v) = HeaderValue::try_from(grpc_percent_encode(&msg)) {
            t.insert("grpc-message", v);
        }
        Final::trailers(t)
    }
}
