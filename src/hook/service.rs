//! [`HookService`]: a service with its concerns' call hooks around it.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::call::{Before, CallHook, HookOf};
use super::future::ResponseFuture;
use super::HookBody;

/// The service of every tower-drain layer but [`RejectLayer`](crate::reject::RejectLayer):
/// the inner service with the call hooks `C` of its concerns (for
/// [`DrainStack`](crate::DrainStack), the track layer's, the guard's and the frame layer's
/// in one service). Each request goes through the hooks' steps before the inner call (which
/// may answer at once, or wait for a per-key lease), the inner call, and their steps after
/// it, which make the [`HookBody`] of the response.
///
/// The inner service must be `Clone`: a request that waits for a lease calls the service
/// that was polled ready, and a clone takes its place.
///
/// ```
/// # use http::{Request, Response}; use bytes::Bytes; use http_body_util::Full;
/// # use tower::{Layer, ServiceExt};
/// use tower_drain::{DrainController, guard::GuardLayer};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let drain = DrainController::new();
/// let svc: tower_drain::guard::Guard<_> = GuardLayer::new(drain.watch()).layer(
///     tower::service_fn(|_req: Request<()>| async {
///         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hi"))))
///     }),
/// );
/// assert_eq!(svc.oneshot(Request::new(())).await.unwrap().status(), 200);
/// # }
/// ```
pub struct HookService<S, C> {
    inner: S,
    // Shared by every clone: a clone (axum and tower clone the service per request) touches
    // one reference count, however many concerns there are.
    hooks: Arc<C>,
}

impl<S, C> HookService<S, C> {
    pub(crate) fn new(inner: S, hooks: Arc<C>) -> Self {
        Self { inner, hooks }
    }
}

crate::macros::inner_service_accessors!(HookService<S, C>);

impl<S: Clone, C> Clone for HookService<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            hooks: self.hooks.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for HookService<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookService")
            .field("inner", &self.inner)
            .field("hooks", &std::any::type_name::<C>())
            .finish()
    }
}

impl<S, C, ReqB, B> Service<Request<ReqB>> for HookService<S, C>
where
    S: Service<Request<ReqB>, Response = Response<B>> + Clone,
    C: CallHook,
    B: http_body::Body,
{
    type Response = Response<HookBody<B, HookOf<C>>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // No concern has readiness of its own: the breaker and the limits answer in `call`,
        // where a `Pending` here would stall the connection instead.
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        match self.hooks.before(&mut parts) {
            Before::Call(state) => {
                ResponseFuture::calling(self.inner.call(Request::from_parts(parts, body)), state)
            }
            Before::Answer(state, res) => ResponseFuture::answer(state, res),
            Before::Wait(wait) => {
                // The service polled ready is called once the wait ends; a clone takes its
                // place.
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::waiting(wait, ready, parts, body, self.hooks.clone())
            }
        }
    }
}
