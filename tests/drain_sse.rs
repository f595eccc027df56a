//! End to end: a real axum app under the full stack, over TCP, read by a real HTTP client.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderName, StatusCode};
use support::*;
use tokio::sync::mpsc;
use tower_drain::frame::RunToCompletion;
use tower_drain::probe::Probes;
use tower_drain::{DrainController, DrainReason, DrainStack};

fn ticks(every: Duration) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let s = futures_util::stream::unfold(
        (tokio::time::interval(every), 0u64),
        |(mut iv, n)| async move {
            iv.tick().await;
            let ev = Event::default()
                .event("tick")
                .data(format!("{{\"n\":{n}}}"));
            Some((Ok(ev), (iv, n + 1)))
        },
    );
    Sse::new(s)
}

fn sse_response(body: Body) -> Response {
    let mut res = Response::new(body);
    res.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    res
}

/// `/events` ticks every `every`; probes are mounted outside the stack.
fn app(drain: &DrainController, stack: DrainStack, every: Duration) -> Router {
    let probes = Probes::new(drain.clone());
    Router::new()
        .route("/events", get(move || async move { ticks(every) }))
        .route(
            "/export",
            get(move || async move {
                let mut res = ticks(every).into_response();
                res.extensions_mut().insert(RunToCompletion);
                res
            }),
        )
        .layer(stack)
        .route_service("/healthz", probes.clone())
        .route_service("/readyz", probes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_open_stream_gets_exactly_one_shutdown_frame_and_a_clean_end() {
    const N: usize = 100;
    let drain = DrainController::builder()
        .reconnect_delay(Duration::from_secs(7))
        .build()
        .unwrap();
    let server = serve(
        app(
            &drain,
            DrainStack::new(drain.watch()),
            Duration::from_millis(20),
        ),
        &drain,
    )
    .await;

    let mut clients = Vec::new();
    for _ in 0..N {
        let mut c = SseClient::open(server.addr, "/events").await;
        let first = c.next_event().await.unwrap();
        assert_eq!(first.event.as_deref(), Some("tick"));
        assert_eq!(first.json(), serde_json::json!({"n": 0}));
        clients.push(c);
    }
    assert_eq!(drain.active_streams(), N as u64);

    assert!(drain.drain(DrainReason::Manual));
    let results = within(
        "every client reads to the end",
        futures_util::future::join_all(clients.iter_mut().map(|c| c.rest())),
    )
    .await;

    for (events, end) in results {
        assert_eq!(end, Ok(()), "the chunked body terminates cleanly");
        let (last, before) = events.split_last().expect("at least the shutdown event");
        assert!(before.iter().all(|e| e.event.as_deref() == Some("tick")));
        assert_eq!(last.event.as_deref(), Some("shutdown"));
        assert_eq!(last.data.len(), 1, "one data line");
        let data = last.json();
        assert_eq!(data["type"], "shutdown");
        assert_eq!(data["reconnect_delay"], 7);
        assert_eq!(data["reason"], "manual");
        assert!(data.get("forced").is_none());
        humantime::parse_rfc3339(data["timestamp"].as_str().unwrap()).unwrap();
        let retry = last.retry.expect("a retry: hint");
        assert!(
            (5600..=8400).contains(&retry),
            "retry {retry} within ±20 % of 7 s"
        );
    }

    let report = within("the report", drain.report()).await;
    assert_eq!(report.reason, DrainReason::Manual);
    assert_eq!(report.streams_at_drain, N as u64);
    assert_eq!(report.notified, N as u64);
    assert_eq!(report.closed_gracefully, N as u64);
    assert_eq!(report.force_closed, 0);
    assert_eq!(drain.active_streams(), 0);
    within("the server stops", server.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_rejects_with_503_after_the_propagation_delay_and_exempts_probes() {
    let drain = DrainController::builder()
        .propagation_delay(Duration::from_millis(300))
        .reconnect_delay(Duration::from_secs(4))
        .build()
        .unwrap();
    let server = serve(
        app(
            &drain,
            DrainStack::new(drain.watch()),
            Duration::from_millis(50),
        ),
        &drain,
    )
    .await;
    // A stream that opts out of the shutdown frame keeps the drain open while we look.
    let export = SseClient::open(server.addr, "/export").await;
    let closing = drain.closing();
    drain.drain(DrainReason::Signal);

    // Draining: readiness fails at once, but new requests are still served.
    assert_eq!(
        fetch(server.addr, "/readyz").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let mut during_delay = SseClient::new(fetch(server.addr, "/events").await);
    assert_eq!(drain.phase(), tower_drain::Phase::Draining);

    within("closing", closing).await;
    let res = fetch(server.addr, "/events").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "4");
    assert_eq!(res.headers()["connection"], "close");
    let res = fetch(server.addr, "/unknown-route").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        fetch(server.addr, "/healthz").await.status(),
        StatusCode::OK
    );

    // The stream opened during the delay counts and is notified.
    let (events, end) = within("stream ends", during_delay.rest()).await;
    assert_eq!(end, Ok(()));
    assert_eq!(events.last().unwrap().event.as_deref(), Some("shutdown"));
    drop(export); // the server notices at its next tick; then the drain is over
    let report = within("report", drain.report()).await;
    assert_eq!(report.streams_at_drain, 2);
    assert_eq!(report.notified, 1);
    assert_eq!(report.closed_gracefully, 2);
    assert_eq!(report.rejected, 2);
    assert!(report.draining >= Duration::from_millis(300));
    within("server", server.task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_frame_never_lands_inside_an_event_split_across_body_frames() {
    let drain = DrainController::new();
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let route = get(move || {
        let rx = rx.lock().unwrap().take().unwrap();
        async move {
            let s = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>);
            sse_response(Body::from_stream(s))
        }
    });
    let app = Router::new()
        .route("/split", route)
        .layer(DrainStack::new(drain.watch()));
    let server = serve(app, &drain).await;
    let mut client = SseClient::open(server.addr, "/split").await;

    tx.send(Bytes::from("event: update\ndata: {\"part\":"))
        .await
        .unwrap();
    // Wait until the first half reached the client, then drain mid-event.
    assert!(within("first half", client.read_chunk()).await);
    assert_eq!(client.raw, "event: update\ndata: {\"part\":");
    drain.drain(DrainReason::Manual);
    within("closing", drain.closing()).await;
    tx.send(Bytes::from("1}\n")).await.unwrap();
    tx.send(Bytes::from("\n")).await.unwrap();

    let (events, end) = within("end", client.rest()).await;
    assert_eq!(end, Ok(()));
    assert_eq!(events.len(), 2, "{:?}", client.raw);
    assert_eq!(events[0].event.as_deref(), Some("update"));
    assert_eq!(events[0].json(), serde_json::json!({"part": 1}));
    assert_eq!(events[1].event.as_deref(), Some("shutdown"));
    assert!(client
        .raw
        .starts_with("event: update\ndata: {\"part\":1}\n\nevent: shutdown\n"));
    drop(tx);
    within("server", server.task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_deadline_force_closes_and_counts_what_remains() {
    let drain = DrainController::builder()
        .grace_period(Duration::from_millis(600))
        .build()
        .unwrap();
    let opted_out = get(|| async {
        let s = futures_util::stream::iter([Ok::<_, Infallible>(Bytes::from("data: working\n\n"))])
            .chain(futures_util::stream::pending());
        let mut res = sse_response(Body::from_stream(s));
        res.extensions_mut().insert(RunToCompletion);
        res
    });
    let stalled = get(|| async {
        let s = futures_util::stream::iter([
            Ok::<_, Infallible>(Bytes::from("data: whole\n\n")),
            Ok(Bytes::from("data: half an ev")),
        ])
        .chain(futures_util::stream::pending());
        sse_response(Body::from_stream(s))
    });
    let app = Router::new()
        .route("/export", opted_out)
        .route("/stalled", stalled)
        .layer(DrainStack::new(drain.watch()));
    let server = serve(app, &drain).await;

    let mut export = SseClient::open(server.addr, "/export").await;
    assert_eq!(export.next_event().await.unwrap().data, ["working"]);
    let mut stall = SseClient::open(server.addr, "/stalled").await;
    assert_eq!(stall.next_event().await.unwrap().data, ["whole"]);
    drain.drain(DrainReason::Programmatic("test"));

    let (events, end) = within("export ends", export.rest()).await;
    assert_eq!(end, Ok(()));
    assert_eq!(
        events.len(),
        1,
        "nothing before the deadline, then the forced frame"
    );
    assert_eq!(events[0].event.as_deref(), Some("shutdown"));
    assert_eq!(events[0].json()["forced"], true);
    assert_eq!(events[0].json()["reason"], "test");

    let (events, end) = within("stalled ends", stall.rest()).await;
    assert!(
        end.is_err(),
        "cut at the deadline mid-event: the response is aborted, never a clean end"
    );
    assert!(
        events.is_empty(),
        "no frame in the middle of an event: {:?}",
        stall.raw
    );
    assert_eq!(stall.leftover(), "data: half an ev");

    let report = within("report", drain.report()).await;
    assert_eq!(report.streams_at_drain, 2);
    assert_eq!(report.force_closed, 2);
    assert_eq!(report.closed_gracefully, 0);
    assert_eq!(report.notified, 1);
    assert!(report.duration >= Duration::from_millis(600));
    within("server", server.task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_limit_answers_429_and_a_departed_client_frees_its_slot() {
    let drain = DrainController::new();
    let stack = DrainStack::new(drain.watch()).track(|t| {
        t.max_per_key(2)
            .key_header(HeaderName::from_static("x-client-id"))
            .retry_after(Duration::from_millis(1500))
    });
    let server = serve(app(&drain, stack, Duration::from_millis(20)), &drain).await;
    let alice = [("x-client-id", "alice")];

    let a1 = fetch_with(server.addr, "/events", &alice).await;
    let a2 = fetch_with(server.addr, "/events", &alice).await;
    assert_eq!((a1.status(), a2.status()), (StatusCode::OK, StatusCode::OK));
    let a3 = fetch_with(server.addr, "/events", &alice).await;
    assert_eq!(a3.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a3.headers()["retry-after"], "2");
    // Other keys and requests without a key are not affected.
    let b1 = fetch_with(server.addr, "/events", &[("x-client-id", "bob")]).await;
    assert_eq!(b1.status(), StatusCode::OK);
    let anon: Vec<_> =
        futures_util::future::join_all((0..3).map(|_| fetch(server.addr, "/events"))).await;
    assert!(anon.iter().all(|r| r.status() == StatusCode::OK));
    assert_eq!(drain.active_streams(), 6);

    drop(a1); // the client goes away; the server notices on its next write
    eventually("the slot to be freed", || drain.active_streams() == 5).await;
    let a4 = fetch_with(server.addr, "/events", &alice).await;
    assert_eq!(a4.status(), StatusCode::OK);
}
