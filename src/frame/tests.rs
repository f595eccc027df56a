//! Poll-level tests of `FrameBody` through `FrameLayer`.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame as BodyFrame};
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_test::{assert_pending, assert_ready};
use tower::{ServiceBuilder, ServiceExt};

use super::*;
use crate::{DrainController, DrainReason};

type Chan = StreamBody<ReceiverStream<Result<BodyFrame<Bytes>, Infallible>>>;

fn channel_body(
    ct: &'static str,
) -> (
    mpsc::Sender<Result<BodyFrame<Bytes>, Infallible>>,
    Response<Chan>,
) {
    let (tx, rx) = mpsc::channel(8);
    let mut res = Response::new(StreamBody::new(ReceiverStream::new(rx)));
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    (tx, res)
}

async fn through<B>(layer: FrameLayer, req: Request<()>, res: Response<B>) -> Response<FrameBody<B>>
where
    B: Body<Data = Bytes> + Send + 'static,
{
    ServiceBuilder::new()
        .layer(layer)
        .service(crate::test_support::once(res))
        .oneshot(req)
        .await
        .unwrap()
}

type Boxed = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Like `through`, with a `TrackLayer` outside, so the controller waits for the stream.
async fn tracked<B>(
    drain: &DrainController,
    layer: FrameLayer,
    res: Response<B>,
) -> Response<crate::track::TrackedBody<FrameBody<Boxed>>>
where
    B: Body<Data = Bytes, Error = Infallible> + Send + Sync + 'static,
{
    // TrackLayer answers 429s with `B::default()`, so give it a body type that has one.
    let res = std::sync::Arc::new(std::sync::Mutex::new(Some(res.map(|b| b.boxed()))));
    ServiceBuilder::new()
        .layer(crate::track::TrackLayer::new(drain.watch()))
        .layer(layer)
        .service_fn(move |_req: Request<()>| {
            let res = res.lock().unwrap().take().unwrap();
            async move { Ok::<_, Infallible>(res) }
        })
        .oneshot(Request::new(()))
        .await
        .unwrap()
}

fn data<E: std::fmt::Debug>(p: std::task::Poll<Option<Result<BodyFrame<Bytes>, E>>>) -> Bytes {
    match p {
        std::task::Poll::Ready(Some(Ok(f))) => f.into_data().expect("a data frame"),
        other => panic!("expected data, got {other:?}"),
    }
}

#[tokio::test]
async fn size_hint_and_end_of_stream_describe_the_wrapper() {
    let drain = DrainController::new();
    let mut res = Response::new(Full::new(Bytes::from("data: a\n\n")));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    let body = through(FrameLayer::new(drain.watch()), Request::new(()), res)
        .await
        .into_body();
    // A frame may still be added: keep the lower bound, no upper bound (no Content-Length).
    assert_eq!(body.size_hint().lower(), 9);
    assert_eq!(body.size_hint().upper(), None);
    assert!(!body.is_end_stream());
    let mut body = tokio_test::task::spawn(body);
    let first = data(body.enter(|cx, b| b.poll_frame(cx)));
    assert_eq!(first, "data: a\n\n");
    assert!(!body.enter(|_, b| b.is_end_stream()));
    assert!(assert_ready!(body.enter(|cx, b| b.poll_frame(cx))).is_none());
    assert!(body.enter(|_, b| b.is_end_stream()));
    assert_eq!(body.enter(|_, b| b.size_hint()).exact(), Some(0));
}

#[tokio::test]
async fn drain_and_inner_data_ready_together_sends_the_frame_first() {
    let drain = DrainController::new();
    let (tx, res) = channel_body("text/event-stream");
    let body = through(FrameLayer::new(drain.watch()), Request::new(()), res)
        .await
        .into_body();
    let mut body = tokio_test::task::spawn(body);
    tx.send(Ok(BodyFrame::data(Bytes::from("data: 1\n\n"))))
        .await
        .unwrap();
    assert_eq!(data(body.enter(|cx, b| b.poll_frame(cx))), "data: 1\n\n");
    assert_pending!(body.enter(|cx, b| b.poll_frame(cx)));

    tx.send(Ok(BodyFrame::data(Bytes::from("data: 2\n\n"))))
        .await
        .unwrap();
    drain.drain(DrainReason::Manual);
    drain.closing().await;
    assert!(body.is_woken(), "the drain wakes an idle body");
    let last = data(body.enter(|cx, b| b.poll_frame(cx)));
    assert!(last.starts_with(b"event: shutdown\n"), "{last:?}");
    assert!(assert_ready!(body.enter(|cx, b| b.poll_frame(cx))).is_none());
    assert!(body.enter(|_, b| b.is_end_stream()));
}

#[tokio::test]
async fn a_body_created_after_the_drain_started_sees_it_at_once() {
    let drain = DrainController::new();
    drain.drain(DrainReason::Signal);
    drain.closing().await;
    let (_tx, res) = channel_body("text/event-stream");
    let body = through(FrameLayer::new(drain.watch()), Request::new(()), res)
        .await
        .into_body();
    let mut body = std::pin::pin!(body);
    let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(frame.starts_with(b"event: shutdown\n"));
    assert!(body.frame().await.is_none());
}

#[tokio::test]
async fn only_streams_of_the_protocol_are_touched() {
    let drain = DrainController::new();
    drain.drain(DrainReason::Manual);
    drain.closing().await;
    let layer = || FrameLayer::new(drain.watch());
    let cases: Vec<(Request<()>, Response<Full<Bytes>>)> = vec![
        // Not SSE.
        (Request::new(()), {
            let mut r = Response::new(Full::new(Bytes::from("{}")));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }),
        // HEAD.
        (Request::builder().method(Method::HEAD).body(()).unwrap(), {
            let mut r = Response::new(Full::new(Bytes::new()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            r
        }),
        // 204.
        (Request::new(()), {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            r
        }),
        // Already compressed.
        (Request::new(()), {
            let mut r = Response::new(Full::new(Bytes::from("gz")));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            r.headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            r
        }),
    ];
    for (req, res) in cases {
        let expected = res.body().size_hint().exact();
        let body = through(layer(), req, res).await.into_body();
        assert_eq!(
            body.size_hint().exact(),
            expected,
            "passed through unchanged"
        );
        let bytes = body.collect().await.unwrap().to_bytes();
        assert!(!bytes.windows(5).any(|w| w == b"event"), "{bytes:?}");
    }
    // The `Inject` extension opts any response in.
    let mut r = Response::new(Full::new(Bytes::from("line\n")));
    r.extensions_mut().insert(Inject);
    let bytes = through(layer(), Request::new(()), r)
        .await
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert!(bytes.starts_with(b"event: shutdown\n"));
}

/// The body of `res` through a track layer and a frame layer with `encoder`.
async fn tracked_body<B>(
    drain: &DrainController,
    encoder: impl crate::frame::FinalFrame,
    res: Response<B>,
) -> crate::track::TrackedBody<FrameBody<Boxed>>
where
    B: Body<Data = Bytes, Error = Infallible> + Send + Sync + 'static,
{
    let layer = FrameLayer::with_encoder(drain.watch(), encoder);
    tracked(drain, layer, res).await.into_body()
}

#[tokio::test]
async fn ndjson_ends_with_one_line_and_grpc_with_trailers() {
    let drain = DrainController::builder().message("bye").build().unwrap();
    let (tx, res) = channel_body("application/x-ndjson");
    let ndjson = tracked_body(&drain, NdJson::new(), res).await;
    let (gtx, mut gres) = channel_body("application/grpc");
    gres.headers_mut()
        .insert("grpc-encoding", HeaderValue::from_static("identity"));
    let grpc = tracked_body(&drain, Grpc::new(), gres).await;

    tx.send(Ok(BodyFrame::data(Bytes::from("{\"n\":1}\n{\"n\":"))))
        .await
        .unwrap();
    // A gRPC message split in two body frames: 5-byte header + 3 of 4 payload bytes.
    gtx.send(Ok(BodyFrame::data(Bytes::from_static(&[
        0, 0, 0, 0, 4, b'a', b'b', b'c',
    ]))))
    .await
    .unwrap();
    let mut n = std::pin::pin!(ndjson);
    let mut g = std::pin::pin!(grpc);
    n.frame().await.unwrap().unwrap();
    g.frame().await.unwrap().unwrap();
    drain.drain(DrainReason::Manual);
    drain.closing().await;
    tx.send(Ok(BodyFrame::data(Bytes::from("2}\n"))))
        .await
        .unwrap();
    gtx.send(Ok(BodyFrame::data(Bytes::from_static(b"d"))))
        .await
        .unwrap();

    assert_eq!(
        n.frame().await.unwrap().unwrap().into_data().unwrap(),
        "2}\n"
    );
    let line = n.frame().await.unwrap().unwrap().into_data().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["message"].as_str()),
        (Some("shutdown"), Some("bye"))
    );
    assert!(line.ends_with(b"}\n") && line.iter().filter(|b| **b == b'\n').count() == 1);
    assert!(n.frame().await.is_none());

    assert_eq!(g.frame().await.unwrap().unwrap().into_data().unwrap(), "d");
    let trailers = g.frame().await.unwrap().unwrap().into_trailers().unwrap();
    assert_eq!(trailers["grpc-status"], "14");
    assert_eq!(trailers["grpc-message"], "bye");
    assert!(g.frame().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn an_opted_out_stream_gets_only_the_forced_frame_at_the_deadline() {
    let drain = DrainController::configured(|b| b.grace_period(Duration::from_secs(3)));
    let (_tx, mut res) = channel_body("text/event-stream");
    res.extensions_mut().insert(RunToCompletion);
    let body = tracked(&drain, FrameLayer::new(drain.watch()), res)
        .await
        .into_body();
    let mut body = tokio_test::task::spawn(body);
    assert_pending!(body.enter(|cx, b| b.poll_frame(cx)));
    drain.drain(DrainReason::Manual);
    drain.closing().await;
    assert_pending!(body.enter(|cx, b| b.poll_frame(cx)));
    tokio::time::sleep(Duration::from_millis(2999)).await;
    assert!(!body.is_woken());
    // The controller's deadline timer (3 s) fires before this one (3.001 s).
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert!(body.is_woken(), "woken at the deadline");
    let last = match body.enter(|cx, b| b.poll_frame(cx)) {
        std::task::Poll::Ready(Some(Ok(f))) => f.into_data().unwrap(),
        other => panic!("{other:?}"),
    };
    assert!(std::str::from_utf8(&last)
        .unwrap()
        .contains("\"forced\":true"));
    drop(body);
    let report = drain.report().await;
    assert_eq!((report.force_closed, report.notified), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn untracked_bodies_end_when_the_controller_stops() {
    let drain = DrainController::new();
    let (_tx, mut res) = channel_body("text/event-stream");
    res.extensions_mut().insert(RunToCompletion);
    let body = through(FrameLayer::new(drain.watch()), Request::new(()), res)
        .await
        .into_body();
    let mut body = std::pin::pin!(body);
    drain.drain(DrainReason::Manual);
    // No TrackLayer: the controller sees no stream and stops at once; the body follows.
    drain.stopped().await;
    let last = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(std::str::from_utf8(&last)
        .unwrap()
        .contains("\"forced\":true"));
    assert!(body.frame().await.is_none());
}

#[test]
fn bodies_and_futures_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<FrameBody<Full<Bytes>>>();
    type Ready = tower::util::ServiceFn<
        fn(Request<()>) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>,
    >;
    send_sync::<<crate::frame::Frame<Ready> as tower::Service<Request<()>>>::Future>();
    send_sync::<<crate::stack::DrainService<Ready> as tower::Service<Request<()>>>::Future>();
    send_sync::<crate::track::TrackedBody<Full<Bytes>>>();
    send_sync::<
        crate::reject::ResponseFuture<std::future::Ready<Result<Response<()>, Infallible>>, ()>,
    >();
    send_sync::<crate::controller::Stopped>();
    send_sync::<FrameLayer>();
    send_sync::<crate::DrainStack>();
}
