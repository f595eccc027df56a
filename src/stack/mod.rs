//! [`DrainStack`]: every tower-drain layer, configured and composed in the right order.
//!
//! ```text
//! RejectLayer → TrackLayer → GuardLayer → FrameLayer → your service
//! (503 while    (count, limit  (timeouts,    (final frame
//!  closing)      per key)       breaker)      at a boundary)
//! ```
//!
//! The layers are the same as when stacked by hand, and each concern has one implementation:
//! [`DrainService`] is the reject layer's service around one
//! [`HookService`] that runs the track layer's, the guard's and the
//! frame layer's call hooks in order, and answers with one [`DrainBody`] (a
//! [`HookBody`] with their three stream hooks) instead of three nested
//! bodies. The compiler fuses the hooks into one service and one body; a stream that nothing
//! is about to happen to (serving, no guard limits) forwards each frame with one boundary
//! update and each hook's bookkeeping, which is what a body polled for every event of a long
//! stream needs. The answers are the same as the hand-stacked layers' (`tests/equivalence.rs`
//! checks bytes, counts and reports side by side).
//!
//! Each layer is configured with its own settings, through a closure: [`DrainStack::track`]
//! gets the [`TrackLayer`] (per-key limits, the store), [`DrainStack::reject`] the
//! [`RejectLayer`] (exemptions, `sse_retry`), [`DrainStack::guard`] the guard's
//! [`GuardBuilder`] (timeouts, lifetime, heartbeat, circuit breaker), whose settings it checks.
//!
//! # Example
//!
//! ```
//! # use http::{Request, Response, StatusCode}; use bytes::Bytes; use http_body_util::Full;
//! # use tower::{ServiceBuilder, ServiceExt};
//! use tower_drain::{DrainController, DrainReason, DrainStack};
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let drain = DrainController::new();
//! let stack = DrainStack::new(drain.watch())
//!     .track(|t| t.max_per_key(10).key_header(http::HeaderName::from_static("x-client-id")));
//! let svc = ServiceBuilder::new()
//!     .layer(stack)
//!     .service_fn(|_req: Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hi"))))
//!     });
//! let res = svc.clone().oneshot(Request::new(())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//!
//! drain.drain(DrainReason::Manual);
//! drain.closing().await;
//! let res = svc.oneshot(Request::new(())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! # }
//! ```
//!
//! The guard's limits, for example a maximum stream lifetime and heartbeats; an invalid value
//! is a [`ConfigError`] naming the setting:
//!
//! ```
//! use std::time::Duration;
//! use tower_drain::{DrainController, DrainStack};
//! let drain = DrainController::new();
//! let stack = DrainStack::new(drain.watch())
//!     .guard(|g| {
//!         g.max_lifetime(Duration::from_secs(1800))
//!             .heartbeat(Duration::from_secs(15))
//!     })
//!     .unwrap();
//! let err = DrainStack::new(drain.watch())
//!     .guard(|g| g.max_lifetime(Duration::ZERO))
//!     .unwrap_err();
//! assert_eq!(err.setting(), "max_lifetime");
//! # drop(stack);
//! ```

use std::sync::Arc;

use crate::frame::FrameHook;
use crate::guard::GuardHook;
use crate::hook::{HookBody, HookService};
use crate::reject::Reject;
use crate::track::{TrackCall, TrackHook};

/// The call hooks of [`DrainStack`]'s service, in order: track, guard, frame.
type StackCalls<St> = (TrackCall<St>, (GuardLayer, FrameLayer));

/// The service built by [`DrainStack`]: the reject layer's service around one
/// [`HookService`] with the track layer's, the guard's and the frame layer's call hooks.
pub type DrainService<S, St = MemoryStore, M = Plain> =
    Reject<HookService<S, StackCalls<St>>, Default503, M>;

/// The response body of [`DrainService`]: the inner body with the track layer's, the
/// guard's and the frame layer's hooks around it, in one body (wrapped in the reject layer's
/// body with [`RejectLayer::sse_retry`](crate::reject::RejectLayer::sse_retry)).
pub type DrainBody<B> = HookBody<B, (TrackHook, (GuardHook, FrameHook))>;

use tower_layer::Layer;

use crate::frame::{FinalFrame, FrameLayer};
use crate::guard::{Breaker, GuardBuilder, GuardLayer};
use crate::reject::{Default503, Plain, RejectLayer};
use crate::track::{MemoryStore, TrackLayer};
use crate::{ConfigError, DrainWatch};

/// Configures and composes `Reject → Track → Guard → Frame`; see the [module docs](self).
#[derive(Clone, Debug)]
#[must_use]
pub struct DrainStack<St = MemoryStore, M = Plain> {
    watch: DrainWatch,
    reject: RejectLayer<Default503, M>,
    track: TrackLayer<St>,
    guard: GuardLayer,
    frame: FrameLayer,
}

impl DrainStack<MemoryStore> {
    /// The stack with defaults: probe paths exempt from rejection, in-memory tracking without
    /// a limit, the guard's defaults (no circuit breaker, no time limits; see
    /// [`GuardBuilder`]), SSE final frames.
    ///
    /// ```
    /// let stack = tower_drain::DrainStack::new(tower_drain::DrainController::new().watch());
    /// # drop(stack);
    /// ```
    pub fn new(watch: DrainWatch) -> Self {
        let frame = FrameLayer::new(watch.clone());
        Self {
            reject: RejectLayer::new(watch.clone()),
            track: TrackLayer::new(watch.clone()),
            // The guard and the frame layer share one encoder: `DrainService` decides once
            // per response whether it is a stream, for both.
            guard: GuardLayer::new(watch.clone()).frame_config(frame.cfg.clone()),
            frame,
            watch,
        }
    }
}

impl<St, M> DrainStack<St, M> {
    /// Configures the tracking layer: `f` gets the stack's [`TrackLayer`] and returns it
    /// changed, for example with a per-key limit, or with another store
    /// ([`TrackLayer::store`], e.g. a `RedisStore`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_drain::{DrainController, DrainStack, track::MemoryStore};
    /// let stack = DrainStack::new(DrainController::new().watch()).track(|t| {
    ///     t.max_per_key(3)
    ///         .key_header(http::HeaderName::from_static("x-client-id"))
    ///         .retry_after(Duration::from_secs(2))
    ///         .store(MemoryStore::new())
    /// });
    /// # drop(stack);
    /// ```
    pub fn track<St2>(
        self,
        f: impl FnOnce(TrackLayer<St>) -> TrackLayer<St2>,
    ) -> DrainStack<St2, M> {
        DrainStack {
            watch: self.watch,
            reject: self.reject,
            track: f(self.track),
            guard: self.guard,
            frame: self.frame,
        }
    }

    /// Configures the rejecting layer: `f` gets the stack's [`RejectLayer`] and returns it
    /// changed, for example with more paths [`exempt`](RejectLayer::exempt) from rejection or
    /// with [`sse_retry`](RejectLayer::sse_retry): while closing, a browser's `EventSource`
    /// reconnecting to this server gets `200` and the shutdown frame instead of `503`, so it
    /// retries by itself after the frame's `retry:` delay instead of giving up.
    ///
    /// ```
    /// let stack = tower_drain::DrainStack::new(tower_drain::DrainController::new().watch())
    ///     .reject(|r| r.reject_while_draining(true).sse_retry());
    /// # drop(stack);
    /// ```
    pub fn reject<M2>(
        self,
        f: impl FnOnce(RejectLayer<Default503, M>) -> RejectLayer<Default503, M2>,
    ) -> DrainStack<St, M2> {
        DrainStack {
            watch: self.watch,
            reject: f(self.reject),
            track: self.track,
            guard: self.guard,
            frame: self.frame,
        }
    }

    /// Configures the guard: `f` gets the stack's current guard settings (see
    /// [`GuardLayer::to_builder`]; the defaults at first) and returns them changed; they are
    /// checked and the guard is rebuilt. Settings made by an earlier call are kept, and the
    /// guard keeps the stack's encoder (set it with [`encoder`](Self::encoder)). A rebuilt
    /// guard has a new circuit breaker: take [`breaker`](Self::breaker) afterwards.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first invalid setting (see [`GuardBuilder::build`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_drain::{DrainController, DrainStack};
    /// let drain = DrainController::new();
    /// let stack = DrainStack::new(drain.watch())
    ///     .guard(|g| g.response_timeout(Duration::from_secs(5)))
    ///     .unwrap()
    ///     .guard(|g| g.failure_threshold(10))
    ///     .unwrap();
    /// assert_eq!(stack.breaker().unwrap().threshold(), 10);
    ///
    /// let err = stack.guard(|g| g.lifetime_jitter(1.5)).unwrap_err();
    /// assert_eq!(err.setting(), "lifetime_jitter");
    /// ```
    pub fn guard(
        mut self,
        f: impl FnOnce(GuardBuilder) -> GuardBuilder,
    ) -> Result<Self, ConfigError> {
        self.guard = f(self.guard.to_builder())
            .build()?
            .frame_config(self.frame.cfg.clone());
        Ok(self)
    }

    /// Final frames made by `encoder` instead of SSE; see [`FrameLayer::with_encoder`]. The
    /// guard's final frames and heartbeats follow it.
    ///
    /// ```
    /// use tower_drain::{DrainController, DrainStack, frame::NdJson};
    /// let stack = DrainStack::new(DrainController::new().watch()).encoder(NdJson::new());
    /// # drop(stack);
    /// ```
    pub fn encoder(mut self, encoder: impl FinalFrame) -> Self {
        self.frame = FrameLayer::with_encoder(self.watch.clone(), encoder);
        self.guard = self.guard.frame_config(self.frame.cfg.clone());
        self
    }

    /// The guard's circuit breaker (see [`GuardLayer::breaker`]), or `None` when it is off.
    ///
    /// ```
    /// use tower_drain::{DrainController, DrainStack, guard::BreakerState};
    /// let stack = DrainStack::new(DrainController::new().watch())
    ///     .guard(|g| g.circuit_breaker(true))
    ///     .unwrap();
    /// assert_eq!(stack.breaker().unwrap().state(), BreakerState::Closed);
    /// ```
    pub fn breaker(&self) -> Option<Breaker> {
        self.guard.breaker()
    }
}

impl<S, St: Clone, M> Layer<S> for DrainStack<St, M> {
    type Service = DrainService<S, St, M>;

    fn layer(&self, inner: S) -> Self::Service {
        debug_assert!(self.guard.shares_frame_config(&self.frame.cfg));
        let calls = (self.track.call(), (self.guard.clone(), self.frame.clone()));
        self.reject.layer(HookService::new(inner, Arc::new(calls)))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body::{Body, Frame};
    use http_body_util::BodyExt;
    use tower::{Service, ServiceExt};

    use super::*;
    use crate::{DrainController, DrainReason};

    /// An SSE body: one event per poll, a panic or an error at `fail_at`, else endless.
    #[derive(Default)]
    struct Events {
        n: u32,
        fail_at: Option<(u32, bool)>,
    }

    impl Body for Events {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.n += 1;
            match self.fail_at {
                Some((at, true)) if self.n == at => panic!("body panicked"),
                Some((at, false)) if self.n == at => {
                    Poll::Ready(Some(Err(std::io::Error::other("upstream failed"))))
                }
                _ => Poll::Ready(Some(Ok(Frame::data(Bytes::from("data: x\n\n"))))),
            }
        }
    }

    fn service(
        drain: &DrainController,
        fail_at: Option<(u32, bool)>,
    ) -> impl Service<
        Request<()>,
        Response = Response<impl Body<Data = Bytes, Error = impl std::fmt::Debug> + Send + 'static>,
        Error = Infallible,
    > + Clone {
        DrainStack::new(drain.watch()).layer(tower::service_fn(
            move |_req: Request<()>| async move {
                let mut res = Response::new(Events { n: 0, fail_at });
                res.headers_mut().insert(
                    "content-type",
                    http::HeaderValue::from_static("text/event-stream"),
                );
                Ok::<_, Infallible>(res)
            },
        ))
    }

    /// The answer of [`service`] to one request.
    async fn respond(
        drain: &DrainController,
        fail_at: Option<(u32, bool)>,
    ) -> Response<impl Body<Data = Bytes, Error = impl std::fmt::Debug> + Send + 'static> {
        service(drain, fail_at)
            .oneshot(Request::new(()))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_panicking_body_releases_its_stream() {
        let drain = DrainController::new();
        let res = respond(&drain, Some((2, true))).await;
        assert_eq!(drain.active_streams(), 1);
        let task = tokio::spawn(async move {
            let mut body = std::pin::pin!(res.into_body());
            while body.frame().await.is_some() {}
        });
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(drain.active_streams(), 0);
    }

    #[tokio::test]
    async fn an_erroring_body_ends_with_an_error_frame_and_releases_its_stream() {
        let drain = DrainController::new();
        let res = respond(&drain, Some((2, false))).await;
        let mut body = std::pin::pin!(res.into_body());
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "data: x\n\n"
        );
        let last = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(last.starts_with(b"event: error\n"), "{last:?}");
        assert!(body.frame().await.is_none());
        assert_eq!(drain.active_streams(), 0);
    }

    #[tokio::test]
    async fn a_dropped_body_releases_its_stream() {
        let drain = DrainController::new();
        let svc = service(&drain, None);
        let a = svc.clone().oneshot(Request::new(())).await.unwrap();
        let b = svc.oneshot(Request::new(())).await.unwrap();
        assert_eq!(drain.active_streams(), 2);
        drop(a);
        assert_eq!(drain.active_streams(), 1);
        drop(b);
        assert_eq!(drain.active_streams(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_spread_drain_spreads_the_frames_evenly() {
        let drain = DrainController::configured(|b| b.drain_spread(Duration::from_secs(1)));
        // Endless but quiet streams: one event, then pending.
        let svc =
            DrainStack::new(drain.watch()).layer(tower::service_fn(|_req: Request<()>| async {
                let s = futures_util::stream::iter([Ok::<_, Infallible>(Frame::data(
                    Bytes::from("data: a\n\n"),
                ))])
                .chain(futures_util::stream::pending());
                let mut res = Response::new(http_body_util::StreamBody::new(s));
                res.headers_mut().insert(
                    "content-type",
                    http::HeaderValue::from_static("text/event-stream"),
                );
                Ok::<_, Infallible>(res)
            }));
        use futures_util::StreamExt;
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let res = svc.clone().oneshot(Request::new(())).await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut body = std::pin::pin!(res.into_body());
                body.frame().await.unwrap().unwrap();
                let last = body.frame().await.unwrap().unwrap().into_data().unwrap();
                assert!(last.starts_with(b"event: shutdown\n"));
                assert!(body.frame().await.is_none());
                tokio::time::Instant::now() - start
            }));
        }
        tokio::task::yield_now().await;
        drain.drain(DrainReason::Manual);
        let mut at: Vec<Duration> = Vec::new();
        for t in tasks {
            at.push(t.await.unwrap());
        }
        at.sort();
        let expected: Vec<Duration> = (0..10).map(|i| Duration::from_millis(100 * i)).collect();
        assert_eq!(at, expected);
        let report = drain.report().await;
        assert_eq!(report.notified, 10);
        assert_eq!(report.closed_gracefully, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn metrics_reach_the_installed_recorder() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let drain = metrics::with_local_recorder(&recorder, DrainController::new);

        let svc = service(&drain, None);
        let a = svc.clone().oneshot(Request::new(())).await.unwrap();
        let b = svc.clone().oneshot(Request::new(())).await.unwrap();
        drain.drain(DrainReason::Manual);
        drain.closing().await;
        let rejected = svc.oneshot(Request::new(())).await.unwrap();
        assert_eq!(rejected.status(), 503);
        for res in [a, b] {
            let mut body = std::pin::pin!(res.into_body());
            while body.frame().await.is_some() {}
        }
        let report = drain.report().await;
        assert_eq!((report.notified, report.rejected), (2, 1));

        let snapshot = snapshotter.snapshot().into_hashmap();
        let value = |name: &str, labels: &[(&str, &str)]| {
            snapshot
                .iter()
                .find(|(k, _)| {
                    let key = k.key();
                    key.name() == name
                        && labels
                            .iter()
                            .all(|(l, v)| key.labels().any(|x| x.key() == *l && x.value() == *v))
                })
                .map(|(_, (_, _, v))| v)
                .unwrap_or_else(|| panic!("{name} not recorded"))
        };
        assert_eq!(
            value(crate::metrics::STREAMS_TOTAL, &[]),
            &DebugValue::Counter(2)
        );
        assert_eq!(
            value(crate::metrics::NOTIFIED_TOTAL, &[]),
            &DebugValue::Counter(2)
        );
        assert_eq!(
            value(crate::metrics::REJECTED_TOTAL, &[("reason", "draining")]),
            &DebugValue::Counter(1)
        );
        assert_eq!(
            value(crate::metrics::REJECTED_TOTAL, &[("reason", "limit")]),
            &DebugValue::Counter(0)
        );
        assert_eq!(
            value(crate::metrics::FORCE_CLOSED_TOTAL, &[]),
            &DebugValue::Counter(0)
        );
        assert_eq!(
            value(crate::metrics::ACTIVE_STREAMS, &[]),
            &DebugValue::Gauge(0.0.into())
        );
        match value(crate::metrics::STREAM_DURATION_SECONDS, &[]) {
            DebugValue::Histogram(v) => assert_eq!(v.len(), 2),
            other => panic!("{other:?}"),
        }
        match value(crate::metrics::SHUTDOWN_DURATION_SECONDS, &[]) {
            DebugValue::Histogram(v) => assert_eq!(v.len(), 1),
            other => panic!("{other:?}"),
        }
    }

    /// The body of a quiet stream of `content_type` under `stack`: `record`, then nothing.
    async fn quiet(
        stack: &DrainStack,
        content_type: &'static str,
        record: &'static str,
    ) -> Pin<Box<impl Body<Data = Bytes, Error = impl std::fmt::Debug>>> {
        use futures_util::StreamExt;
        let svc = stack.layer(tower::service_fn(move |_req: Request<()>| async move {
            let s = futures_util::stream::iter([Ok::<_, Infallible>(Frame::data(
                Bytes::from_static(record.as_bytes()),
            ))])
            .chain(futures_util::stream::pending());
            let mut res = Response::new(http_body_util::StreamBody::new(s));
            res.headers_mut()
                .insert("content-type", http::HeaderValue::from_static(content_type));
            Ok::<_, Infallible>(res)
        }));
        Box::pin(svc.oneshot(Request::new(())).await.unwrap().into_body())
    }

    async fn data<B>(body: &mut B) -> Bytes
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Debug,
    {
        body.frame().await.unwrap().unwrap().into_data().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn guard_settings_of_earlier_calls_are_kept_and_invalid_ones_are_named() {
        let drain = DrainController::new();
        // The lifetime set first and the heartbeat set second both act on a stream.
        let stack = DrainStack::new(drain.watch())
            .guard(|g| g.max_lifetime(Duration::from_secs(3)))
            .unwrap()
            .guard(|g| g.heartbeat(Duration::from_secs(1)))
            .unwrap();
        let start = tokio::time::Instant::now();
        let mut body = quiet(&stack, "text/event-stream", "data: 1\n\n").await;
        assert_eq!(data(&mut body).await, "data: 1\n\n");
        assert_eq!(data(&mut body).await, ":\n\n");
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        // Heartbeats until the lifetime ends the stream (a bounded wait: without the lifetime
        // the heartbeats would go on for ever).
        let mut last = data(&mut body).await;
        for _ in 0..3 {
            if last != ":\n\n" {
                break;
            }
            last = data(&mut body).await;
        }
        assert!(
            last.starts_with(b"event: error\ndata: {\"error\":\"Connection timeout\""),
            "{last:?}"
        );
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert!(body.frame().await.is_none());

        // So do the breaker's settings, each made by a call of its own.
        let breaker = stack
            .clone()
            .guard(|g| g.failure_threshold(3))
            .unwrap()
            .guard(|g| g.cooldown(Duration::from_secs(10)))
            .unwrap()
            .breaker()
            .unwrap();
        assert_eq!(
            (breaker.threshold(), breaker.cooldown()),
            (3, Duration::from_secs(10))
        );

        // An invalid value fails, naming the setting.
        let err = stack
            .clone()
            .guard(|g| g.heartbeat(Duration::ZERO))
            .unwrap_err();
        assert_eq!(err.setting(), "heartbeat");
        assert_eq!(
            err.to_string(),
            "invalid heartbeat: must be greater than zero"
        );
        let err = stack.guard(|g| g.lifetime_jitter(1.0)).unwrap_err();
        assert_eq!(err.setting(), "lifetime_jitter");
    }

    #[tokio::test(start_paused = true)]
    async fn the_guard_keeps_the_stack_encoder() {
        let drain = DrainController::new();
        let stack = DrainStack::new(drain.watch())
            .encoder(crate::frame::NdJson::new())
            .guard(|g| g.heartbeat(Duration::from_secs(1)))
            .unwrap();
        let mut body = quiet(&stack, "application/x-ndjson", "{\"n\":1}\n").await;
        assert_eq!(data(&mut body).await, "{\"n\":1}\n");
        assert_eq!(data(&mut body).await, "{\"type\":\"heartbeat\"}\n");
    }

    #[tokio::test]
    async fn a_second_drain_keeps_the_first_reason() {
        let drain = DrainController::new();
        assert!(drain.drain(DrainReason::Programmatic("deploy")));
        assert!(!drain.drain(DrainReason::Signal));
        assert!(!drain.drain(DrainReason::Manual));
        assert_eq!(drain.reason(), Some(DrainReason::Programmatic("deploy")));
        assert_eq!(drain.report().await.reason.as_str(), "deploy");
    }
}
