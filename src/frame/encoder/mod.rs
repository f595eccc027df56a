//! Final-frame encoders: the [`FinalFrame`] trait, what it is given ([`FrameContext`]) and
//! what it returns ([`Final`]), the helpers every encoder shares (content-type matching, the
//! JSON object, exact-size buffers), and one file per protocol.
//!
//! Imports run one way: the protocol files use this module, never the reverse (apart from
//! the re-exports below).

mod func;
mod grpc;
mod ndjson;
mod sse;
#[cfg(test)]
mod tests;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap};
use serde::Serialize;

use super::Boundary;

pub use self::func::FnFrame;
pub(crate) use self::grpc::grpc_percent_encode;
pub use self::grpc::Grpc;
pub use self::ndjson::NdJson;
pub use self::sse::Sse;

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
