//! [`Mode`]: how a [`Reject`](super::Reject) answers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;

use super::body::ResponseBody;

/// The private half of [`Mode`]: what a mode does to responses (users never call it, and
/// cannot implement a mode).
pub(super) mod sealed {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http::Response;

    pub trait Sealed {
        /// Turns the inner service's (or the responder's) response into this mode's.
        fn wrap<B>(res: Response<B>) -> Response<<Self as super::Mode>::Body<B>>
        where
            Self: super::Mode;

        /// Polls the inner service's future, giving its result in this mode's type.
        fn poll_inner<F, B, E>(
            fut: Pin<&mut F>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<Response<<Self as super::Mode>::Body<B>>, E>>
        where
            Self: super::Mode,
            F: Future<Output = Result<Response<B>, E>>;

        /// The shutdown-frame answer; `None` in a mode without one.
        fn frame<B>(res: Response<Bytes>) -> Option<Response<<Self as super::Mode>::Body<B>>>
        where
            Self: super::Mode;
    }
}

/// How a [`Reject`](super::Reject) answers: [`Plain`] (the default) or [`SseRetry`], chosen with
/// [`RejectLayer::sse_retry`](super::RejectLayer::sse_retry).
///
/// The mode is a type, not a flag, so that the default mode costs nothing: a [`Plain`]
/// `Reject` passes the inner service's response through as it is (same body type, no
/// wrapping), and only [`SseRetry`], which needs a body of its own for the shutdown frame,
/// wraps bodies in [`ResponseBody`](super::ResponseBody). Sealed: no other implementations.
///
/// ```
/// use tower_drain::reject::{Mode, Plain, SseRetry};
/// fn sse_retry<M: Mode>() -> bool { M::SSE_RETRY }
/// assert!(!sse_retry::<Plain>());
/// assert!(sse_retry::<SseRetry>());
/// ```
pub trait Mode: sealed::Sealed + Send + Sync + 'static {
    /// Whether event-stream requests get the shutdown frame instead of the rejection.
    const SSE_RETRY: bool;

    /// The response body of a [`Reject`](super::Reject) whose inner service answers with `B`.
    type Body<B>;
}

/// The default [`Mode`]: every rejected request gets the rejection response, and responses
/// pass through unchanged.
///
/// ```
/// use tower_drain::reject::{Plain, Reject, RejectLayer};
/// let drain = tower_drain::DrainController::new();
/// let layer: RejectLayer<_, Plain> = RejectLayer::new(drain.watch());
/// # drop(layer);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Plain;

/// The [`Mode`] of [`RejectLayer::sse_retry`](super::RejectLayer::sse_retry): event-stream requests get `200` and only the
/// shutdown frame.
///
/// ```
/// use tower_drain::reject::{RejectLayer, SseRetry};
/// let drain = tower_drain::DrainController::new();
/// let layer: RejectLayer<_, SseRetry> = RejectLayer::new(drain.watch()).sse_retry();
/// # drop(layer);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct SseRetry;

impl Mode for Plain {
    const SSE_RETRY: bool = false;
    type Body<B> = B;
}

impl Mode for SseRetry {
    const SSE_RETRY: bool = true;
    type Body<B> = ResponseBody<B>;
}

impl sealed::Sealed for Plain {
    #[inline(always)]
    fn wrap<B>(res: Response<B>) -> Response<B> {
        res
    }

    #[inline(always)]
    fn poll_inner<F, B, E>(fut: Pin<&mut F>, cx: &mut Context<'_>) -> Poll<Result<Response<B>, E>>
    where
        F: Future<Output = Result<Response<B>, E>>,
    {
        // The inner future's own output, untouched.
        fut.poll(cx)
    }

    #[inline]
    fn frame<B>(_res: Response<Bytes>) -> Option<Response<B>> {
        None
    }
}

impl sealed::Sealed for SseRetry {
    #[inline]
    fn wrap<B>(res: Response<B>) -> Response<ResponseBody<B>> {
        res.map(ResponseBody::new)
    }

    #[inline]
    fn poll_inner<F, B, E>(
        fut: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<ResponseBody<B>>, E>>
    where
        F: Future<Output = Result<Response<B>, E>>,
    {
        fut.poll(cx).map(|res| res.map(Self::wrap))
    }

    #[inline]
    fn frame<B>(res: Response<Bytes>) -> Option<Response<ResponseBody<B>>> {
        Some(res.map(ResponseBody::frame))
    }
}

/// `"Plain"` or `"SseRetry"`, for `Debug` output.
pub(super) fn mode_name<M>() -> &'static str {
    let name = std::any::type_name::<M>();
    name.rsplit("::").next().unwrap_or(name)
}
