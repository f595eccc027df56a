//! [`TrackHook`]: the registration of one response, released when its body ends.

use std::fmt;
use std::task::Poll;

use bytes::Bytes;
use http_body::SizeHint;

use super::guard::StreamGuard;
use crate::hook::{Next, Polled, StreamCx, StreamHook};

/// The track layer's hook: the response's registration, which counts its frames and bytes
/// and is released as soon as the body ends (or fails, or is dropped).
#[derive(Default)]
pub struct TrackHook(pub(super) Option<StreamGuard>);

impl TrackHook {
    /// Counts a data frame.
    #[inline(always)]
    fn count(&mut self, data: &Bytes) {
        if let Some(g) = self.0.as_mut() {
            g.frames += 1;
            g.bytes += data.len() as u64;
        }
    }
}

impl StreamHook for TrackHook {
    #[inline(always)]
    fn poll_frame<N: Next>(&mut self, next: &mut N, cx: &mut StreamCx<'_, '_>) -> Polled<N::Error> {
        // Inspected in place and returned as it came: no copy of the frame.
        let res = next.poll_next(cx);
        match &res {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.count(d);
                }
                if next.is_end_stream() {
                    self.0.take();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(g) = self.0.as_mut() {
                    g.errored = true;
                }
                // Released as soon as the stream is over.
                self.0.take();
            }
            Poll::Ready(None) => {
                self.0.take();
            }
            Poll::Pending => {}
        }
        res
    }

    #[inline(always)]
    fn passive(&self) -> bool {
        true
    }

    #[inline(always)]
    fn on_data(&mut self, data: &Bytes, inner_end: impl Fn() -> bool) {
        self.count(data);
        // Release as soon as the stream is over: some consumers stop polling once
        // `is_end_stream` is true and keep the body around for a while.
        if inner_end() {
            self.0.take();
        }
    }

    #[inline]
    fn is_end_stream(&self, inner: impl FnOnce() -> bool) -> bool {
        inner()
    }

    fn size_hint(&self, inner: impl FnOnce() -> SizeHint) -> SizeHint {
        inner()
    }

    #[inline]
    fn take_aborted(&mut self) -> bool {
        false
    }
}

impl fmt::Debug for TrackHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackHook")
            .field("tracked", &self.0.is_some())
            .finish()
    }
}
