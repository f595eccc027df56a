//! The requests and bodies the benches measure, shared with `examples/instructions.rs` (which
//! counts the instructions of the same workloads), so both always measure the same thing.
//!
//! Included with `#[path]`; each includer uses a part of it.
#![allow(dead_code)]

use std::convert::Infallible;
use std::hint::black_box;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};

/// Events per streamed body.
pub(crate) const EVENTS: u32 = 10_000;
/// One small SSE event.
pub(crate) const EVENT: Bytes = Bytes::from_static(b"data: tick\n\n");

/// A request as every variant gets it. It carries an `x-client-id` header, so only the keyed
/// variant uses it but all pay the same request cost.
pub(crate) fn request() -> Request<()> {
    Request::builder()
        .uri("/hello")
        .header("x-client-id", "client-1")
        .body(())
        .unwrap()
}

/// The trivial inner service: a small `Full` body.
pub(crate) async fn hello(_req: Request<()>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"hello"))))
}

/// One request through `svc`: ready, call, body polled to its end (the layers' wrappers live
/// in the body).
pub(crate) async fn one<S, B>(mut svc: S)
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.ready().await.unwrap().call(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = std::pin::pin!(res.into_body());
    while let Some(f) = body.frame().await {
        black_box(f.unwrap());
    }
}

/// `EVENTS` copies of one small SSE event, then the end: the cheapest possible SSE body.
pub(crate) struct Events(pub u32);

impl Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.0 == 0 {
            return Poll::Ready(None);
        }
        self.0 -= 1;
        Poll::Ready(Some(Ok(Frame::data(EVENT))))
    }

    fn is_end_stream(&self) -> bool {
        self.0 == 0
    }
}

/// `body` as a `text/event-stream` response.
pub(crate) fn sse<B>(body: B) -> Response<B> {
    let mut res = Response::new(body);
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    res
}

/// axum's `Sse` over `EVENTS` events: what an application actually serves.
pub(crate) fn axum_events() -> Response<axum::body::Body> {
    use axum::response::sse::{Event, Sse};
    use axum::response::IntoResponse;
    let events = futures_util::stream::iter(
        (0..EVENTS).map(|_| Ok::<_, Infallible>(Event::default().data("tick"))),
    );
    Sse::new(events).into_response()
}

/// A service answering every request with `EVENTS` static events (`Events`) as an SSE response.
pub(crate) fn static_events_service(
) -> impl Service<Request<()>, Response = Response<Events>, Error = Infallible> + Clone {
    tower::service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(sse(Events(EVENTS))) })
}

/// A service answering every request with axum's `Sse` over `EVENTS` events.
pub(crate) fn axum_events_service(
) -> impl Service<Request<()>, Response = Response<axum::body::Body>, Error = Infallible> + Clone {
    tower::service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(axum_events()) })
}

/// Time spent polling `bodies` bodies made by `make` (untimed) to their end.
pub(crate) fn time_bodies<B: Body>(bodies: u64, mut make: impl FnMut() -> B) -> std::time::Duration
where
    B::Error: std::fmt::Debug,
{
    let mut total = std::time::Duration::ZERO;
    for _ in 0..bodies {
        let body = make();
        let start = std::time::Instant::now();
        let n = drain_body(body);
        total += start.elapsed();
        assert!(n >= EVENTS);
    }
    total
}

/// Polls `body` to its end with a no-op waker; returns the frames seen.
#[inline(never)]
pub(crate) fn drain_body<B: Body>(body: B) -> u32
where
    B::Error: std::fmt::Debug,
{
    let mut body = std::pin::pin!(body);
    let mut cx = Context::from_waker(Waker::noop());
    let mut n = 0;
    loop {
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(f)) => {
                black_box(f.unwrap());
                n += 1;
            }
            Poll::Ready(None) => return n,
            Poll::Pending => panic!("the workload bodies are always ready"),
        }
    }
}
