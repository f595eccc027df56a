//! A final frame from a closure.

use std::fmt;
use std::sync::Arc;

use http::HeaderMap;

use super::{content_type_starts_with, Final, FinalFrame, FrameContext};
use crate::frame::Boundary;

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
