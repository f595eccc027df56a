//! The guard's unit tests: its bodies' logic, and its calls (breaker, timeouts).

mod body {
    use std::task::Poll;

    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use http::request::Parts;
    use http::Request;
    use http_body::{Body, Frame};
    use tokio::time::advance;
    use tokio::time::Instant;
    use tokio_test::{assert_pending, task::spawn};
    use tower_layer::Layer;

    use crate::frame::{FrameLayer, Grpc, NdJson};
    use tokio_test::task::Spawn;

    use crate::guard::{BreakerState, GuardBuilder, GuardLayer, GuardedBody, MID_EVENT_GRACE};
    use crate::test_support::{poll, sse, streaming, text, through, Feed, TestBody};
    use crate::{DrainController, DrainReason};

    const TIMEOUT_FRAME: &str =
        "event: error\ndata: {\"error\":\"Connection timeout\",\"code\":\"TIMEOUT\"}\nretry: ";

    fn _auto_traits() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<GuardedBody<crate::test_support::TestBody>>();
        send_sync::<GuardedBody<http_body_util::Full<Bytes>>>();
    }

    fn assert_open<B: Body>(b: &B) {
        assert!(!b.is_end_stream());
        assert_eq!(b.size_hint().upper(), None);
    }

    fn assert_ended<B: Body>(b: &B) {
        assert!(b.is_end_stream());
        assert_eq!(b.size_hint().exact(), Some(0));
    }

    type Spawned<B = TestBody> = Spawn<GuardedBody<B>>;

    /// A guard layer on `drain` with the settings `f` makes.
    fn guard_on(
        drain: &DrainController,
        f: impl FnOnce(GuardBuilder) -> GuardBuilder,
    ) -> GuardLayer {
        f(GuardLayer::builder(drain.watch())).build().unwrap()
    }

    /// A guard layer (on a controller of its own) with the settings `f` makes.
    fn guard(f: impl FnOnce(GuardBuilder) -> GuardBuilder) -> GuardLayer {
        guard_on(&DrainController::new(), f)
    }

    /// A streaming response of `content_type` through `layer`: its feed and spawned body.
    async fn open(layer: &GuardLayer, content_type: &'static str) -> (Feed, Spawned) {
        let (feed, res) = streaming(content_type);
        let body = spawn(through(layer, Request::new(()), res).await.into_body());
        (feed, body)
    }

    /// An SSE response through `layer`.
    async fn open_sse(layer: &GuardLayer) -> (Feed, Spawned) {
        open(layer, "text/event-stream").await
    }

    /// An SSE response through a guard layer with the settings `f` makes.
    async fn sse_with(f: impl FnOnce(GuardBuilder) -> GuardBuilder) -> (Feed, Spawned) {
        open_sse(&guard(f)).await
    }

    /// The response of `svc` to one request, its body spawned.
    async fn serve<S, B>(svc: S) -> Spawn<B>
    where
        S: tower::Service<Request<()>, Response = http::Response<B>>,
        S::Error: std::fmt::Debug,
    {
        let res = tower::ServiceExt::oneshot(svc, Request::new(())).await;
        spawn(res.unwrap().into_body())
    }

    /// Feeds `data`, which comes out as it is.
    fn pass<B>(feed: &Feed, body: &mut Spawn<B>, data: &'static str)
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        feed.data(data);
        assert_eq!(text(poll(body)), data);
    }

    /// Sends one small gRPC message.
    fn grpc_message(feed: &Feed) {
        let message = Bytes::from_static(&[0, 0, 0, 0, 1, 7]);
        feed.0.try_send(Ok(Frame::data(message))).unwrap();
    }

    /// The body ends.
    fn assert_end<B: Body>(body: &mut Spawn<B>)
    where
        B::Data: std::fmt::Debug,
        B::Error: std::fmt::Debug,
    {
        assert!(matches!(poll(body), Poll::Ready(None)));
    }

    /// The next frame is the timeout frame, then the body ends.
    fn assert_timeout_then_end<B>(body: &mut Spawn<B>)
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        let last = text(poll(body));
        assert!(last.starts_with(TIMEOUT_FRAME), "{last}");
        assert_end(body);
    }

    /// The next frame is trailers: their `grpc-status`.
    fn grpc_status<B: Body>(body: &mut Spawn<B>) -> http::HeaderValue
    where
        B::Data: std::fmt::Debug,
        B::Error: std::fmt::Debug,
    {
        match poll(body) {
            Poll::Ready(Some(Ok(f))) => f.into_trailers().expect("trailers")["grpc-status"].clone(),
            other => panic!("expected trailers, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lifetime_frame_arrives_at_the_limit_and_the_body_ends() {
        let (feed, mut body) = sse_with(|g| g.max_lifetime(Duration::from_secs(10))).await;
        pass(&feed, &mut body, "data: 1\n\n");
        body.enter(|_, b| assert_open(&*b));
        assert_pending!(poll(&mut body));

        advance(Duration::from_millis(9_999)).await;
        assert_pending!(poll(&mut body));
        advance(Duration::from_millis(1)).await;
        assert!(body.is_woken());
        assert!(text(poll(&mut body)).starts_with(TIMEOUT_FRAME));
        body.enter(|_, b| assert_open(&*b));
        assert_end(&mut body);
        body.enter(|_, b| assert_ended(&*b));
        drop(feed);
    }

    #[tokio::test(start_paused = true)]
    async fn lifetime_jitter_only_shortens_and_spreads() {
        let layer = guard(|g| {
            g.max_lifetime(Duration::from_secs(100))
                .lifetime_jitter(0.5)
        });
        let start = Instant::now();
        let mut ends = Vec::new();
        for _ in 0..8 {
            let (feed, res) = sse();
            let mut body = Box::pin(through(&layer, Request::new(()), res).await.into_body());
            let t0 = Instant::now();
            let f = http_body_util::BodyExt::frame(&mut body)
                .await
                .unwrap()
                .unwrap();
            assert!(f.into_data().unwrap().starts_with(TIMEOUT_FRAME.as_bytes()));
            let lived = t0.elapsed();
            assert!(lived >= Duration::from_secs(50) && lived <= Duration::from_secs(100));
            ends.push(lived);
            drop(feed);
        }
        ends.sort();
        ends.dedup();
        assert!(ends.len() > 1, "jitter spreads expiries: {ends:?}");
        assert!(start.elapsed() > Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_reached_mid_event_waits_for_the_boundary() {
        let layer = guard(|g| g.max_lifetime(Duration::from_secs(10)));
        let (feed, mut body) = open_sse(&layer).await;
        pass(&feed, &mut body, "event: tick\n");
        advance(Duration::from_secs(10)).await;
        assert_pending!(poll(&mut body)); // mid-event: no frame yet
        pass(&feed, &mut body, "data: 1\n\n");
        assert_timeout_then_end(&mut body);

        // An event that never completes: after the grace, the body fails (no whole frame
        // can go out), so the client sees an aborted response, not a clean end.
        let (feed, mut body) = open_sse(&layer).await;
        pass(&feed, &mut body, "data: half");
        advance(Duration::from_secs(10)).await;
        assert_pending!(poll(&mut body));
        advance(MID_EVENT_GRACE).await;
        match poll(&mut body) {
            Poll::Ready(Some(Err(e))) => assert!(e.is::<crate::Aborted>(), "{e}"),
            other => panic!("expected the abort, got {other:?}"),
        }
        assert_end(&mut body);
        drop(feed);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_counts_from_the_last_frame() {
        let (feed, mut body) = sse_with(|g| g.idle_timeout(Duration::from_secs(5))).await;
        for i in 0..4 {
            advance(Duration::from_secs(4)).await;
            assert_pending!(poll(&mut body), "frame {i}");
            pass(&feed, &mut body, "data: x\n\n");
        }
        advance(Duration::from_millis(4_999)).await;
        assert_pending!(poll(&mut body));
        advance(Duration::from_millis(1)).await;
        assert_timeout_then_end(&mut body);
        drop(feed);
    }

    #[tokio::test(start_paused = true)]
    async fn first_frame_timeout_ends_a_stream_that_never_starts_and_only_that_one() {
        let layer = guard(|g| g.first_frame_timeout(Duration::from_secs(5)));
        let (silent_feed, mut silent) = open_sse(&layer).await;
        let (feed, mut started) = open_sse(&layer).await;
        assert_pending!(poll(&mut silent));
        advance(Duration::from_secs(1)).await;
        pass(&feed, &mut started, "data: first\n\n");

        advance(Duration::from_millis(3_999)).await;
        assert_pending!(poll(&mut silent));
        advance(Duration::from_millis(1)).await;
        assert_timeout_then_end(&mut silent);
        // The stream that got going is left alone, however long it is quiet afterwards.
        advance(Duration::from_secs(3600)).await;
        assert_pending!(poll(&mut started));
        drop((silent_feed, feed));
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_keep_an_idle_stream_open_and_never_split_an_event() {
        let (feed, mut body) = sse_with(|g| g.heartbeat(Duration::from_secs(15))).await;
        advance(Duration::from_secs(15)).await;
        assert_eq!(text(poll(&mut body)), ":\n\n");
        assert_pending!(poll(&mut body));
        advance(Duration::from_secs(15)).await;
        assert_eq!(text(poll(&mut body)), ":\n\n");

        // Mid-event: no heartbeat, however long the pause.
        pass(&feed, &mut body, "event: tick\n");
        advance(Duration::from_secs(60)).await;
        assert_pending!(poll(&mut body));
        pass(&feed, &mut body, "data: 1\n\n");
        // The event is complete; the next heartbeat follows once 15 s have passed since then.
        advance(Duration::from_secs(14)).await;
        assert_pending!(poll(&mut body));
        advance(Duration::from_secs(1)).await;
        assert_eq!(text(poll(&mut body)), ":\n\n");
        body.enter(|_, b| assert_open(&*b));
        drop(feed);
    }

    #[tokio::test(start_paused = true)]
    async fn ndjson_heartbeat_is_a_json_record_and_grpc_gets_deadline_exceeded_trailers() {
        let layer = guard(|g| g.encoder(NdJson::new()).heartbeat(Duration::from_secs(1)));
        let (feed, mut body) = open(&layer, "application/x-ndjson").await;
        advance(Duration::from_secs(1)).await;
        // A whole JSON Lines record, never a blank line.
        assert_eq!(text(poll(&mut body)), "{\"type\":\"heartbeat\"}\n");
        drop(feed);

        let layer = guard(|g| {
            g.encoder(Grpc::new())
                .max_lifetime(Duration::from_secs(3))
                .heartbeat(Duration::from_secs(1))
        });
        let (feed, mut body) = open(&layer, "application/grpc").await;
        grpc_message(&feed);
        assert!(matches!(poll(&mut body), Poll::Ready(Some(Ok(_)))));
        advance(Duration::from_secs(3)).await;
        assert_eq!(grpc_status(&mut body), "4");
        assert_end(&mut body);
        drop(feed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_error_becomes_an_error_frame_and_a_clean_end() {
        let layer = guard(|g| g.circuit_breaker(true));
        let breaker = layer.breaker().unwrap();
        let (feed, mut body) = open_sse(&layer).await;
        feed.data("data: 1\n\n");
        feed.error();
        assert_eq!(text(poll(&mut body)), "data: 1\n\n");
        let last = text(poll(&mut body));
        assert!(
            last.starts_with(
                "event: error\ndata: {\"error\":\"Stream error\",\"code\":\"STREAM_ERROR\"}\n"
            ),
            "{last}"
        );
        assert_end(&mut body);
        body.enter(|_, b| assert_ended(&*b));
        assert_eq!(breaker.consecutive_failures(), 1);

        // Passed through when configured so.
        let (feed, mut body) = sse_with(|g| g.pass_through_errors(true)).await;
        feed.error();
        assert!(matches!(poll(&mut body), Poll::Ready(Some(Err(_)))));
        drop(feed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_error_mid_event_or_in_grpc_ends_the_stream_the_protocol_way() {
        let drain = DrainController::new();
        // Mid-event: no frame (it would corrupt the event); the error goes on, so the
        // response is aborted rather than ended cleanly after half an event.
        let layer = GuardLayer::new(drain.watch());
        let (feed, mut body) = open_sse(&layer).await;
        feed.data("data: par");
        feed.error();
        assert_eq!(text(poll(&mut body)), "data: par");
        assert!(matches!(poll(&mut body), Poll::Ready(Some(Err(_)))));
        body.enter(|_, b| assert_ended(&*b));

        // gRPC (no limits set): the error travels as trailers only, then the end.
        let layer = guard_on(&drain, |g| g.encoder(Grpc::new()));
        let (feed, mut body) = open(&layer, "application/grpc").await;
        grpc_message(&feed);
        feed.error();
        assert!(matches!(poll(&mut body), Poll::Ready(Some(Ok(_)))));
        assert_ne!(grpc_status(&mut body), "0");
        assert_end(&mut body);
        body.enter(|_, b| assert_ended(&*b));
    }

    #[tokio::test(start_paused = true)]
    async fn revalidation_closes_exactly_the_stream_whose_check_fails() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let drain = DrainController::new();
        let checks = Arc::new(AtomicUsize::new(0));
        let c = checks.clone();
        let layer = GuardLayer::builder(drain.watch())
            .revalidate(Duration::from_secs(60), move |parts: &Parts| {
                c.fetch_add(1, Ordering::Relaxed);
                let ok = parts.headers.get("x-user").is_some_and(|v| v != "revoked");
                async move { Ok::<_, std::convert::Infallible>(ok) }
            })
            .build()
            .unwrap();
        let req = |user: &'static str| Request::builder().header("x-user", user).body(()).unwrap();
        let mut bodies = Vec::new();
        let mut feeds = Vec::new();
        for user in ["alice", "revoked", "bob", "carol"] {
            let (feed, res) = sse();
            bodies.push(spawn(through(&layer, req(user), res).await.into_body()));
            feeds.push(feed);
        }
        for b in bodies.iter_mut() {
            assert_pending!(poll(b));
        }
        // No check before half the interval; every stream checked by its end, not all at once.
        let mut first_check = Vec::new();
        for step in 1..=60u32 {
            advance(Duration::from_secs(1)).await;
            for (i, b) in bodies.iter_mut().enumerate() {
                if b.is_woken() {
                    let _ = poll(b);
                    if !first_check.iter().any(|(j, _)| *j == i) {
                        first_check.push((i, step));
                    }
                }
            }
            if step < 30 {
                assert_eq!(checks.load(Ordering::Relaxed), 0, "at {step} s");
            }
        }
        assert_eq!(checks.load(Ordering::Relaxed), 4);
        let mut times: Vec<u32> = first_check.iter().map(|(_, t)| *t).collect();
        times.dedup();
        assert!(times.len() > 1, "checks staggered: {first_check:?}");

        // Exactly the revoked stream got the unauthorized frame (on the poll that saw it):
        // it ends now, the others go on.
        let mut ended = Vec::new();
        for (i, b) in bodies.iter_mut().enumerate() {
            if matches!(poll(b), Poll::Ready(None)) {
                ended.push(i);
            }
        }
        assert_eq!(ended, vec![1]);
        assert!(matches!(poll(&mut bodies[0]), Poll::Pending));
        drop(feeds);
    }

    #[tokio::test(start_paused = true)]
    async fn revalidation_sends_the_unauthorized_frame() {
        let drain = DrainController::new();
        let layer = GuardLayer::builder(drain.watch())
            .revalidate(Duration::from_secs(2), |_: &Parts| async {
                Ok::<_, std::convert::Infallible>(false)
            })
            .build()
            .unwrap();
        let (feed, res) = sse();
        let mut body = Box::pin(through(&layer, Request::new(()), res).await.into_body());
        let f = http_body_util::BodyExt::frame(&mut body)
            .await
            .unwrap()
            .unwrap();
        let s = String::from_utf8(f.into_data().unwrap().to_vec()).unwrap();
        assert!(s.contains("\"code\":\"UNAUTHORIZED\""), "{s}");
        assert!(http_body_util::BodyExt::frame(&mut body).await.is_none());
        drop(feed);
    }

    #[tokio::test(start_paused = true)]
    async fn revalidation_errors_count_for_the_breaker_not_against_the_client() {
        let drain = DrainController::new();
        let layer = GuardLayer::builder(drain.watch())
            .failure_threshold(2)
            .revalidate(Duration::from_secs(2), |_: &Parts| async {
                Err::<bool, _>(std::io::Error::other("auth service down"))
            })
            .build()
            .unwrap();
        let breaker = layer.breaker().unwrap();
        let (feed, mut body) = open_sse(&layer).await;
        for _ in 0..2 {
            advance(Duration::from_secs(2)).await;
            assert_pending!(poll(&mut body)); // the stream goes on
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        pass(&feed, &mut body, "data: still here\n\n");
    }

    /// A stream that is both expiring and being drained, at the very same instant, gets exactly
    /// one final frame.
    #[tokio::test(start_paused = true)]
    async fn expiring_and_draining_at_the_same_instant_gives_one_final_frame() {
        let drain = DrainController::new();
        let guard = guard_on(&drain, |g| g.max_lifetime(Duration::from_secs(10)));
        let frame = FrameLayer::new(drain.watch());
        let (feed, res) = sse();
        let svc = guard.layer(frame.layer(crate::test_support::once(res)));
        let mut body = serve(svc).await;
        pass(&feed, &mut body, "data: 1\n\n");
        assert_pending!(poll(&mut body));

        advance(Duration::from_secs(10)).await; // the lifetime is over ...
        drain.drain(DrainReason::Manual);
        drain.closing().await; // ... and Closing begins, in the same instant
        assert_eq!(Instant::now() - Instant::now(), Duration::ZERO);
        assert!(body.is_woken());

        assert_timeout_then_end(&mut body);
        body.enter(|_, b| assert_ended(&*b));
        drop(feed);
    }

    /// The drain's frame first: the lifetime passing afterwards adds nothing.
    #[tokio::test(start_paused = true)]
    async fn a_drained_stream_gets_no_timeout_frame_afterwards() {
        for encoder in ["sse", "grpc"] {
            let drain = DrainController::new();
            let mut guard = GuardLayer::builder(drain.watch())
                .max_lifetime(Duration::from_secs(10))
                .heartbeat(Duration::from_secs(1));
            let mut frame = FrameLayer::new(drain.watch());
            let ct = if encoder == "grpc" {
                guard = guard.encoder(Grpc::new());
                frame = FrameLayer::with_encoder(drain.watch(), Grpc::new());
                "application/grpc"
            } else {
                "text/event-stream"
            };
            let (feed, res) = streaming(ct);
            let svc = guard
                .build()
                .unwrap()
                .layer(frame.layer(crate::test_support::once(res)));
            let mut body = serve(svc).await;
            assert_pending!(poll(&mut body));
            advance(Duration::from_millis(9_999)).await;
            drain.drain(DrainReason::Manual);
            drain.closing().await;
            let mut finals = 0;
            loop {
                match poll(&mut body) {
                    Poll::Ready(Some(Ok(f))) => {
                        if f.is_trailers() {
                            finals += 1;
                        } else {
                            let d = f.into_data().unwrap();
                            if d.starts_with(b"event:") {
                                assert!(d.starts_with(b"event: shutdown"));
                                finals += 1;
                            }
                        }
                    }
                    Poll::Ready(None) => break,
                    Poll::Ready(Some(Err(e))) => panic!("{e}"),
                    Poll::Pending => advance(Duration::from_secs(1)).await,
                }
            }
            assert_eq!(finals, 1, "{encoder}");
            drop(feed);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn other_responses_pass_through_untouched() {
        let layer = guard(|g| g.max_lifetime(Duration::from_secs(1)));
        let res = http::Response::new(http_body_util::Full::new(Bytes::from_static(b"hello")));
        let mut body = spawn(through(&layer, Request::new(()), res).await.into_body());
        body.enter(|_, b| assert_eq!(b.size_hint().exact(), Some(5)));
        advance(Duration::from_secs(5)).await;
        assert_eq!(text(poll(&mut body)), "hello");
        body.enter(|_, b| assert!(b.is_end_stream()));
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_body_mid_stream_releases_the_stream() {
        let drain = DrainController::new();
        let stack = crate::DrainStack::new(drain.watch())
            .guard(|g| g.max_lifetime(Duration::from_secs(10)))
            .unwrap();
        let (feed, res) = sse();
        let slot = Arc::new(Mutex::new(Some(res)));
        let svc = stack.layer(tower::service_fn(move |_req: Request<()>| {
            let res = slot.lock().unwrap().take().unwrap();
            async move { Ok::<_, std::convert::Infallible>(res) }
        }));
        let mut body = serve(svc).await;
        pass(&feed, &mut body, "data: 1\n\n");
        assert_eq!(drain.active_streams(), 1);
        drop(body);
        assert_eq!(drain.active_streams(), 0);
        drop(feed);
    }
}

mod service {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body::Body;
    use http_body_util::Empty;
    use tokio::sync::Notify;
    use tokio::time::advance;
    use tokio_test::{assert_pending, assert_ready, task::spawn};
    use tower::ServiceExt;
    use tower_layer::Layer;

    use crate::guard::{BreakerState, Guard, GuardLayer};
    use crate::DrainController;

    type Inner =
        tower::util::BoxCloneSyncService<Request<()>, Response<Empty<Bytes>>, std::io::Error>;

    fn _auto_traits() {
        fn send_sync<T: Send + Sync>() {}
        type Ready = tower::util::ServiceFn<
            fn(Request<()>) -> std::future::Ready<Result<Response<Empty<Bytes>>, ()>>,
        >;
        send_sync::<<Guard<Ready> as tower::Service<Request<()>>>::Future>();
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
        assert_eq!(err(l().first_frame_timeout(z)), "first_frame_timeout");
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
