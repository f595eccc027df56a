//! The fused [`DrainBody`](super::DrainBody) against the four layers' own nested bodies: the
//! same scripted inner bodies, the same drains and clocks, frame by frame.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use tower::{Service, ServiceExt};
use tower_layer::Layer;

use super::DrainStack;
use crate::frame::{Grpc, NdJson};
use crate::{DrainController, DrainReason};

/// One thing a scripted inner body does when polled.
#[derive(Clone, Copy, Debug)]
pub(super) enum Out {
    Data(&'static str),
    Trailers,
    Fail,
    Pending,
    End,
}

/// Hands out its script one poll at a time; pending (quiet) once the script is over.
pub(super) struct Script(pub(super) VecDeque<Out>);

impl Body for Script {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.0.pop_front() {
            Some(Out::Data(s)) => {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(s.as_bytes())))))
            }
            Some(Out::Trailers) => {
                let mut t = HeaderMap::new();
                t.insert("grpc-status", HeaderValue::from_static("0"));
                Poll::Ready(Some(Ok(Frame::trailers(t))))
            }
            Some(Out::Fail) => Poll::Ready(Some(Err(std::io::Error::other("upstream failed")))),
            Some(Out::End) => Poll::Ready(None),
            Some(Out::Pending) | None => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.0.front(), Some(Out::End))
    }
}

/// What the test does between polls of the response body.
#[derive(Clone, Copy, Debug)]
enum Act {
    Poll,
    /// Starts a drain and waits until `Closing`.
    Drain,
    /// Lets (paused) time pass.
    Sleep(u64),
}

use Act::{Drain, Poll as P, Sleep};

/// A scenario: the response's content type, the stack's settings, the inner body's script.
struct Case {
    name: &'static str,
    content_type: &'static str,
    stack: fn(DrainStack) -> DrainStack,
    script: &'static [Out],
    acts: &'static [Act],
}

fn controller() -> DrainController {
    DrainController::builder()
        .grace_period(Duration::from_secs(10))
        .propagation_delay(Duration::from_secs(1))
        .build()
        .unwrap()
}

/// A frame's text with the timestamp (wall-clock time) and the retry delay (jittered by a
/// random seed per layer) blanked out.
fn text(b: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(b).into_owned();
    let fields = [
        ("\"timestamp\":\"", '"'),
        ("retry: ", '\n'),
        ("\"retry_ms\":", '}'),
    ];
    for (field, stop) in fields {
        if let Some(i) = s.find(field) {
            let start = i + field.len();
            let end = start + s[start..].find(stop).unwrap();
            s = format!("{}N{}", &s[..start], &s[end..]);
        }
    }
    s
}

/// Runs `acts` against one response of `svc`, describing every poll and the body's and the
/// controller's state after it.
async fn trace<S, B>(mut svc: S, drain: &DrainController, case: &Case) -> Vec<String>
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible>,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    let mut out = vec![format!("status {}", res.status())];
    let mut body = Box::pin(res.into_body());
    let mut cx = Context::from_waker(Waker::noop());
    for act in case.acts {
        match act {
            P => {
                let got = match body.as_mut().poll_frame(&mut cx) {
                    Poll::Pending => "pending".to_owned(),
                    Poll::Ready(None) => "end".to_owned(),
                    Poll::Ready(Some(Err(e))) => format!("error {e}"),
                    Poll::Ready(Some(Ok(f))) => match f.into_data() {
                        Ok(d) => format!("data {}", text(&d)),
                        Err(f) => format!("trailers {:?}", f.into_trailers().unwrap()),
                    },
                };
                let hint = body.size_hint();
                out.push(format!(
                    "{got} | end {} hint {}..{:?} | active {}",
                    body.is_end_stream(),
                    hint.lower(),
                    hint.upper(),
                    drain.active_streams()
                ));
            }
            Drain => {
                drain.drain(DrainReason::Manual);
                drain.closing().await;
                out.push(format!("closing | active {}", drain.active_streams()));
            }
            Sleep(ms) => tokio::time::sleep(Duration::from_millis(*ms)).await,
        }
    }
    drop(body);
    out.push(format!("dropped | active {}", drain.active_streams()));
    out.push(format!("notified {}", drain.notified_so_far()));
    out
}

/// The same case through `DrainStack` (fused) and through its four layers stacked by hand.
async fn both(case: &Case) -> (Vec<String>, Vec<String>) {
    let inner = move |_req: Request<()>| {
        let script = Script(case.script.iter().copied().collect());
        let content_type = case.content_type;
        async move {
            let mut res = Response::new(script);
            res.headers_mut()
                .insert("content-type", HeaderValue::from_static(content_type));
            Ok::<_, Infallible>(res)
        }
    };
    let fused_drain = controller();
    let fused = (case.stack)(DrainStack::new(fused_drain.watch())).layer(tower::service_fn(inner));
    let fused = trace(fused, &fused_drain, case).await;

    let nested_drain = controller();
    let nested =
        (case.stack)(DrainStack::new(nested_drain.watch())).nested(tower::service_fn(inner));
    let nested = trace(nested, &nested_drain, case).await;
    (fused, nested)
}

const SSE: &str = "text/event-stream";

fn plain(s: DrainStack) -> DrainStack {
    s
}

fn with_limits(s: DrainStack) -> DrainStack {
    s.guard(|g| {
        g.max_lifetime(Duration::from_secs(3))
            .heartbeat(Duration::from_secs(1))
    })
    .unwrap()
}

use Out::{Data, End, Fail, Pending, Trailers};

const CASES: &[Case] = &[
    Case {
        name: "sse events, then the end",
        content_type: SSE,
        stack: plain,
        script: &[Data("data: 1\n\n"), Data("data: 2\n\n"), End],
        acts: &[P, P, P, P],
    },
    Case {
        name: "sse events, then trailers",
        content_type: SSE,
        stack: plain,
        script: &[Data("data: 1\n\n"), Trailers, End],
        acts: &[P, P, P, P],
    },
    Case {
        name: "sse error at a boundary: the error frame",
        content_type: SSE,
        stack: plain,
        script: &[Data("data: 1\n\n"), Fail],
        acts: &[P, P, P, P],
    },
    Case {
        name: "sse error mid-event: the response is aborted",
        content_type: SSE,
        stack: plain,
        script: &[Data("data: 1\n\n"), Data("data: par"), Fail],
        acts: &[P, P, P, P],
    },
    Case {
        name: "sse drained while busy, at a boundary",
        content_type: SSE,
        stack: plain,
        script: &[
            Data("data: 1\n\n"),
            Data("data: 2\n\n"),
            Data("data: 3\n\n"),
        ],
        acts: &[P, Drain, P, P, P],
    },
    Case {
        name: "sse drained mid-event: the frame waits for the event's end",
        content_type: SSE,
        stack: plain,
        script: &[
            Data("data: 1\n\n"),
            Data("data: pa"),
            Data("rt\n\n"),
            Data("data: 3\n\n"),
        ],
        acts: &[P, P, Drain, P, P, P],
    },
    Case {
        name: "sse drained mid-event, then failing: the response is aborted",
        content_type: SSE,
        stack: plain,
        script: &[Data("data: 1\n\n"), Data("data: pa"), Fail],
        acts: &[P, P, Drain, P, P],
    },
    Case {
        name: "sse drained while pending",
        content_type: SSE,
        stack: plain,
        script: &[Data("data: 1\n\n"), Pending, Pending],
        acts: &[P, P, Drain, P, P, P],
    },
    Case {
        name: "sse stuck mid-event past the grace period: aborted",
        content_type: SSE,
        stack: plain,
        script: &[Data("data: 1\n\n"), Data("data: stuck"), Pending],
        acts: &[P, P, Drain, P, Sleep(11_000), P, P],
    },
    Case {
        name: "sse with guard limits: heartbeats, then the lifetime frame",
        content_type: SSE,
        stack: with_limits,
        script: &[Data("data: 1\n\n"), Pending],
        acts: &[P, P, Sleep(1_100), P, P, Sleep(2_000), P, P, P],
    },
    Case {
        name: "sse with guard limits, drained",
        content_type: SSE,
        stack: with_limits,
        script: &[Data("data: 1\n\n"), Pending],
        acts: &[P, P, Drain, P, P],
    },
    Case {
        name: "sse with guard limits, drained, then a heartbeat's interval: no heartbeat",
        content_type: SSE,
        stack: with_limits,
        script: &[Data("data: 1\n\n"), Pending],
        // The drain's propagation delay makes a heartbeat due first.
        acts: &[P, P, Drain, P, P, Sleep(1_100), P, P],
    },
    Case {
        name: "ndjson drained",
        content_type: "application/x-ndjson",
        stack: |s| s.encoder(NdJson::new()),
        script: &[Data("{\"a\":1}\n"), Data("{\"a\":"), Data("2}\n")],
        acts: &[P, P, Drain, P, P, P],
    },
    Case {
        name: "grpc drained: trailers only",
        content_type: "application/grpc",
        stack: |s| s.encoder(Grpc::new()),
        script: &[Data("\0\0\0\0\x02hi"), Pending],
        acts: &[P, Drain, P, P, P],
    },
    Case {
        name: "grpc error: trailers only",
        content_type: "application/grpc",
        stack: |s| s.encoder(Grpc::new()),
        script: &[Data("\0\0\0\0\x02hi"), Fail],
        acts: &[P, P, P],
    },
    Case {
        name: "plain response, whole",
        content_type: "text/plain",
        stack: plain,
        script: &[Data("hello"), End],
        acts: &[P, P],
    },
    Case {
        name: "plain response, failing",
        content_type: "text/plain",
        stack: plain,
        script: &[Data("hel"), Fail],
        acts: &[P, P, P],
    },
    Case {
        name: "plain response during a drain",
        content_type: "text/plain",
        stack: plain,
        script: &[Data("hello"), End],
        acts: &[Drain, P, P],
    },
];

#[tokio::test(start_paused = true)]
async fn the_fused_body_does_what_the_nested_bodies_do() {
    for case in CASES {
        let (fused, nested) = both(case).await;
        assert_eq!(fused, nested, "{}", case.name);
    }
}

#[tokio::test(start_paused = true)]
async fn the_fused_body_keeps_each_layers_behaviour() {
    // A few of the cases above, checked against what a user relies on (so that both bodies
    // cannot be wrong the same way).
    let find = |name: &str| CASES.iter().find(|c| c.name == name).unwrap();

    let (t, _) = both(find("sse drained while busy, at a boundary")).await;
    assert!(t[3].starts_with("data event: shutdown\n"), "{t:#?}");
    assert!(
        t[4].starts_with("end | end true hint 0..Some(0) | active 0"),
        "{t:#?}"
    );

    let (t, _) = both(find(
        "sse drained mid-event: the frame waits for the event's end",
    ))
    .await;
    assert!(t[4].starts_with("data rt\n\n"), "{t:#?}");
    assert!(t[5].starts_with("data event: shutdown\n"), "{t:#?}");

    // A clean end always means whole records: mid-record, the error goes on.
    let (t, _) = both(find("sse error mid-event: the response is aborted")).await;
    assert!(t[3].starts_with("error upstream failed"), "{t:#?}");
    assert!(t[3].ends_with("active 0"), "{t:#?}");

    let (t, _) = both(find("sse events, then trailers")).await;
    assert!(t[2].starts_with("trailers"), "{t:#?}");
    assert!(t[2].ends_with("active 1"), "{t:#?}");
    assert!(t[3].starts_with("end | end true"), "{t:#?}");
    assert!(t[3].ends_with("active 0"), "{t:#?}");

    let (t, _) = both(find("sse stuck mid-event past the grace period: aborted")).await;
    assert!(
        t[5].starts_with("error stream ended in the middle of a record"),
        "{t:#?}"
    );
    assert!(t[6].starts_with("end | end true"), "{t:#?}");
    assert_eq!(t.last().unwrap(), "notified 0", "{t:#?}");

    let (t, _) = both(find(
        "sse with guard limits: heartbeats, then the lifetime frame",
    ))
    .await;
    assert!(t[3].starts_with("data :\n\n"), "{t:#?}");
    assert!(
        t.iter().any(|l| l.starts_with("data event: error\n")),
        "{t:#?}"
    );

    // The frame layer's final frame is the stream's last: the guard, which shares its flag,
    // adds no heartbeat after it.
    let (t, _) = both(find(
        "sse with guard limits, drained, then a heartbeat's interval: no heartbeat",
    ))
    .await;
    assert!(t[4].starts_with("data :\n\n"), "{t:#?}");
    assert!(t[5].starts_with("data event: shutdown\n"), "{t:#?}");
    assert!(t[6].starts_with("end | end true"), "{t:#?}");
    assert_eq!(t.last().unwrap(), "notified 1", "{t:#?}");

    let (t, _) = both(find("grpc drained: trailers only")).await;
    assert!(
        t[3].starts_with("trailers {\"grpc-status\": \"14\""),
        "{t:#?}"
    );

    let (t, _) = both(find("plain response, whole")).await;
    // Released as soon as the inner body says it is at its end.
    assert_eq!(
        t[1], "data hello | end true hint 0..None | active 0",
        "{t:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_fused_body_serves_the_sse_retry_frame() {
    let drain = controller();
    let svc = DrainStack::new(drain.watch())
        .reject(|r| r.sse_retry())
        .layer(tower::service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Script(VecDeque::new())))
        }));
    drain.drain(DrainReason::Manual);
    drain.closing().await;
    let req = Request::builder()
        .header("accept", "text/event-stream")
        .body(())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = Box::pin(res.into_body());
    assert!(!body.is_end_stream());
    let len = body.size_hint().exact().unwrap();
    let mut cx = Context::from_waker(Waker::noop());
    let Poll::Ready(Some(Ok(f))) = body.as_mut().poll_frame(&mut cx) else {
        panic!("the shutdown frame");
    };
    let f = f.into_data().unwrap();
    assert_eq!(f.len() as u64, len);
    assert!(f.starts_with(b"event: shutdown\n"), "{f:?}");
    assert!(body.is_end_stream());
    assert!(matches!(
        body.as_mut().poll_frame(&mut cx),
        Poll::Ready(None)
    ));
}

/// A stream answered through the nested layers (a keyed request) drains as a fused one does,
/// and neither leaves the frame layer's final-frame flag in the response for an outer guard.
#[tokio::test(start_paused = true)]
async fn keyed_and_fused_streams_drain_alike_and_share_no_flag() {
    let drain = controller();
    let svc = DrainStack::new(drain.watch())
        .track(|t| {
            t.max_per_key(1)
                .key_header(http::HeaderName::from_static("x-user"))
        })
        .layer(tower::service_fn(|_req: Request<()>| async {
            let mut res = Response::new(Script(VecDeque::from([Out::Data("data: 1\n\n")])));
            res.headers_mut()
                .insert("content-type", HeaderValue::from_static(SSE));
            Ok::<_, Infallible>(res)
        }));
    let keyed = Request::builder().header("x-user", "ann").body(()).unwrap();
    let mut bodies = Vec::new();
    for req in [keyed, Request::new(())] {
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.extensions().get::<crate::frame::FinalGate>().is_none());
        bodies.push(Box::pin(res.into_body()));
    }
    let mut cx = Context::from_waker(Waker::noop());
    let mut poll = |b: &mut Pin<Box<super::DrainBody<Script>>>| match b.as_mut().poll_frame(&mut cx)
    {
        Poll::Ready(Some(Ok(f))) => text(&f.into_data().unwrap()),
        Poll::Ready(None) => "end".to_owned(),
        other => format!("{:?}", other.map(|o| o.map(|r| r.is_ok()))),
    };
    for b in &mut bodies {
        assert_eq!(poll(b), "data: 1\n\n");
        assert_eq!(poll(b), "Pending");
    }
    drain.drain(DrainReason::Manual);
    drain.closing().await;
    for b in &mut bodies {
        assert!(poll(b).starts_with("event: shutdown\n"));
        assert_eq!(poll(b), "end");
        assert!(b.is_end_stream());
    }
    assert_eq!(drain.active_streams(), 0);
    assert_eq!(drain.notified_so_far(), 2);
}

#[test]
fn auto_traits() {
    fn assert<T: Send + Sync>() {}
    assert::<super::DrainBody<http_body_util::Full<Bytes>>>();
    fn unpin<T: Unpin>() {}
    unpin::<super::DrainBody<http_body_util::Full<Bytes>>>();
}
