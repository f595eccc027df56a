//! The crate's unit-test support: one scripted (channel-fed) streaming body, a one-shot
//! service, and helpers to poll bodies.
#![allow(dead_code)]

use std::convert::Infallible;
use std::fmt;
use std::task::Poll;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::StreamBody;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_test::task::Spawn;
use tower::ServiceExt;
use tower_layer::Layer;

use std::sync::{Arc, Mutex};

use crate::guard::{GuardLayer, GuardedBody};

#[derive(Debug)]
pub(crate) struct TestError;

impl fmt::Display for TestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("upstream broke")
    }
}

impl std::error::Error for TestError {}

pub(crate) type TestBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, TestError>>>;

/// The sending side of a [`TestBody`].
pub(crate) struct Feed(pub(crate) mpsc::Sender<Result<Frame<Bytes>, TestError>>);

impl Feed {
    pub(crate) fn data(&self, s: &'static str) {
        self.0
            .try_send(Ok(Frame::data(Bytes::from_static(s.as_bytes()))))
            .unwrap();
    }
    pub(crate) fn error(&self) {
        self.0.try_send(Err(TestError)).unwrap();
    }
}

/// A response with `content_type` whose body is fed through the returned [`Feed`].
pub(crate) fn streaming(content_type: &'static str) -> (Feed, Response<TestBody>) {
    let (tx, rx) = mpsc::channel(16);
    let mut res = Response::new(StreamBody::new(ReceiverStream::new(rx)));
    res.headers_mut()
        .insert("content-type", http::HeaderValue::from_static(content_type));
    (Feed(tx), res)
}

pub(crate) fn sse() -> (Feed, Response<TestBody>) {
    streaming("text/event-stream")
}

/// Runs `res` through a service wrapped in `layer`.
pub(crate) async fn through<B: Body + Send + 'static>(
    layer: &GuardLayer,
    req: Request<()>,
    res: Response<B>,
) -> Response<GuardedBody<B>> {
    layer.layer(once(res)).oneshot(req).await.unwrap()
}

/// A service that answers its one call with `res` (clones share it).
pub(crate) fn once<B: Send + 'static>(
    res: Response<B>,
) -> impl tower::Service<
    Request<()>,
    Response = Response<B>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<B>, Infallible>>,
> + Clone {
    let slot = Arc::new(Mutex::new(Some(res)));
    tower::service_fn(move |_req: Request<()>| {
        let res = slot.lock().unwrap().take().expect("one call");
        std::future::ready(Ok::<_, Infallible>(res))
    })
}

/// Polls a spawned body once.
pub(crate) fn poll<B: Body>(body: &mut Spawn<B>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
    body.enter(|cx, b| b.poll_frame(cx))
}

/// The data of a ready data frame, as text.
pub(crate) fn text<E: fmt::Debug>(p: Poll<Option<Result<Frame<Bytes>, E>>>) -> String {
    match p {
        Poll::Ready(Some(Ok(f))) => {
            String::from_utf8(f.into_data().expect("a data frame").to_vec()).unwrap()
        }
        other => panic!("expected a data frame, got {other:?}"),
    }
}
