//! [`FrameCall`]: the frame layer's steps around the inner call.

use std::convert::Infallible;
use std::sync::Arc;

use http::request::Parts;
use http::{header, Method, Response, StatusCode};
use http_body::Body;

use super::config::FrameConfig;
use super::encoder::FinalFrame;
use super::layer::FrameLayer;
use super::stream::FrameHook;
use crate::hook::{AfterCx, Before, CallHook, CallState};

/// A call through the frame layer: its configuration, or none for a `HEAD` request (whose
/// empty answer never gets a frame).
pub struct FrameState(Option<Arc<FrameConfig>>);

/// The frame layer's call hook: streams of its encoder's protocol get a [`FrameHook`].
impl CallHook for FrameLayer {
    type State = FrameState;
    type Wait = Infallible;

    #[inline(always)]
    fn before(&self, parts: &mut Parts) -> Before<FrameState, Infallible> {
        Before::Call(FrameState(
            (parts.method != Method::HEAD).then(|| self.cfg.clone()),
        ))
    }
}

impl CallState for FrameState {
    type Hook = FrameHook;

    #[inline]
    fn after<B: Body>(self, res: &mut Response<B>, acx: &mut AfterCx) -> FrameHook {
        match self.0 {
            Some(cfg) if acx.stream(&cfg, res) => {
                // Shared with a guard outside: one final frame per stream.
                acx.offer_gate();
                let rtc = run_to_completion(res);
                FrameHook::stream(cfg, rtc)
            }
            _ => FrameHook::default(),
        }
    }
}

/// Response extension: inject the final frame into this response even though the encoder
/// does not recognise its content type.
///
/// ```
/// let mut res = http::Response::new(());
/// res.extensions_mut().insert(tower_drain::frame::Inject);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Inject;

/// Response extension: this stream cannot resume elsewhere (a report being generated, a long
/// export), so it gets no shutdown frame when `Closing` begins; it is left to finish by itself
/// within the grace period and is force-closed only at the deadline.
///
/// ```
/// let mut res = http::Response::new(());
/// res.extensions_mut().insert(tower_drain::frame::RunToCompletion);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct RunToCompletion;

const GRPC_STATUS: header::HeaderName = header::HeaderName::from_static("grpc-status");

/// Prepares the headers of a response whose body may get frames added (final frames,
/// heartbeats): its `content-length` no longer holds, so it goes (HTTP/1.1 then sends the body
/// chunked). The body's `size_hint` has no upper bound for as long as a frame may be added.
#[inline]
pub(crate) fn unfix_length<B>(res: &mut Response<B>) {
    res.headers_mut().remove(header::CONTENT_LENGTH);
}

/// Whether the application asked for `res` to run to completion ([`RunToCompletion`]).
#[inline]
pub(crate) fn run_to_completion<B>(res: &Response<B>) -> bool {
    res.extensions().get::<RunToCompletion>().is_some()
}

/// Only streaming responses of the encoder's protocol (or opted in), never bodiless statuses,
/// bodies that have already ended (a gRPC "Trailers-Only" answer, with `grpc-status` in its
/// headers and an empty body, keeps its END_STREAM on the HEADERS frame) or already-encoded
/// bodies (put `FrameLayer` inside any compression layer).
pub(crate) fn should_inject<B: Body>(res: &Response<B>, encoder: &dyn FinalFrame) -> bool {
    let status = res.status();
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return false;
    }
    // The content type first: most responses are not streams and stop here, before the
    // other header lookups.
    (encoder.applies(res.headers()) || res.extensions().get::<Inject>().is_some())
        && !res.body().is_end_stream()
        && !res.headers().contains_key(GRPC_STATUS)
        && !res.headers().contains_key(header::CONTENT_ENCODING)
}

crate::macros::opaque_debug!(FrameState);
