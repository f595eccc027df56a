//! A fixed workload per layer for `valgrind --tool=callgrind`, which counts instructions
//! instead of timing them: the counts repeat exactly from run to run, whatever else the
//! machine is doing, so they show small differences (tens of instructions per request or per
//! frame) that wall-clock benches on a shared machine cannot.
//!
//! ```text
//! cargo build --release --example instructions
//! for v in bare reject climit peers stack; do
//!   valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$v \
//!     target/release/examples/instructions $v 20000 2>&1 | grep refs
//! done
//! ```
//!
//! Divide the total by the count given (requests) or by `count * 10` (frames: the `frames_*`
//! and `axum_*` workloads stream `count / 1000` bodies of 10,000 events). The requests are the
//! ones of `benches/layers.rs` (`ready().call()` on a clone, body polled to its end); the
//! bodies the ones of `benches/frames.rs`. Setup (runtime, controller) is counted too but is
//! the same in every workload.
//!
//! Timed runs of the same workloads side by side, alternating (noisy, but without criterion's
//! harness in between):
//!
//! ```text
//! for i in 1 2 3 4 5; do for v in bare reject bare_ref reject_ref; do
//!   /usr/bin/time -f "$v %e s" target/release/examples/instructions $v 3000000; done; done
//! ```
//!
//! Workloads: `bare`, `reject`, `climit` (tower `ConcurrencyLimitLayer`), `peers`
//! (tower-http `TimeoutLayer` + `ConcurrencyLimitLayer`), `stack` (`DrainStack`);
//! `bare_ref` / `reject_ref` (the same requests through `&mut` of one service, no clone);
//! `frames_raw` / `frames_stack` (a static SSE body), `axum_raw` / `axum_stack` (axum's `Sse`).

use std::convert::Infallible;
use std::hint::black_box;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_drain::reject::RejectLayer;
use tower_drain::{DrainController, DrainStack};
use tower_http::timeout::TimeoutLayer;

const EVENTS: u32 = 10_000;
const EVENT: Bytes = Bytes::from_static(b"data: tick\n\n");

fn request() -> Request<()> {
    Request::builder()
        .uri("/hello")
        .header("x-client-id", "client-1")
        .body(())
        .unwrap()
}

async fn hello(_req: Request<()>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"hello"))))
}

/// One request through `svc`: ready, call, body polled to its end.
async fn one<S, B>(mut svc: S)
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.ready().await.unwrap().call(request()).await.unwrap();
    let mut body = std::pin::pin!(res.into_body());
    while let Some(f) = body.frame().await {
        black_box(f.unwrap());
    }
}

/// `n` requests, each through a fresh clone of `svc` (as axum and tower do).
async fn requests<S, B>(svc: S, n: usize)
where
    S: Service<Request<()>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    for _ in 0..n {
        one(svc.clone()).await;
    }
}

/// `EVENTS` copies of one small SSE event, then the end.
struct Events(u32);

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

fn sse<B>(body: B) -> Response<B> {
    let mut res = Response::new(body);
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    res
}

fn axum_events() -> Response<axum::body::Body> {
    use axum::response::sse::{Event, Sse};
    use axum::response::IntoResponse;
    let events = futures_util::stream::iter(
        (0..EVENTS).map(|_| Ok::<_, Infallible>(Event::default().data("tick"))),
    );
    Sse::new(events).into_response()
}

/// Polls `body` to its end with a no-op waker; returns the frames seen.
#[inline(never)]
fn drain_body<B: Body>(body: B) -> u32
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

/// `bodies` responses of `svc`, each body polled to its end.
async fn bodies<S, B>(svc: S, bodies: usize) -> u32
where
    S: Service<Request<()>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    let mut frames = 0;
    for _ in 0..bodies {
        let res = svc.clone().oneshot(Request::new(())).await.unwrap();
        frames += drain_body(res.into_body());
    }
    frames
}

fn main() {
    let mut args = std::env::args().skip(1);
    let workload = args.next().unwrap_or_else(|| "stack".into());
    let n: usize = args.next().map_or(100_000, |s| s.parse().expect("a count"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let drain = DrainController::new();
        let bare = tower::service_fn(hello);
        let streams = n / 1000;
        match workload.as_str() {
            "bare" => requests(bare, n).await,
            "reject" => requests(RejectLayer::new(drain.watch()).layer(bare), n).await,
            "climit" => requests(ConcurrencyLimitLayer::new(1024).layer(bare), n).await,
            "peers" => {
                let svc = ServiceBuilder::new()
                    .layer(TimeoutLayer::with_status_code(
                        StatusCode::REQUEST_TIMEOUT,
                        Duration::from_secs(30),
                    ))
                    .layer(ConcurrencyLimitLayer::new(1024))
                    .service(bare);
                requests(svc, n).await
            }
            "stack" => requests(DrainStack::new(drain.watch()).layer(bare), n).await,
            // The same requests through `&mut` of one service: no clone per request.
            "bare_ref" => {
                let mut svc = bare;
                for _ in 0..n {
                    one(&mut svc).await;
                }
            }
            "reject_ref" => {
                let mut svc = RejectLayer::new(drain.watch()).layer(bare);
                for _ in 0..n {
                    one(&mut svc).await;
                }
            }
            "frames_raw" => {
                let svc = tower::service_fn(|_: Request<()>| async {
                    Ok::<_, Infallible>(sse(Events(EVENTS)))
                });
                black_box(bodies(svc, streams).await);
            }
            "frames_stack" => {
                let svc = DrainStack::new(drain.watch()).layer(tower::service_fn(
                    |_: Request<()>| async { Ok::<_, Infallible>(sse(Events(EVENTS))) },
                ));
                black_box(bodies(svc, streams).await);
            }
            "axum_raw" => {
                let svc = tower::service_fn(|_: Request<()>| async {
                    Ok::<_, Infallible>(axum_events())
                });
                black_box(bodies(svc, streams).await);
            }
            "axum_stack" => {
                let svc = DrainStack::new(drain.watch()).layer(tower::service_fn(
                    |_: Request<()>| async { Ok::<_, Infallible>(axum_events()) },
                ));
                black_box(bodies(svc, streams).await);
            }
            other => panic!("unknown workload {other:?}; see the file's docs"),
        }
        assert_eq!(drain.active_streams(), 0);
    });
}
