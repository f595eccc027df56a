//! [`RejectLayer`]: the reject layer's configuration.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use http::request::Parts;
use tower_layer::Layer;

use super::mode::{mode_name, Plain, SseRetry};
use super::response::Default503;
use super::service::{Config, ExemptFn, Reject};
use crate::controller::{Phase, Shared};
use crate::DrainWatch;

/// The default exemption: the probe paths, and gRPC health checking.
pub(super) fn probe_paths(parts: &Parts) -> bool {
    let path = parts.uri.path();
    matches!(
        path,
        "/healthz" | "/readyz" | "/status" | "/drain" | "/metrics"
    ) || path.starts_with("/grpc.health.v1.Health/")
}

/// Rejects new requests while draining. Builds [`Reject`](super::Reject).
///
/// See the [module docs](super) for an example.
#[must_use]
pub struct RejectLayer<R = Default503, M = Plain> {
    shared: Arc<Shared>,
    response: R,
    exempt: ExemptFn,
    from: Phase,
    mode: PhantomData<fn() -> M>,
}

impl RejectLayer<Default503> {
    /// Rejects from `Closing` on with [`Default503`](super::Default503); probe paths are exempt.
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::reject::RejectLayer::new(drain.watch());
    /// # drop(layer);
    /// ```
    pub fn new(watch: DrainWatch) -> Self {
        let config = watch.config();
        let response = Default503::new(config.reconnect_delay()).grpc_message(config.message());
        Self {
            shared: watch.shared,
            response,
            exempt: Arc::new(probe_paths),
            from: Phase::Closing,
            mode: PhantomData,
        }
    }
}

impl<R, M> RejectLayer<R, M> {
    /// Also reject during `Draining` (the propagation delay), not only from `Closing` on.
    /// Off by default: during the propagation delay load balancers may still send traffic,
    /// which should be served.
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::reject::RejectLayer::new(drain.watch()).reject_while_draining(true);
    /// # drop(layer);
    /// ```
    pub fn reject_while_draining(mut self, yes: bool) -> Self {
        self.from = if yes { Phase::Draining } else { Phase::Closing };
        self
    }

    /// Requests for which `f` returns `true` are never rejected (replaces the default probe
    /// paths).
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::reject::RejectLayer::new(drain.watch())
    ///     .exempt(|parts: &http::request::Parts| parts.uri.path().starts_with("/internal/"));
    /// # drop(layer);
    /// ```
    pub fn exempt<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> bool + Send + Sync + 'static,
    {
        self.exempt = Arc::new(f);
        self
    }

    /// Answers a rejected `GET` that accepts `text/event-stream` (every browser `EventSource`
    /// sends `accept: text/event-stream`) with `200`, `content-type: text/event-stream` and a
    /// body of only the SSE shutdown frame (its `retry:` line is the controller's jittered
    /// reconnect delay), instead of the rejection response. Off by default.
    ///
    /// The mode is part of the type ([`SseRetry`](super::SseRetry) instead of [`Plain`](super::Plain)): only this mode wraps
    /// response bodies (in [`ResponseBody`](super::ResponseBody), to carry the frame), so the default one costs
    /// nothing per response.
    ///
    /// The SSE spec makes any non-`200` answer fatal for an `EventSource`: a browser whose
    /// reconnect lands on a draining server and gets `503` closes for good (`readyState`
    /// `CLOSED`), and only a page reload brings it back. With this mode the browser reads the
    /// frame, sees the body end, and reconnects by itself after `retry:` ms — to this server,
    /// which answers the same way while it drains, or to whichever server has replaced it.
    /// It sends `Last-Event-ID` each time, since the frame carries no `id:`.
    ///
    /// The trade-off: the rejection is a `200`, so status-based monitoring, access logs and
    /// load-balancer error counts see a success (the `rejected` count and the
    /// `tower_drain_rejected_total` metric still count it); and a non-browser client that
    /// sends `accept: text/event-stream` but ignores `retry:` may reconnect at once, in a loop,
    /// where `503` + `retry-after` would have slowed it down. Requests without that `accept`
    /// value (curl's `*/*`, gRPC, …) still get the rejection response.
    ///
    /// ```
    /// # use http::{Request, Response}; use bytes::Bytes; use http_body_util::{BodyExt, Empty};
    /// # use tower::{ServiceBuilder, ServiceExt};
    /// use std::time::Duration;
    /// use tower_drain::{DrainController, DrainReason, reject::RejectLayer};
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let drain = DrainController::builder()
    ///     .reconnect_delay(Duration::from_secs(2))
    ///     .reconnect_jitter(0.0)
    ///     .build()
    ///     .unwrap();
    /// let svc = ServiceBuilder::new()
    ///     .layer(RejectLayer::new(drain.watch()).sse_retry())
    ///     .service_fn(|_req: Request<()>| async {
    ///         Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
    ///     });
    /// drain.drain(DrainReason::Manual);
    /// drain.closing().await;
    ///
    /// let req = Request::get("/events").header("accept", "text/event-stream").body(()).unwrap();
    /// let res = svc.clone().oneshot(req).await.unwrap();
    /// assert_eq!(res.status(), 200);
    /// assert_eq!(res.headers()["content-type"], "text/event-stream");
    /// let body = res.into_body().collect().await.unwrap().to_bytes();
    /// assert!(body.starts_with(b"event: shutdown\ndata: {"));
    /// assert!(body.ends_with(b"\nretry: 2000\n\n"));
    ///
    /// // Anything else still gets the 503.
    /// let res = svc.oneshot(Request::get("/events").body(()).unwrap()).await.unwrap();
    /// assert_eq!(res.status(), 503);
    /// # }
    /// ```
    pub fn sse_retry(self) -> RejectLayer<R, SseRetry> {
        RejectLayer {
            shared: self.shared,
            response: self.response,
            exempt: self.exempt,
            from: self.from,
            mode: PhantomData,
        }
    }

    /// Answers rejected requests with `response` instead of [`Default503`](super::Default503).
    pub fn with_response<R2>(self, response: R2) -> RejectLayer<R2, M> {
        RejectLayer {
            shared: self.shared,
            response,
            exempt: self.exempt,
            from: self.from,
            mode: PhantomData,
        }
    }
}

impl<R: Clone, M> Clone for RejectLayer<R, M> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            response: self.response.clone(),
            exempt: self.exempt.clone(),
            from: self.from,
            mode: PhantomData,
        }
    }
}

impl<R, M> fmt::Debug for RejectLayer<R, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RejectLayer")
            .field("from", &self.from)
            .field("mode", &mode_name::<M>())
            .finish_non_exhaustive()
    }
}

impl<S, R: Clone, M> Layer<S> for RejectLayer<R, M> {
    type Service = Reject<S, R, M>;

    fn layer(&self, inner: S) -> Self::Service {
        Reject {
            inner,
            cfg: Arc::new(Config {
                shared: self.shared.clone(),
                response: self.response.clone(),
                exempt: self.exempt.clone(),
                from: self.from,
            }),
            mode: PhantomData,
        }
    }
}
