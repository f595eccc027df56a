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
//! `frames_raw` / `frames_stack` (a static SSE body), `axum_raw` / `axum_stack` (axum's `Sse`);
//! `router_bare` / `router_noop` / `router_stack` (`loadtest throughput`'s axum app, in
//! process: `Router` with the hello-world route, bare, under an identity `MapResponseLayer`, or
//! under `Router::layer(DrainStack)`); `open_hand` / `drain_hand` / `open_stack` /
//! `drain_stack` (`count` SSE streams opened, then dropped or drained: the difference between
//! `drain_*` and `open_*`, divided by `count`, is one stream's share of a drain, for the
//! loadtest's hand-written hyper-floor body and for `DrainStack`'s).

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body::Body;
use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_drain::reject::RejectLayer;
use tower_drain::{DrainController, DrainStack};
use tower_http::timeout::TimeoutLayer;

#[path = "../benches/support/workloads.rs"]
mod workloads;

use workloads::{axum_events, drain_body, hello, one, sse, Events, EVENTS};

/// An SSE body: one event, then quiet (pending) for ever.
struct Quiet(Option<bytes::Bytes>);

impl Body for Quiet {
    type Data = bytes::Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Infallible>>> {
        match self.0.take() {
            Some(b) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(b)))),
            None => std::task::Poll::Pending,
        }
    }
}

pin_project_lite::pin_project! {
    /// A draining SSE body written by hand (the loadtest's hyper floor): the first event,
    /// then on the token the shutdown frame and the end.
    struct HandDrained {
        first: Option<bytes::Bytes>,
        last: Option<bytes::Bytes>,
        #[pin]
        signal: tokio_util::sync::WaitForCancellationFutureOwned,
    }
}

impl HandDrained {
    fn new(token: &tokio_util::sync::CancellationToken, last: bytes::Bytes) -> Self {
        Self {
            first: Some(workloads::EVENT),
            last: Some(last),
            signal: token.clone().cancelled_owned(),
        }
    }
}

impl Body for HandDrained {
    type Data = bytes::Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Infallible>>> {
        let this = self.project();
        if let Some(b) = this.first.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(b))));
        }
        if this.last.is_none() {
            return std::task::Poll::Ready(None);
        }
        std::task::ready!(std::future::Future::poll(this.signal, cx));
        std::task::Poll::Ready(this.last.take().map(|b| Ok(http_body::Frame::data(b))))
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
            "router_bare" | "router_noop" | "router_stack" => {
                // What `loadtest throughput` serves, without the sockets: axum's `Router`
                // with the hello-world route, bare or under `Router::layer(DrainStack)`.
                let app = axum::Router::new()
                    .route("/", axum::routing::get(|| async { "Hello, World!" }));
                let app = match workload.as_str() {
                    "router_stack" => app.layer(DrainStack::new(drain.watch())),
                    // What any layer costs under `Router::layer`: an identity `MapResponse`.
                    "router_noop" => app.layer(tower::util::MapResponseLayer::new(
                        |r: Response<axum::body::Body>| r,
                    )),
                    _ => app,
                };
                // What `axum::serve` does once per connection: handlers become routes (with
                // the layer applied) here, not on every request.
                let app = app.with_state::<()>(());
                for _ in 0..n {
                    let req = Request::builder()
                        .uri("/")
                        .body(axum::body::Body::empty())
                        .unwrap();
                    let res = app.clone().oneshot(req).await.unwrap();
                    assert_eq!(res.status(), StatusCode::OK);
                    black_box(drain_body(res.into_body()));
                }
            }
            "open_hand" | "drain_hand" | "open_stack" | "drain_stack" => {
                // `n` SSE streams opened (first event, then quiet), then either dropped or
                // drained: each one's final frame and end. The difference between `drain_*`
                // and `open_*`, divided by `n`, is one stream's share of a drain.
                let token = tokio_util::sync::CancellationToken::new();
                let frame = bytes::Bytes::from_static(b"event: shutdown\ndata: {}\n\n");
                let mut hand = Vec::new();
                let mut stacked = Vec::new();
                let stack = DrainStack::new(drain.watch()).layer(tower::service_fn(
                    |_: Request<()>| async {
                        Ok::<_, Infallible>(sse(Quiet(Some(workloads::EVENT))))
                    },
                ));
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                for _ in 0..n {
                    if workload.ends_with("hand") {
                        let mut b = Box::pin(HandDrained::new(&token, frame.clone()));
                        assert!(b.as_mut().poll_frame(&mut cx).is_ready());
                        assert!(b.as_mut().poll_frame(&mut cx).is_pending());
                        hand.push(b);
                    } else {
                        let res = stack.clone().oneshot(Request::new(())).await.unwrap();
                        let mut b = Box::pin(res.into_body());
                        assert!(b.as_mut().poll_frame(&mut cx).is_ready());
                        assert!(b.as_mut().poll_frame(&mut cx).is_pending());
                        stacked.push(b);
                    }
                }
                if workload.starts_with("drain") {
                    token.cancel();
                    drain.drain(tower_drain::DrainReason::Manual);
                    drain.closing().await;
                    for b in &mut hand {
                        assert!(black_box(drain_body(b.as_mut())) == 1);
                    }
                    for b in &mut stacked {
                        assert!(black_box(drain_body(b.as_mut())) == 1);
                    }
                }
                drop(hand);
                drop(stacked);
            }
            other => panic!("unknown workload {other:?}; see the file's docs"),
        }
        assert_eq!(drain.active_streams(), 0);
    });
}
