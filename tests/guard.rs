//! End to end through a real socket: axum + the full `DrainStack` (with the guard) on
//! 127.0.0.1:0, read by a hyper-util client.

use std::convert::Infallible;
use std::future::IntoFuture;
use std::time::Duration;

use axum::response::sse::{Event, Sse};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_drain::{DrainController, DrainReason, DrainStack};

const WATCHDOG: Duration = Duration::from_secs(20);

fn ticks(every: Duration) -> impl futures_util::Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold(
        (tokio::time::interval(every), 0u64),
        |(mut interval, n)| async move {
            interval.tick().await;
            let event = Event::default()
                .event("tick")
                .data(format!("{{\"n\":{n}}}"));
            Some((Ok(event), (interval, n + 1)))
        },
    )
}

/// Reads a whole SSE body; returns its text and whether it ended cleanly.
async fn read_all(body: hyper::body::Incoming) -> (String, Result<(), String>) {
    let mut body = body;
    let mut text = String::new();
    loop {
        match body.frame().await {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    text.push_str(std::str::from_utf8(&d).unwrap());
                }
            }
            Some(Err(e)) => return (text, Err(e.to_string())),
            None => return (text, Ok(())),
        }
    }
}

#[tokio::test]
async fn a_stream_past_its_lifetime_gets_the_timeout_frame_and_a_clean_end() {
    tokio::time::timeout(WATCHDOG, async {
        let drain = DrainController::new();
        let stack = DrainStack::new(drain.watch())
            .guard(|g| g.max_lifetime(Duration::from_millis(600)))
            .unwrap();
        let app = Router::new()
            .route(
                "/events",
                get(|| async { Sse::new(ticks(Duration::from_millis(100))) }),
            )
            .layer(stack);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            axum::serve(listener, app)
                .with_graceful_shutdown(drain.stopped())
                .into_future(),
        );

        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let uri: http::Uri = format!("http://{addr}/events").parse().unwrap();
        let res = client.get(uri.clone()).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(drain.active_streams(), 1);
        let (text, end) = read_all(res.into_body()).await;
        assert_eq!(end, Ok(()), "the chunked body terminated cleanly");

        let events: Vec<&str> = text.split_terminator("\n\n").collect();
        assert!(events.len() >= 3, "{text}");
        let (last, ticks) = events.split_last().unwrap();
        assert!(ticks.iter().all(|e| e.starts_with("event: tick\ndata: {\"n\":")), "{text}");
        assert!(
            last.starts_with(
                "event: error\ndata: {\"error\":\"Connection timeout\",\"code\":\"TIMEOUT\"}\nretry: "
            ),
            "{text}"
        );
        assert!(text.ends_with("\n\n"), "the frame is a whole event");

        // The stream is released: the drain finds nothing to force-close.
        drain.drain(DrainReason::Manual);
        let report = drain.report().await;
        assert_eq!(report.force_closed, 0);
        assert_eq!(drain.active_streams(), 0);
        server.await.unwrap().unwrap();
    })
    .await
    .expect("watchdog");
}

#[tokio::test]
async fn a_failing_endpoint_trips_the_breaker_over_the_wire() {
    tokio::time::timeout(WATCHDOG, async {
        let drain = DrainController::new();
        let stack = DrainStack::new(drain.watch())
            .guard(|g| g.circuit_breaker(true))
            .unwrap();
        let breaker = stack.breaker().unwrap();
        let app = Router::new()
            .route(
                "/events",
                get(|| async { (http::StatusCode::BAD_GATEWAY, "upstream down") }),
            )
            .layer(stack);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(axum::serve(listener, app).into_future());

        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let uri: http::Uri = format!("http://{addr}/events").parse().unwrap();
        for _ in 0..5 {
            assert_eq!(client.get(uri.clone()).await.unwrap().status(), 502);
        }
        assert_eq!(breaker.state(), tower_drain::guard::BreakerState::Open);
        let res = client.get(uri).await.unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()["retry-after"], "30");
    })
    .await
    .expect("watchdog");
}

/// The reproduction of a service-wide outage: the half-open probe's handler hangs (a long poll,
/// a stuck dependency). Past the probe timeout it counts as failed, and after the next
/// cool-down a new probe goes through and closes the circuit.
#[tokio::test]
async fn a_hung_half_open_probe_cannot_hold_every_request_at_503() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    tokio::time::timeout(WATCHDOG, async {
        let drain = DrainController::new();
        let cooldown = Duration::from_millis(300);
        let stack = DrainStack::new(drain.watch())
            .guard(|g| g.failure_threshold(1).cooldown(cooldown))
            .unwrap();
        let breaker = stack.breaker().unwrap();
        // Call 0 fails (opens the circuit), call 1 (the probe) hangs, later ones succeed.
        let calls = Arc::new(AtomicUsize::new(0));
        let app = Router::new()
            .route(
                "/api",
                get(move || {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    async move {
                        match n {
                            0 => (http::StatusCode::INTERNAL_SERVER_ERROR, "boom"),
                            1 => std::future::pending().await,
                            _ => (http::StatusCode::OK, "ok"),
                        }
                    }
                }),
            )
            .layer(stack);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(axum::serve(listener, app).into_future());
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let uri: http::Uri = format!("http://{addr}/api").parse().unwrap();

        assert_eq!(client.get(uri.clone()).await.unwrap().status(), 500);
        assert_eq!(breaker.state(), tower_drain::guard::BreakerState::Open);
        // After the cool-down, the next request is the probe, and it hangs.
        tokio::time::sleep(cooldown).await;
        let hung = tokio::spawn({
            let (client, uri) = (client.clone(), uri.clone());
            async move { client.get(uri).await }
        });
        while breaker.state() != tower_drain::guard::BreakerState::HalfOpen {
            tokio::task::yield_now().await;
        }
        // Within a bounded time (probe timeout + cool-down) the service answers again.
        let mut statuses = Vec::new();
        let ok = loop {
            let status = client.get(uri.clone()).await.unwrap().status();
            statuses.push(status.as_u16());
            if status == 200 {
                break true;
            }
            if statuses.len() > 200 {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(ok, "still turned away: {statuses:?}");
        assert_eq!(breaker.state(), tower_drain::guard::BreakerState::Closed);
        assert!(!hung.is_finished(), "the hung probe is still hanging");
        hung.abort();
    })
    .await
    .expect("watchdog");
}

#[test]
fn absurd_durations_are_rejected_naming_the_setting() {
    use tower_drain::guard::{GuardBuilder, GuardLayer};
    let drain = DrainController::new();
    let g = || GuardLayer::builder(drain.watch());
    let huge = Duration::from_secs(u64::MAX);
    let check = |b: GuardBuilder, setting: &str| {
        assert_eq!(b.build().unwrap_err().setting(), setting);
    };
    check(g().response_timeout(huge), "response_timeout");
    check(g().max_lifetime(huge), "max_lifetime");
    check(g().idle_timeout(huge), "idle_timeout");
    check(g().heartbeat(huge), "heartbeat");
    check(g().cooldown(huge), "cooldown");
    check(g().probe_timeout(huge), "probe_timeout");
    check(
        g().revalidate(huge, |_: &http::request::Parts| async {
            Ok::<_, Infallible>(true)
        }),
        "revalidate",
    );
    let stack = || DrainStack::new(drain.watch());
    assert_eq!(
        stack()
            .guard(|g| g.max_lifetime(huge))
            .unwrap_err()
            .setting(),
        "max_lifetime"
    );
    assert_eq!(
        stack().guard(|g| g.heartbeat(huge)).unwrap_err().setting(),
        "heartbeat"
    );
    // The largest accepted value works.
    drop(
        g().max_lifetime(tower_drain::controller::MAX_DURATION)
            .build()
            .unwrap(),
    );
}
