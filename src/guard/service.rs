use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response};
use tokio::time::Instant;
use tower_service::Service;

use super::breaker::Admit;
use super::config::Config;
use super::future::{CallState, Rejection, ResponseFuture};
use super::GuardedBody;
use crate::route::RoutePath;

/// Applies a [`GuardLayer`](super::GuardLayer)'s timeouts and circuit breaker to a service; see
/// the [module docs](super) for an example.
pub struct Guard<S> {
    inner: S,
    cfg: Arc<Config>,
}

impl<S> Guard<S> {
    pub(crate) fn from_config(inner: S, cfg: Arc<Config>) -> Self {
        Self { inner, cfg }
    }

    /// The same layer around `inner`.
    pub(crate) fn with_inner<T>(&self, inner: T) -> Guard<T> {
        Guard {
            inner,
            cfg: self.cfg.clone(),
        }
    }

    /// Whether [`before`](Self::before) needs a copy of the request's parts (revalidation is
    /// on), which the fused [`DrainService`](crate::stack::DrainService) call does not take.
    #[inline]
    pub(crate) fn needs_parts(&self) -> bool {
        self.cfg.revalidate.is_some()
    }

    /// The guard's step before the inner call: the breaker's decision (`Err` with the status
    /// and retry delay of a rejection), then what the call carries to the response. `parts`
    /// is the request's copy for revalidation, when it is on.
    #[inline]
    pub(crate) fn before<ReqB>(
        &self,
        req: &Request<ReqB>,
        parts: Option<Box<http::request::Parts>>,
    ) -> Result<CallState, Rejection> {
        let cfg = &self.cfg;
        // Only a guard that may answer by itself needs to know the protocol.
        let grpc = (cfg.breaker.is_some() || cfg.response_timeout.is_some())
            && crate::grpc::is_grpc(req.headers());
        let probe = match cfg.breaker.as_ref().map(|b| b.admit()) {
            None | Some(Admit::Pass) => None,
            Some(Admit::Probe(p)) => Some(p),
            Some(Admit::Reject(retry)) => {
                cfg.frame.shared.metrics.rejected_breaker.increment(1);
                tracing::debug!(
                    method = %req.method(),
                    path = req.uri().path(),
                    "circuit open: request rejected"
                );
                return Err(Rejection {
                    status: cfg.breaker_status,
                    retry_after: retry,
                    grpc,
                });
            }
        };
        // A gRPC call's own deadline applies when it is shorter than the guard's.
        let timeout = match (cfg.response_timeout, grpc) {
            (Some(d), true) => Some(crate::grpc::timeout_of(req.headers()).map_or(d, |t| t.min(d))),
            (d, _) => d,
        };
        // The clock is read only when a setting needs the call's start.
        let started = (cfg.response_timeout.is_some()
            || cfg.max_lifetime.is_some()
            || cfg.revalidate.is_some())
        .then(Instant::now);
        Ok(CallState {
            cfg: cfg.clone(),
            probe,
            started,
            head: req.method() == Method::HEAD,
            grpc,
            timeout,
            uri: RoutePath::new(req.uri()),
            parts,
        })
    }
}

crate::macros::inner_service_accessors!(Guard<S>);

// No readiness state of its own: the breaker is consulted in `call`, so a clone is a plain
// clone.
impl<S: Clone> Clone for Guard<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            cfg: self.cfg.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Guard<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("inner", &self.inner)
            .field("config", &self.cfg)
            .finish()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Guard<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: http_body::Body,
{
    type Response = Response<GuardedBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The breaker is decided in `call`: returning Pending here while the circuit is open
        // would stall the connection instead of answering 503.
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if let Some(d) = self.cfg.max_lifetime {
            // A WebSocket tracked by an outer track layer lives no longer than a stream.
            crate::ws::set_lifetime(&req, d);
        }
        let (req, parts) = match &self.cfg.revalidate {
            Some(_) => {
                let (parts, body) = req.into_parts();
                let copy = Box::new(parts.clone());
                (Request::from_parts(parts, body), Some(copy))
            }
            None => (req, None),
        };
        match self.before(&req, parts) {
            Ok(state) => ResponseFuture::calling(self.inner.call(req), state),
            Err(rejection) => ResponseFuture::rejected(rejection),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use http::StatusCode;
    use http_body::Body;
    use http_body_util::Empty;
    use tokio::sync::Notify;
    use tokio::time::advance;
    use tokio_test::{assert_pending, assert_ready, task::spawn};
    use tower::ServiceExt;
    use tower_layer::Layer;

    use super::*;
    use crate::guard::{BreakerState, GuardLayer};
    use crate::DrainController;

    type Inner =
        tower::util::BoxCloneSyncService<Request<()>, Response<Empty<Bytes>>, std::io::Error>;

    fn _auto_traits() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<ResponseFuture<std::future::Ready<Result<Response<()>, ()>>>>();
        send_sync::<Guard<Inner>>();
    }

    /// An inner service answering what the request's `x-answer` header says: a status code,
    /// `err` (an `Err`), or `wait` (a response after `release` is notified). Counts its calls.
    fn inner(calls: Arc<AtomicUsize>, release: Arc<Notify>) -> Inner {
        tower::util::BoxCloneSyncService::new(tower::service_fn(move |req: Request<()>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let answer = req.headers()["x-answer"].to_str().unwrap().to_string();
            let release = release.clone();
            async move {
                match answer.as_str() {
                    "err" => Err(std::io::Error::other("boom")),
                    "wait" => {
                        release.notified().await;
                        Ok(Response::new(Empty::new()))
                    }
                    code => {
                        let mut res = Response::new(Empty::new());
                        *res.status_mut() = code.parse().unwrap();
                        Ok(res)
                    }
                }
            }
        }))
    }

    fn req(answer: &'static str) -> Request<()> {
        Request::builder()
            .header("x-answer", answer)
            .body(())
            .unwrap()
    }

    struct Fixture {
        svc: Guard<Inner>,
        calls: Arc<AtomicUsize>,
        release: Arc<Notify>,
        layer: GuardLayer,
    }

    fn fixture(layer: GuardLayer) -> Fixture {
        let calls = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Notify::new());
        Fixture {
            svc: layer.layer(inner(calls.clone(), release.clone())),
            calls,
            release,
            layer,
        }
    }

    impl Fixture {
        async fn status(&self, answer: &'static str) -> Result<StatusCode, std::io::Error> {
            self.svc
                .clone()
                .oneshot(req(answer))
                .await
                .map(|r| r.status())
        }
        fn state(&self) -> BreakerState {
            self.layer.breaker().unwrap().state()
        }
    }

    fn breaker_layer() -> GuardLayer {
        GuardLayer::builder(DrainController::new().watch())
            .failure_threshold(3)
            .cooldown(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn response_timeout_fires_at_the_deadline_and_a_tie_goes_to_the_response() {
        let layer = GuardLayer::builder(DrainController::new().watch())
            .circuit_breaker(true)
            .response_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let breaker = layer.breaker().unwrap();
        let held = Arc::new(());
        let h = held.clone();
        let svc = layer.layer(tower::service_fn(move |req: Request<()>| {
            let h = h.clone();
            let after = req
                .headers()
                .get("x-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            async move {
                let _h = h; // dropped with the future
                match after {
                    Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
                    None => std::future::pending::<()>().await,
                }
                Ok::<_, std::io::Error>(Response::new(Empty::<Bytes>::new()))
            }
        }));

        let mut fut = spawn(svc.clone().oneshot(Request::new(())));
        assert_pending!(fut.poll());
        assert_eq!(Arc::strong_count(&held), 3);
        advance(Duration::from_millis(4_999)).await;
        assert_pending!(fut.poll());
        advance(Duration::from_millis(1)).await;
        let res = assert_ready!(fut.poll()).unwrap();
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(res.body().is_end_stream());
        assert_eq!(Arc::strong_count(&held), 2, "the inner future was dropped");
        assert_eq!(breaker.consecutive_failures(), 1);

        // Ready at exactly the deadline: the response wins.
        let tie = Request::builder().header("x-after", "5").body(()).unwrap();
        let mut fut = spawn(svc.clone().oneshot(tie));
        assert_pending!(fut.poll());
        advance(Duration::from_secs(5)).await;
        let res = assert_ready!(fut.poll()).unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(breaker.consecutive_failures(), 0);

        // A configured status.
        let layer = GuardLayer::builder(DrainController::new().watch())
            .response_timeout(Duration::from_secs(1))
            .timeout_status(StatusCode::REQUEST_TIMEOUT)
            .build()
            .unwrap();
        let svc = layer.layer(tower::service_fn(|_req: Request<()>| async {
            std::future::pending::<()>().await;
            Ok::<_, std::io::Error>(Response::new(Empty::<Bytes>::new()))
        }));
        let res = svc.oneshot(Request::new(())).await.unwrap();
        assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_after_n_consecutive_failures_not_before() {
        let f = fixture(breaker_layer());
        assert_eq!(f.status("500").await.unwrap(), 500);
        assert!(f.status("err").await.is_err());
        assert_eq!(f.state(), BreakerState::Closed); // N-1
        assert_eq!(f.status("200").await.unwrap(), 200); // resets
        assert_eq!(f.status("503").await.unwrap(), 503);
        assert_eq!(f.status("502").await.unwrap(), 502);
        assert_eq!(f.status("404").await.unwrap(), 404); // not a failure: resets
        assert_eq!(f.status("500").await.unwrap(), 500);
        assert_eq!(f.state(), BreakerState::Closed); // N failures, not consecutive
        assert_eq!(f.calls.load(Ordering::SeqCst), 7);

        assert_eq!(f.status("500").await.unwrap(), 500);
        assert_eq!(f.status("500").await.unwrap(), 500);
        assert_eq!(f.state(), BreakerState::Open);

        // Open: answered at once, without calling the service.
        let res = f.svc.clone().oneshot(req("200")).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()["retry-after"], "30");
        assert!(res.body().is_end_stream());
        advance(Duration::from_millis(20_500)).await;
        let res = f.svc.clone().oneshot(req("200")).await.unwrap();
        assert_eq!(res.headers()["retry-after"], "10");
        assert_eq!(f.calls.load(Ordering::SeqCst), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_sends_one_probe_and_closes_on_success() {
        let f = fixture(breaker_layer());
        for _ in 0..3 {
            f.status("500").await.unwrap();
        }
        assert_eq!(f.state(), BreakerState::Open);
        advance(Duration::from_secs(30)).await;

        // The probe is slow; requests arriving meanwhile get 503 and never reach the service.
        let mut probe = spawn(f.svc.clone().oneshot(req("wait")));
        assert_pending!(probe.poll());
        assert_eq!(f.state(), BreakerState::HalfOpen);
        for _ in 0..5 {
            assert_eq!(f.status("200").await.unwrap(), 503);
        }
        assert_eq!(f.calls.load(Ordering::SeqCst), 4);
        f.release.notify_one();
        assert_eq!(assert_ready!(probe.poll()).unwrap().status(), 200);
        assert_eq!(f.state(), BreakerState::Closed);
        assert_eq!(f.status("200").await.unwrap(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_reopens_on_failure() {
        let f = fixture(breaker_layer());
        for _ in 0..3 {
            f.status("500").await.unwrap();
        }
        advance(Duration::from_secs(30)).await;
        assert!(f.status("err").await.is_err()); // the probe fails
        assert_eq!(f.state(), BreakerState::Open);
        assert_eq!(f.status("200").await.unwrap(), 503);
        advance(Duration::from_secs(29)).await;
        assert_eq!(f.status("200").await.unwrap(), 503);
        advance(Duration::from_secs(1)).await;
        assert_eq!(f.status("200").await.unwrap(), 200); // next probe succeeds
        assert_eq!(f.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_statuses_are_configurable_and_it_can_be_off() {
        let layer = breaker_layer()
            .to_builder()
            .breaker_status(StatusCode::TOO_MANY_REQUESTS)
            .failure_status(|s: StatusCode| s == StatusCode::BAD_GATEWAY)
            .build()
            .unwrap();
        let f = fixture(layer);
        for _ in 0..3 {
            f.status("500").await.unwrap(); // not a failure here
        }
        assert_eq!(f.state(), BreakerState::Closed);
        for _ in 0..3 {
            f.status("502").await.unwrap();
        }
        assert_eq!(f.status("200").await.unwrap(), 429);

        let f = fixture(
            GuardLayer::builder(DrainController::new().watch())
                .circuit_breaker(false)
                .build()
                .unwrap(),
        );
        for _ in 0..10 {
            assert_eq!(f.status("500").await.unwrap(), 500);
        }
        assert_eq!(f.calls.load(Ordering::SeqCst), 10);
    }

    #[test]
    fn invalid_settings_name_the_setting() {
        let l = || GuardLayer::builder(DrainController::new().watch());
        let err = |b: crate::guard::GuardBuilder| b.build().unwrap_err().setting();
        let z = Duration::ZERO;
        assert_eq!(err(l().response_timeout(z)), "response_timeout");
        assert_eq!(err(l().max_lifetime(z)), "max_lifetime");
        assert_eq!(err(l().idle_timeout(z)), "idle_timeout");
        assert_eq!(err(l().heartbeat(z)), "heartbeat");
        assert_eq!(err(l().cooldown(z)), "cooldown");
        assert_eq!(err(l().probe_timeout(z)), "probe_timeout");
        assert_eq!(err(l().failure_threshold(0)), "failure_threshold");
        assert_eq!(err(l().lifetime_jitter(1.0)), "lifetime_jitter");
        assert_eq!(err(l().lifetime_jitter(-0.1)), "lifetime_jitter");
        let check = |_: &http::request::Parts| async { Ok::<_, std::convert::Infallible>(true) };
        assert_eq!(err(l().revalidate(z, check)), "revalidate");
        assert!(l().lifetime_jitter(0.0).build().is_ok());
        // The first invalid setting, in the order of the settings.
        assert_eq!(err(l().cooldown(z).max_lifetime(z)), "max_lifetime");
    }
}
