//! [`TrackCall`]: the track layer's steps around the inner call: register the request (after
//! a per-key lease, when limited), and answer `429` when the key is at its limit.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::request::Parts;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::Body;

use super::guard::StreamGuard;
use super::store::{ConnectionStore, Lease, StoreError, StoreFailure};
use super::stream::TrackHook;
use crate::controller::Shared;
use crate::hook::{AfterCx, Before, CallHook, CallState, Decided};
use crate::route::RoutePath;

pub(crate) type KeyFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// The track layer's call hook.
pub struct TrackCall<St> {
    pub(super) shared: Arc<Shared>,
    pub(super) store: St,
    pub(super) limit: Option<u32>,
    pub(super) key: Option<KeyFn>,
    pub(super) retry_after: HeaderValue,
    /// The same delay, as gRPC answers' pushback.
    pub(super) pushback: Duration,
    pub(super) on_store_error: StoreFailure,
}

/// A keyed request under a limit, waiting for its lease.
pub struct TrackWait<St: ConnectionStore> {
    // Boxed: only keyed requests under a limit wait, and the hook's wait must be `Unpin`.
    acquire: Pin<Box<St::Future>>,
    key: Arc<str>,
    route: RoutePath,
}

/// A call's registration, until the response's body ends (`None`: an upgrade's, which went
/// to the socket's handle, or a rejected request's).
pub struct TrackState(Option<StreamGuard>);

impl<St> TrackCall<St> {
    fn register(
        &self,
        parts: &mut Parts,
        route: RoutePath,
        key: Option<Arc<str>>,
        lease: Option<Lease>,
    ) -> TrackState {
        let guard = StreamGuard::new(self.shared.clone(), route, key, lease);
        // An upgrade's registration goes to the socket's handle, not the (101) body.
        TrackState(crate::ws::hand_over(parts, guard))
    }

    /// The answer to a request turned away: `status` with `retry-after`, or for gRPC the
    /// gRPC-native `code` with the same delay as its pushback.
    fn reject(&self, parts: &Parts, status: StatusCode, code: u16, message: &str) -> Response<()> {
        if crate::grpc::is_grpc(&parts.headers) {
            return crate::grpc::trailers_only(code, message, Some(self.pushback));
        }
        let mut res = Response::new(());
        *res.status_mut() = status;
        res.headers_mut()
            .insert(header::RETRY_AFTER, self.retry_after.clone());
        res
    }
}

impl<St: ConnectionStore> CallHook for TrackCall<St> {
    type State = TrackState;
    type Wait = TrackWait<St>;

    #[inline]
    fn before(&self, parts: &mut Parts) -> Before<TrackState, TrackWait<St>> {
        let route = RoutePath::new(&parts.uri);
        let Some(key_fn) = &self.key else {
            // No key, so no limit.
            return Before::Call(self.register(parts, route, None, None));
        };
        let key = key_fn(parts).map(Arc::<str>::from);
        match (self.limit, key) {
            (Some(limit), Some(key)) => Before::Wait(TrackWait {
                acquire: Box::pin(self.store.acquire(&key, limit)),
                key,
                route,
            }),
            (_, key) => Before::Call(self.register(parts, route, key, None)),
        }
    }

    fn poll_wait(
        &self,
        mut wait: TrackWait<St>,
        parts: &mut Parts,
        cx: &mut Context<'_>,
    ) -> Decided<Self> {
        let res: Result<Option<Lease>, StoreError> = match wait.acquire.as_mut().poll(cx) {
            Poll::Ready(res) => res,
            Poll::Pending => return Before::Wait(wait),
        };
        let TrackWait { key, route, .. } = wait;
        let (status, code, message) = match res {
            Ok(lease @ Some(_)) => {
                return Before::Call(self.register(parts, route, Some(key), lease))
            }
            Ok(None) => {
                self.shared.metrics.rejected_limit.increment(1);
                tracing::debug!(key = %key, "per-key stream limit reached: 429");
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    crate::grpc::RESOURCE_EXHAUSTED,
                    "too many concurrent streams for this key",
                )
            }
            Err(e) => {
                self.shared.metrics.store_errors.increment(1);
                if self.on_store_error == StoreFailure::Open {
                    tracing::debug!(error = %e, "connection store failed: serving without limit");
                    return Before::Call(self.register(parts, route, Some(key), None));
                }
                tracing::warn!(error = %e, "connection store failed: 503 (fail closed)");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    crate::grpc::UNAVAILABLE,
                    "stream limits unavailable: the connection store failed",
                )
            }
        };
        Before::Answer(None, Box::new(self.reject(parts, status, code, message)))
    }
}

impl CallState for TrackState {
    type Hook = TrackHook;

    #[inline(always)]
    fn after<B: Body>(self, _res: &mut Response<B>, _acx: &mut AfterCx) -> TrackHook {
        TrackHook(self.0)
    }
}

impl<St: fmt::Debug> fmt::Debug for TrackCall<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackCall")
            .field("store", &self.store)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl<St: ConnectionStore> fmt::Debug for TrackWait<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackWait").finish_non_exhaustive()
    }
}

crate::macros::opaque_debug!(TrackState);
