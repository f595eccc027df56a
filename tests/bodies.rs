//! The response body contract of every layer, over real HTTP/1.1 and HTTP/2 (h2c)
//! connections: a body that may get frames added loses its `content-length`; a body that has
//! already ended (a gRPC "Trailers-Only" answer) passes through untouched with its
//! END_STREAM; a clean end always means whole records.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{Request, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::oneshot;
use tower::{Layer, ServiceExt};
use tower_drain::frame::{FrameLayer, Grpc, NdJson};
use tower_drain::guard::GuardLayer;
use tower_drain::{DrainController, DrainReason, DrainStack};

const WATCHDOG: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WATCHDOG, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Sends `req` on a fresh connection of the given version.
async fn send(
    addr: SocketAddr,
    version: Version,
    req: Request<Empty<Bytes>>,
) -> Response<Incoming> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    if version == Version::HTTP_2 {
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        tx.send_request(req).await.unwrap()
    } else {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        tx.send_request(req).await.unwrap()
    }
}

fn get_req(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", "localhost")
        .body(Empty::new())
        .unwrap()
}

/// An NDJSON export that declares `content-length: 16`, writes its first line, and its
/// second only when `second` fires.
fn fixed_length_export(second: oneshot::Receiver<()>) -> Response {
    let lines = futures_util::stream::unfold(Some((0, second)), |state| async move {
        let (n, second) = state?;
        match n {
            0 => Some((
                Ok::<_, Infallible>(Bytes::from("{\"a\":1}\n")),
                Some((1, second)),
            )),
            _ => {
                let _ = second.await;
                Some((Ok(Bytes::from("{\"b\":2}\n")), None))
            }
        }
    });
    let mut res = Response::new(Body::from_stream(lines));
    let h = res.headers_mut();
    h.insert("content-type", "application/x-ndjson".parse().unwrap());
    h.insert("content-length", "16".parse().unwrap());
    res
}

/// Reads a body to its end: its text, and whether it ended cleanly.
async fn read_to_end(mut body: Incoming, mut on_text: impl FnMut(&str)) -> (String, bool) {
    let mut text = String::new();
    loop {
        match within("the body", body.frame()).await {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    text.push_str(std::str::from_utf8(&d).unwrap());
                    on_text(&text);
                }
            }
            Some(Err(_)) => return (text, false),
            None => return (text, true),
        }
    }
}

async fn a_fixed_length_body_gets_whole_frames_and_no_stale_length(version: Version) {
    let drain = DrainController::new();
    let (second_tx, second_rx) = oneshot::channel::<()>();
    let second = std::sync::Arc::new(std::sync::Mutex::new(Some(second_rx)));
    let stack = DrainStack::new(drain.watch())
        .encoder(NdJson::new())
        .guard(|g| g.heartbeat(Duration::from_millis(100)))
        .unwrap();
    let app = Router::new()
        .route(
            "/export",
            get(move || {
                let rx = second.lock().unwrap().take().expect("one request");
                async move { fixed_length_export(rx) }
            }),
        )
        .layer(stack);
    let addr = support::serve_h1_h2(app).await;

    let res = send(addr, version, get_req("/export")).await;
    assert_eq!(res.status(), 200);
    assert!(
        res.headers().get("content-length").is_none(),
        "a body that may get frames cannot keep its declared length"
    );
    let mut drained = false;
    let (text, clean) = read_to_end(res.into_body(), |text| {
        // Drain once the heartbeat is in: a frame was added, and the second line is pending.
        if !drained && text.contains("heartbeat") {
            drained = true;
            drain.drain(DrainReason::Manual);
        }
    })
    .await;
    drop(second_tx);
    assert!(clean, "a clean end: {text:?}");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e} in {text:?}")))
        .collect();
    assert_eq!(lines[0], serde_json::json!({"a":1}), "{text:?}");
    assert_eq!(
        lines[1],
        serde_json::json!({"type":"heartbeat"}),
        "{text:?}"
    );
    assert_eq!(lines.last().unwrap()["type"], "shutdown", "{text:?}");
    assert!(text.ends_with('\n'));
}

#[tokio::test]
async fn http1_fixed_length_ndjson_gets_whole_frames_and_no_stale_length() {
    a_fixed_length_body_gets_whole_frames_and_no_stale_length(Version::HTTP_11).await;
}

#[tokio::test]
async fn http2_fixed_length_ndjson_gets_whole_frames_and_no_stale_length() {
    a_fixed_length_body_gets_whole_frames_and_no_stale_length(Version::HTTP_2).await;
}

/// Each layer alone drops `content-length` where it may add frames, and its body's size hint
/// is no longer exact; a response it will not touch keeps both.
#[tokio::test]
async fn every_layer_drops_the_length_only_of_bodies_it_may_extend() {
    let drain = DrainController::new();
    fn fixed(ct: &'static str) -> http::Response<Full<Bytes>> {
        http::Response::builder()
            .header("content-type", ct)
            .header("content-length", "5")
            .body(Full::new(Bytes::from("{}\n\n\n")))
            .unwrap()
    }
    /// `res` through `layer` around a service that answers it.
    macro_rules! through {
        ($layer:expr, $res:expr) => {{
            let res = std::sync::Arc::new(std::sync::Mutex::new(Some($res)));
            let svc = tower::service_fn(move |_: Request<()>| {
                let res = res.lock().unwrap().take().unwrap();
                std::future::ready(Ok::<_, Infallible>(res))
            });
            $layer.layer(svc).oneshot(Request::new(())).await.unwrap()
        }};
    }
    let nd = "application/x-ndjson";
    let res = through!(
        FrameLayer::with_encoder(drain.watch(), NdJson::new()),
        fixed(nd)
    );
    assert!(res.headers().get("content-length").is_none());
    assert_eq!(res.body().size_hint().exact(), None);
    let guard = GuardLayer::builder(drain.watch())
        .encoder(NdJson::new())
        .heartbeat(Duration::from_secs(1))
        .build()
        .unwrap();
    let res = through!(guard.clone(), fixed(nd));
    assert!(res.headers().get("content-length").is_none());
    assert_eq!(res.body().size_hint().exact(), None);
    let res = through!(
        DrainStack::new(drain.watch()).encoder(NdJson::new()),
        fixed(nd)
    );
    assert!(res.headers().get("content-length").is_none());
    assert_eq!(res.body().size_hint().exact(), None);

    // Not a stream of the encoder's protocol: untouched.
    let json = "application/json";
    let res = through!(
        FrameLayer::with_encoder(drain.watch(), NdJson::new()),
        fixed(json)
    );
    assert_eq!(res.headers()["content-length"], "5");
    assert_eq!(res.body().size_hint().exact(), Some(5));
    let res = through!(guard, fixed(json));
    assert_eq!(res.headers()["content-length"], "5");
    let res = through!(
        DrainStack::new(drain.watch()).encoder(NdJson::new()),
        fixed(json)
    );
    assert_eq!(res.headers()["content-length"], "5");
    assert_eq!(res.body().size_hint().exact(), Some(5));
}

/// A gRPC "Trailers-Only" error (status in the HEADERS frame, empty body) keeps END_STREAM on
/// its HEADERS frame through the stack, serving or closing, and gets no second status.
#[tokio::test]
async fn a_grpc_trailers_only_error_keeps_its_end_stream_over_h2c() {
    let drain = DrainController::builder()
        .grace_period(Duration::from_secs(5))
        .build()
        .unwrap();
    let unimplemented =
        || async { tonic::Status::unimplemented("no such method").into_http::<axum::body::Body>() };
    let app = Router::new()
        .route("/demo.Svc/Stack", post(unimplemented))
        .layer(
            DrainStack::new(drain.watch())
                .encoder(Grpc::new())
                .reject(|r| r.exempt(|_| true)),
        )
        .merge(
            Router::new()
                .route("/demo.Svc/Frame", post(unimplemented))
                .layer(FrameLayer::with_encoder(drain.watch(), Grpc::new())),
        );
    let addr = support::serve_h1_h2(app).await;
    let call = |path: &'static str| async move {
        let req = Request::post(path)
            .header("host", "localhost")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Empty::new())
            .unwrap();
        send(addr, Version::HTTP_2, req).await
    };
    for phase in ["serving", "closing"] {
        if phase == "closing" {
            drain.drain(DrainReason::Manual);
            drain.closing().await;
        }
        for path in ["/demo.Svc/Stack", "/demo.Svc/Frame"] {
            let res = call(path).await;
            assert_eq!(res.headers()["grpc-status"], "12", "{phase} {path}");
            assert!(
                res.body().is_end_stream(),
                "{phase} {path}: END_STREAM on the HEADERS frame"
            );
            let collected = res.into_body().collect().await.unwrap();
            assert!(
                collected.trailers().is_none(),
                "{phase} {path}: no second status"
            );
            assert!(collected.to_bytes().is_empty());
        }
    }
}

/// A body that sends `first`, then fails once `fail` fires (or never sends anything more
/// without one).
fn half_record(
    content_type: &'static str,
    first: &'static str,
    fail: Option<oneshot::Receiver<()>>,
) -> Response {
    let chunks = futures_util::stream::unfold((0u8, fail), move |(n, fail)| async move {
        match (n, fail) {
            (0, fail) => Some((Ok(Bytes::from_static(first.as_bytes())), (1, fail))),
            (_, Some(fail)) => {
                let _ = fail.await;
                Some((Err(std::io::Error::other("upstream failed")), (2, None)))
            }
            (_, None) => std::future::pending().await,
        }
    });
    let mut res = Response::new(Body::from_stream(chunks));
    res.headers_mut()
        .insert("content-type", content_type.parse().unwrap());
    res
}

/// Ended in the middle of a record, a response must not look complete: HTTP/1.1 gets no
/// last chunk, HTTP/2 a `RST_STREAM` instead of END_STREAM.
async fn a_record_cut_in_the_middle_is_a_failure_not_a_clean_end(version: Version) {
    let drain = DrainController::builder()
        .grace_period(Duration::from_millis(300))
        .force_linger(Duration::from_millis(100))
        .build()
        .unwrap();
    let (fail_tx, fail_rx) = oneshot::channel::<()>();
    let fail_rx = std::sync::Arc::new(std::sync::Mutex::new(Some(fail_rx)));
    let app = Router::new()
        .route(
            "/stuck",
            get(|| async { half_record("text/event-stream", "data: stuck", None) }),
        )
        .layer(DrainStack::new(drain.watch()))
        .merge(
            Router::new()
                .route(
                    "/broken",
                    get(move || {
                        let fail = fail_rx.lock().unwrap().take();
                        async move { half_record("application/x-ndjson", "{\"a\":", fail) }
                    }),
                )
                .layer(DrainStack::new(drain.watch()).encoder(NdJson::new())),
        );
    let addr = support::serve_h1_h2(app).await;

    // A body error in the middle of an NDJSON line (once the client has the half line).
    let res = send(addr, version, get_req("/broken")).await;
    let mut fail_tx = Some(fail_tx);
    let (text, clean) = read_to_end(res.into_body(), |_| {
        if let Some(tx) = fail_tx.take() {
            let _ = tx.send(());
        }
    })
    .await;
    assert_eq!(text, "{\"a\":");
    assert!(!clean, "{version:?}: a cut line must not end cleanly");

    // An SSE event still incomplete at the grace deadline.
    let res = send(addr, version, get_req("/stuck")).await;
    let mut drained = false;
    let (text, clean) = read_to_end(res.into_body(), |t| {
        if !drained && t == "data: stuck" {
            drained = true;
            drain.drain(DrainReason::Manual);
        }
    })
    .await;
    assert_eq!(text, "data: stuck");
    assert!(
        !clean,
        "{version:?}: a forced end mid-event must not end cleanly"
    );
    let report = within("the report", drain.report()).await;
    assert_eq!(report.force_closed, 1);
    assert_eq!(report.notified, 0);
}

#[tokio::test]
async fn http1_a_record_cut_in_the_middle_is_a_failure() {
    a_record_cut_in_the_middle_is_a_failure_not_a_clean_end(Version::HTTP_11).await;
}

#[tokio::test]
async fn http2_a_record_cut_in_the_middle_is_a_failure() {
    a_record_cut_in_the_middle_is_a_failure_not_a_clean_end(Version::HTTP_2).await;
}
