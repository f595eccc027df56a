//! [`TrackHook`]: the registration of one response, released when its body ends.

use std::fmt;
use std::task::Poll;

use http_body::SizeHint;

use super::guard::StreamGuard;
use crate::hook::{Next, Polled, StreamCx, StreamHook};

/// The track layer's hook: the response's registration, which counts its frames and bytes
/// and is released as soon as the body ends (or fails, or is dropped).
#[derive(Default)]
pub struct TrackHook(pub(super) Option<StreamGuard>);

impl StreamHook for TrackHook {
    #[inline(always)]
    fn poll_frame<N: Next>(&mut self, next: &mut N, cx: &mut StreamCx<'_, '_>) -> Polled<N::Error> {
        // Inspected in place and returned as it came: no copy of the frame.
        let res = next.poll_next(cx);
        if let Poll::Ready(r) = &res {
            let guard = &mut self.0;
            if let Some(g) = guard.as_mut() {
                match r {
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            g.frames += 1;
                            g.bytes += d.len() as u64;
                        }
                    }
                    Some(Err(_)) => g.errored = true,
                    None => {}
                }
            }
            // Release as soon as the stream is over: some consumers stop polling once
            // `is_end_stream` is true and keep the body around for a while.
            if !matches!(r, Some(Ok(_))) || next.is_end_stream() {
                guard.take();
            }
        }
        res
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
