use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue};
use serde::Serialize;

use super::Boundary;

/// Why a stream is being ended with a final frame.
///
/// ```
/// assert_eq!(tower_drain::frame::FrameKind::Timeout.code(), "TIMEOUT");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FrameKind {
    /// The server is draining; reconnect (elsewhere) after the delay.
    Shutdown,
    /// The grace period ran out; the stream is being force-closed.
    ForcedShutdown,
    /// The stream reached its maximum lifetime or idle limit.
    Timeout,
    /// The stream failed.
    Error,
    /// The stream's credentials are no longer valid.
    Unauthorized,
}

impl FrameKind {
    /// A stable machine-readable code: `SHUTDOWN`, `TIMEOUT`, `STREAM_ERROR`, `UNAUTHORIZED`.
    ///
    /// ```
    /// assert_eq!(tower_drain::frame::FrameKind::ForcedShutdown.code(), "SHUTDOWN");
    /// ```
    pub const fn code(self) -> &'static str {
        match self {
            FrameKind::Shutdown | FrameKind::ForcedShutdown => "SHUTDOWN",
            FrameKind::Timeout => "TIMEOUT",
            FrameKind::Error => "STREAM_ERROR",
            FrameKind::Unauthorized => "UNAUTHORIZED",
        }
    }

    /// Whether this is a (graceful or forced) shutdown.
    ///
    /// ```
    /// assert!(tower_drain::frame::FrameKind::ForcedShutdown.is_shutdown());
    /// ```
    pub const fn is_shutdown(self) -> bool {
        matches!(self, FrameKind::Shutdown | FrameKind::ForcedShutdown)
    }
}

/// Everything an encoder may put in a final frame.
///
/// ```
/// use tower_drain::frame::{FrameContext, FrameKind};
/// let ctx = FrameContext::new(FrameKind::Shutdown);
/// assert_eq!(ctx.reconnect_delay.as_secs(), 30);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct FrameContext<'a> {
    /// Why the stream ends.
    pub kind: FrameKind,
    /// The drain reason (`signal`, `manual`, …), if a drain is under way.
    pub reason: Option<&'a str>,
    /// The human-readable message.
    pub message: &'a str,
    /// The configured reconnect delay.
    pub reconnect_delay: Duration,
    /// This stream's reconnect hint: the delay with jitter applied.
    pub retry: Duration,
    /// When the frame is produced.
    pub timestamp: SystemTime,
}

impl FrameContext<'static> {
    /// A context with the defaults of [`DrainController::new`](crate::DrainController::new),
    /// for tests and examples.
    pub fn new(kind: FrameKind) -> Self {
        Self {
            kind,
            reason: None,
            message: "Server is shutting down, please reconnect",
            reconnect_delay: Duration::from_secs(30),
            retry: Duration::from_secs(30),
            timestamp: SystemTime::now(),
        }
    }
}

/// What an encoder produces: data to send, trailers to end with, or both.
///
/// ```
/// let f = tower_drain::frame::Final::data("bye\n");
/// assert!(f.trailers_ref().is_none());
/// ```
#[derive(Clone, Debug, Default)]
pub struct Final {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Final {
    /// A final data frame.
    pub fn data(data: impl Into<Bytes>) -> Self {
        Self {
            data: Some(data.into()),
            trailers: None,
        }
    }

    /// Final trailers.
    pub fn trailers(trailers: HeaderMap) -> Self {
        Self {
            data: None,
            trailers: Some(trailers),
        }
    }

    /// Adds trailers after the data.
    ///
    /// ```
    /// let f = tower_drain::frame::Final::data("x").with_trailers(http::HeaderMap::new());
    /// assert!(f.trailers_ref().is_some());
    /// ```
    pub fn with_trailers(mut self, trailers: HeaderMap) -> Self {
        self.trailers = Some(trailers);
        self
    }

    /// The data part.
    ///
    /// ```
    /// assert_eq!(tower_drain::frame::Final::data("x").data_ref().unwrap(), "x");
    /// ```
    pub fn data_ref(&self) -> Option<&Bytes> {
        self.data.as_ref()
    }

    /// The trailers part.
    pub fn trailers_ref(&self) -> Option<&HeaderMap> {
        self.trailers.as_ref()
    }

    pub(crate) fn into_parts(self) -> (Option<Bytes>, Option<HeaderMap>) {
        (self.data, self.trailers)
    }
}

/// Turns a [`FrameContext`] into the protocol's final frame.
///
/// Implemented by [`Sse`] (the default), [`NdJson`], [`Grpc`] and [`FnFrame`] (any closure).
///
/// ```
/// use tower_drain::frame::{FinalFrame, FrameContext, FrameKind, Sse};
/// let out = Sse::new().encode(&FrameContext::new(FrameKind::Shutdown));
/// assert!(out.data_ref().unwrap().starts_with(b"event: shutdown\n"));
/// ```
pub trait FinalFrame: Send + Sync + 'static {
    /// Whether a response with these headers carries this protocol (by content type).
    fn applies(&self, headers: &HeaderMap) -> bool;

    /// Where frames may be inserted.
    fn boundary(&self) -> Boundary;

    /// The final frame.
    fn encode(&self, ctx: &FrameContext<'_>) -> Final;

    /// The keep-alive the guard's [`heartbeat`](crate::guard::GuardBuilder::heartbeat) sends
    /// after a silence, at an event boundary: a whole record of the protocol that clients
    /// ignore, or `None` (the default) for protocols without one.
    ///
    /// ```
    /// use tower_drain::frame::{FinalFrame, Grpc, NdJson, Sse};
    /// assert_eq!(Sse::new().heartbeat(), Some(&b":\n\n"[..]));
    /// assert_eq!(NdJson::new().heartbeat(), Some(&b"{\"type\":\"heartbeat\"}\n"[..]));
    /// assert_eq!(Grpc::new().heartbeat(), None);
    /// ```
    fn heartbeat(&self) -> Option<&'static [u8]> {
        None
    }
}

fn content_type_starts_with(headers: &HeaderMap, prefixes: &[&str]) -> bool {
    // On the raw bytes: every response passes here (twice in `DrainStack`), and a prefix of
    // ASCII letters needs no UTF-8 or visible-ASCII check of the whole value first.
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    let ct = ct.as_bytes();
    let ct = &ct[ct.iter().take_while(|b| b.is_ascii_whitespace()).count()..];
    prefixes
        .iter()
        .any(|p| ct.len() >= p.len() && ct[..p.len()].eq_ignore_ascii_case(p.as_bytes()))
}

#[derive(Serialize)]
struct ShutdownData<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    message: &'a str,
    timestamp: String,
    reconnect_delay: u64,
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    forced: bool,
}

#[derive(Serialize)]
struct ErrorData {
    error: &'static str,
    code: &'static str,
}

/// The JSON object of a final frame; `serde_json` escapes every control character, so the
/// result never contains a raw CR or LF.
/// Appends the JSON object of a final frame with `"retry_ms":N` spliced in (NDJSON has no
/// retry field of its own).
fn json_with_retry_into(ctx: &FrameContext<'_>, v: &mut Vec<u8>) {
    json_into(ctx, v);
    v.pop();
    v.extend_from_slice(b",\"retry_ms\":");
    push_u128(v, ctx.retry.as_millis());
    v.push(b'}');
}

fn serialize(ctx: &FrameContext<'_>) -> Vec<u8> {
    match ctx.kind {
        FrameKind::Shutdown | FrameKind::ForcedShutdown => serde_json::to_vec(&ShutdownData {
            ty: "shutdown",
            message: ctx.message,
            timestamp: humantime::format_rfc3339_millis(ctx.timestamp).to_string(),
            reconnect_delay: ctx.reconnect_delay.as_secs(),
            reason: ctx.reason,
            forced: ctx.kind == FrameKind::ForcedShutdown,
        }),
        kind => serde_json::to_vec(&ErrorData {
            error: match kind {
                FrameKind::Timeout => "Connection timeout",
                FrameKind::Unauthorized => "Unauthorized",
                _ => "Stream error",
            },
            code: kind.code(),
        }),
    }
    .unwrap_or_default()
}

/// What a shutdown object depends on; the timestamp only to the millisecond it is written with.
#[derive(PartialEq, Eq)]
struct JsonKey {
    kind: FrameKind,
    millis: u128,
    reconnect_delay: u64,
    message: Box<str>,
    reason: Option<Box<str>>,
}

impl JsonKey {
    fn matches(&self, ctx: &FrameContext<'_>, millis: u128) -> bool {
        self.millis == millis
            && self.kind == ctx.kind
            && self.reconnect_delay == ctx.reconnect_delay.as_secs()
            && *self.message == *ctx.message
            && self.reason.as_deref() == ctx.reason
    }
}

thread_local! {
    /// The last shutdown object this thread serialised. A drain writes thousands of frames
    /// whose objects differ only when the millisecond changes, so they are serialised (JSON
    /// escaping, RFC 3339 formatting, several allocations) once per millisecond per thread
    /// rather than once per stream; the result is the same bytes.
    static LAST_JSON: std::cell::RefCell<Option<(JsonKey, Vec<u8>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Appends the JSON object of a final frame to `out`.
fn json_into(ctx: &FrameContext<'_>, out: &mut Vec<u8>) {
    let millis = match ctx.timestamp.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) if ctx.kind.is_shutdown() => d.as_millis(),
        _ => return out.extend_from_slice(&serialize(ctx)),
    };
    LAST_JSON.with(|cell| {
        let Ok(mut last) = cell.try_borrow_mut() else {
            return out.extend_from_slice(&serialize(ctx));
        };
        match &*last {
            Some((key, json)) if key.matches(ctx, millis) => out.extend_from_slice(json),
            _ => {
                let json = serialize(ctx);
                out.extend_from_slice(&json);
                *last = Some((
                    JsonKey {
                        kind: ctx.kind,
                        millis,
                        reconnect_delay: ctx.reconnect_delay.as_secs(),
                        message: ctx.message.into(),
                        reason: ctx.reason.map(Into::into),
                    },
                    json,
                ));
            }
        }
    })
}

thread_local! {
    /// Where [`exact`] writes a frame before copying it out.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The bytes `write` appends to an empty buffer, in one allocation of their exact size: a
/// `Vec` with spare capacity would become a `Bytes` with a second allocation for its shared
/// header (one frame per stream at a drain: ten thousand of each at once).
fn exact(write: impl Fn(&mut Vec<u8>)) -> Bytes {
    let scratch = SCRATCH.try_with(|cell| {
        let mut buf = cell.try_borrow_mut().ok()?;
        buf.clear();
        write(&mut buf);
        let out = Bytes::copy_from_slice(&buf);
        if buf.capacity() > 4096 {
            // An unusually long message: do not keep its buffer for the thread's lifetime.
            *buf = Vec::new();
        }
        Some(out)
    });
    scratch.ok().flatten().unwrap_or_else(|| {
        // Re-entered (an encoder inside an encoder) or at thread exit: a buffer of its own.
        let mut buf = Vec::new();
        write(&mut buf);
        Bytes::from(buf.into_boxed_slice())
    })
}

/// Appends `n` in decimal (no `format!` and its allocation below `u64::MAX`).
fn push_u128(out: &mut Vec<u8>, n: u128) {
    // Milliseconds fit in 64 bits for 584 million years; 64-bit division is several times
    // cheaper than 128-bit, one per digit.
    let Ok(mut n) = u64::try_from(n) else {
        return push_u128_wide(out, n);
    };
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cold]
fn push_u128_wide(out: &mut Vec<u8>, n: u128) {
    out.extend_from_slice(n.to_string().as_bytes());
}

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

/// A final frame from a closure, for any other protocol.
///
/// Applies to every response unless narrowed with [`content_type`](Self::content_type).
///
/// ```
/// use tower_drain::frame::{Boundary, FinalFrame, FnFrame, Final, FrameContext, FrameKind};
/// let enc = FnFrame::new(Boundary::Lines, |ctx: &FrameContext<'_>| {
///     Final::data(format!("BYE {}\n", ctx.kind.code()))
/// })
/// .content_type("text/plain");
/// assert_eq!(enc.encode(&FrameContext::new(FrameKind::Shutdown)).data_ref().unwrap(), "BYE SHUTDOWN\n");
/// ```
#[derive(Clone)]
pub struct FnFrame<F> {
    boundary: Boundary,
    content_type: Option<Arc<str>>,
    heartbeat: Option<&'static [u8]>,
    f: F,
}

impl<F> FnFrame<F>
where
    F: Fn(&FrameContext<'_>) -> Final + Send + Sync + 'static,
{
    /// An encoder from a closure.
    pub fn new(boundary: Boundary, f: F) -> Self {
        Self {
            boundary,
            content_type: None,
            heartbeat: None,
            f,
        }
    }

    /// Applies only to responses whose content type starts with `prefix`.
    pub fn content_type(mut self, prefix: &str) -> Self {
        self.content_type = Some(Arc::from(prefix));
        self
    }

    /// The keep-alive record for the guard's heartbeat (none by default): a whole record of
    /// the protocol, ending at a boundary.
    ///
    /// ```
    /// use tower_drain::frame::{Boundary, FinalFrame, FnFrame, Final, FrameContext};
    /// let enc = FnFrame::new(Boundary::Lines, |_: &FrameContext<'_>| Final::data("BYE\n"))
    ///     .with_heartbeat(b"PING\n");
    /// assert_eq!(enc.heartbeat(), Some(&b"PING\n"[..]));
    /// ```
    pub fn with_heartbeat(mut self, record: &'static [u8]) -> Self {
        self.heartbeat = Some(record);
        self
    }
}

impl<F> FinalFrame for FnFrame<F>
where
    F: Fn(&FrameContext<'_>) -> Final + Send + Sync + 'static,
{
    fn applies(&self, headers: &HeaderMap) -> bool {
        match &self.content_type {
            Some(p) => content_type_starts_with(headers, &[p]),
            None => true,
        }
    }

    fn boundary(&self) -> Boundary {
        self.boundary
    }

    fn encode(&self, ctx: &FrameContext<'_>) -> Final {
        (self.f)(ctx)
    }

    fn heartbeat(&self) -> Option<&'static [u8]> {
        self.heartbeat
    }
}

impl<F> fmt::Debug for FnFrame<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnFrame")
            .field("boundary", &self.boundary)
            .field("content_type", &self.content_type)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_in_decimal_at_any_width() {
        for n in [
            0,
            9,
            10,
            27_431,
            u128::from(u64::MAX),
            u128::from(u64::MAX) + 1,
            u128::MAX,
        ] {
            let mut out = b"x".to_vec();
            push_u128(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
        }
    }

    #[test]
    fn frames_do_not_depend_on_a_previous_frame() {
        // The scratch buffer is reused: a long message then a short one.
        let mut ctx = FrameContext::new(FrameKind::Shutdown);
        let long = "m".repeat(10_000);
        ctx.message = &long;
        let first = Sse::new().encode(&ctx);
        assert!(first.data_ref().unwrap().len() > 10_000);
        ctx.message = "short";
        let second = NdJson::new().encode(&ctx);
        let line = second.data_ref().unwrap();
        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
        assert_eq!(v["message"], "short");
        assert!(line.ends_with(b"}\n"));
    }

    #[test]
    fn sse_shutdown_frame_is_exact() {
        let mut ctx = FrameContext::new(FrameKind::Shutdown);
        ctx.reason = Some("signal");
        ctx.retry = Duration::from_millis(27_431);
        ctx.timestamp = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let out = Sse::new().encode(&ctx);
        assert_eq!(
            out.data_ref().unwrap(),
            "event: shutdown\ndata: {\"type\":\"shutdown\",\"message\":\"Server is shutting down, please reconnect\",\"timestamp\":\"2023-11-14T22:13:20.000Z\",\"reconnect_delay\":30,\"reason\":\"signal\"}\nretry: 27431\n\n"
        );
        ctx.kind = FrameKind::ForcedShutdown;
        let forced = Sse::new().encode(&ctx);
        assert!(std::str::from_utf8(forced.data_ref().unwrap())
            .unwrap()
            .contains(",\"forced\":true}\n"));
    }

    #[test]
    fn content_types() {
        let h = |ct: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            m
        };
        assert!(Sse::new().applies(&h("text/event-stream")));
        assert!(Sse::new().applies(&h("Text/Event-Stream; charset=utf-8")));
        assert!(!Sse::new().applies(&h("text/plain")));
        assert!(!Sse::new().applies(&HeaderMap::new()));
        assert!(NdJson::new().applies(&h("application/x-ndjson")));
        assert!(Grpc::new().applies(&h("application/grpc+proto")));
        assert!(!Grpc::new().applies(&h("application/grpc-web")));
        assert!(!Grpc::new().applies(&h("application/grpc-web+proto")));
        assert!(!Sse::new().applies(&h("text/event")));
        assert!(!Sse::new().applies(&h("")));
        // Leading whitespace is skipped; bytes outside visible ASCII after the type (allowed in
        // a header value) do not hide it.
        assert!(Sse::new().applies(&h(" \ttext/event-stream")));
        let mut m = HeaderMap::new();
        let v = HeaderValue::from_bytes(b"text/event-stream; x=\xe9").unwrap();
        m.insert(header::CONTENT_TYPE, v);
        assert!(Sse::new().applies(&m));
    }

    /// A spec-following SSE parser (CR, LF and CRLF end lines; a blank line dispatches).
    fn parse_sse(text: &str) -> Vec<(String, String, Option<String>)> {
        let mut events = Vec::new();
        let (mut event, mut data, mut retry) = (String::new(), Vec::<String>::new(), None);
        let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
        for line in normalized.split('\n') {
            if line.is_empty() {
                if !data.is_empty() || !event.is_empty() {
                    events.push((std::mem::take(&mut event), data.join("\n"), retry.take()));
                    data.clear();
                }
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = value.to_string(),
                "data" => data.push(value.to_string()),
                "retry" => retry = Some(value.to_string()),
                _ => {}
            }
        }
        events
    }

    proptest::proptest! {
        #[test]
        fn no_message_or_reason_can_forge_an_event(
            message in ".*",
            reason in "(\\PC|\r|\n|\u{0})*",
            kind in 0usize..5,
            retry_ms in 0u64..1_000_000,
        ) {
            let kinds = [
                FrameKind::Shutdown,
                FrameKind::ForcedShutdown,
                FrameKind::Timeout,
                FrameKind::Error,
                FrameKind::Unauthorized,
            ];
            let mut ctx = FrameContext::new(kinds[kind]);
            let message = format!("{message}\n\nevent: x\ndata: forged\r\n\r\n");
            ctx.message = &message;
            ctx.reason = Some(&reason);
            ctx.retry = Duration::from_millis(retry_ms);
            let out = Sse::new().encode(&ctx);
            let text = std::str::from_utf8(out.data_ref().unwrap()).unwrap();
            let events = parse_sse(text);
            proptest::prop_assert_eq!(events.len(), 1, "{:?}", text);
            let (event, data, retry) = &events[0];
            let expected = if kinds[kind].is_shutdown() { "shutdown" } else { "error" };
            proptest::prop_assert_eq!(event.as_str(), expected);
            let retry_text = retry_ms.to_string();
            proptest::prop_assert_eq!(retry.as_deref(), Some(retry_text.as_str()));
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            if kinds[kind].is_shutdown() {
                proptest::prop_assert_eq!(v["message"].as_str(), Some(message.as_str()));
                proptest::prop_assert_eq!(v["reason"].as_str(), Some(reason.as_str()));
            }
            // NDJSON: exactly one line whatever the message.
            let line = NdJson::new().encode(&ctx).into_parts().0.unwrap();
            proptest::prop_assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
            proptest::prop_assert!(line.ends_with(b"\n"));
        }
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(grpc_percent_encode("a b%\n\u{e9}"), "a%20b%25%0A%C3%A9");
    }
}
