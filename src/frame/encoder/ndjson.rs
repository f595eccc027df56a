//! Newline-delimited JSON.

use http::HeaderMap;

use super::{
    content_type_starts_with, exact, json_into, push_u128, Final, FinalFrame, FrameContext,
};
use crate::frame::Boundary;

/// Newline-delimited JSON: one line, `{"type":"shutdown",…,"retry_ms":N}\n` (or
/// `{"error":…,"code":…,"retry_ms":N}\n`).
///
/// Applies to `application/x-ndjson`, `application/ndjson` and `application/jsonl`
/// responses; frames go in after a newline.
///
/// ```
/// use tower_drain::frame::{FinalFrame, FrameContext, FrameKind, NdJson};
/// let out = NdJson::new().encode(&FrameContext::new(FrameKind::Shutdown));
/// let line = out.data_ref().unwrap();
/// assert!(line.ends_with(b"}\n"));
/// let v: serde_json::Value = serde_json::from_slice(line).unwrap();
/// assert_eq!(v["type"], "shutdown");
/// assert_eq!(v["retry_ms"], 30000);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct NdJson {
    _p: (),
}

impl NdJson {
    /// The NDJSON encoder.
    pub const fn new() -> Self {
        Self { _p: () }
    }
}

impl FinalFrame for NdJson {
    fn applies(&self, headers: &HeaderMap) -> bool {
        content_type_starts_with(
            headers,
            &[
                "application/x-ndjson",
                "application/ndjson",
                "application/jsonl",
            ],
        )
    }

    fn boundary(&self) -> Boundary {
        Boundary::Lines
    }

    /// A whole JSON record, `{"type":"heartbeat"}\n`: strict JSON Lines parsers reject the
    /// blank line some servers send. Clients already tell the final frame apart by its
    /// `"type"`; a heartbeat is one more record to skip.
    fn heartbeat(&self) -> Option<&'static [u8]> {
        Some(b"{\"type\":\"heartbeat\"}\n")
    }

    fn encode(&self, ctx: &FrameContext<'_>) -> Final {
        Final::data(exact(|out| {
            json_with_retry_into(ctx, out);
            out.push(b'\n');
        }))
    }
}

/// Appends the JSON object of a final frame with `"retry_ms":N` spliced in (NDJSON has no
/// retry field of its own).
fn json_with_retry_into(ctx: &FrameContext<'_>, v: &mut Vec<u8>) {
    json_into(ctx, v);
    v.pop();
    v.extend_from_slice(b",\"retry_ms\":");
    push_u128(v, ctx.retry.as_millis());
    v.push(b'}');
}
