//! A streamed NDJSON response under the stack with the `NdJson` encoder, read over a real
//! socket: on drain it ends with exactly one final JSON line and a clean end, never inside a
//! line, even when lines arrive split across body frames.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use support::{fetch, serve, within};
use tower_drain::frame::NdJson;
use tower_drain::{DrainController, DrainReason, DrainStack};

/// `{"n":N}\n` every 10 ms, each line sent as two body frames (`{"n":` and `N}\n`).
fn feed() -> Response {
    let lines = futures_util::stream::unfold(
        (tokio::time::interval(Duration::from_millis(10)), 0u64),
        |(mut iv, n)| async move {
            iv.tick().await;
            let halves = [Bytes::from("{\"n\":"), Bytes::from(format!("{n}}}\n"))];
            Some((halves, (iv, n + 1)))
        },
    )
    .flat_map(|halves| futures_util::stream::iter(halves.map(Ok::<_, Infallible>)));
    let mut res = Response::new(Body::from_stream(lines));
    res.headers_mut()
        .insert("content-type", "application/x-ndjson".parse().unwrap());
    res
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_stream_ends_with_exactly_one_final_line_and_a_clean_end() {
    let drain = DrainController::builder()
        .reconnect_delay(Duration::from_secs(4))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/feed", get(|| async { feed() }))
        .layer(DrainStack::new(drain.watch()).encoder(NdJson::new()));
    let server = serve(app, &drain).await;

    let res = fetch(server.addr, "/feed").await;
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut text = String::new();
    while text.matches('\n').count() < 5 {
        let frame = within("lines", body.frame()).await.unwrap().unwrap();
        text.push_str(std::str::from_utf8(&frame.into_data().unwrap()).unwrap());
    }

    drain.drain(DrainReason::Manual);
    let end = loop {
        match within("the end", body.frame()).await {
            Some(Ok(frame)) => {
                text.push_str(std::str::from_utf8(&frame.into_data().unwrap()).unwrap())
            }
            Some(Err(e)) => break Err(e.to_string()),
            None => break Ok(()),
        }
    };
    assert_eq!(end, Ok(()), "a clean end of the chunked body:\n{text}");
    assert!(text.ends_with('\n'), "no partial line:\n{text}");

    // Every line is whole JSON: the data lines in order, then exactly one final line.
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}\n{text}")))
        .collect();
    let (last, data) = lines.split_last().unwrap();
    for (i, line) in data.iter().enumerate() {
        assert_eq!(line["n"], i as u64, "{text}");
    }
    assert_eq!(last["type"], "shutdown", "{text}");
    assert_eq!(last["reason"], "manual");
    assert_eq!(last["reconnect_delay"], 4);
    let retry_ms = last["retry_ms"].as_u64().unwrap();
    assert!((3200..=4800).contains(&retry_ms), "{retry_ms}");
    assert_eq!(
        lines.iter().filter(|l| l.get("type").is_some()).count(),
        1,
        "exactly one final line"
    );

    within("server stops", drain.stopped()).await;
    within("server task", server.task).await.unwrap().unwrap();
}
