//! The fused call of [`DrainService`](super::DrainService) against the four layers' own nested
//! futures: the same requests, settings, drains and clocks, response by response (status,
//! headers, registrations, the breaker's state, the inner futures still alive).

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use tower::{Service, ServiceExt};
use tower_layer::Layer;

use super::fused_tests::{Out, Script};
use super::DrainStack;
use crate::frame::FrameBody;
use crate::guard::{Breaker, GuardedBody};
use crate::reject::Mode;
use crate::track::{MemoryStore, TrackedBody};
use crate::{DrainController, DrainReason, DrainWatch};

/// Counts the inner futures alive (created and not yet dropped).
struct Alive(Arc<AtomicUsize>);

impl Alive {
    fn new(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Self(n.clone())
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the test does next.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// A request: method, path, what the inner service answers (`x-answer`: a status, `err`,
    /// `wait` for a response that never comes, `sse` for an event stream), and the user key.
    Call(
        &'static str,
        &'static str,
        &'static str,
        Option<&'static str>,
    ),
    /// Polls every held body once.
    Pump,
    /// Drops every held body.
    DropAll,
    /// Starts a drain and waits until `Closing`.
    Drain,
    /// Lets (paused) time pass.
    Sleep(u64),
}

use Step::{Call, Drain, DropAll, Pump, Sleep};

/// The inner service: answers what the request's `x-answer` header says.
fn inner(
    alive: Arc<AtomicUsize>,
) -> impl Service<Request<()>, Response = Response<Script>, Error = std::io::Error, Future: Send> + Clone
{
    tower::service_fn(move |req: Request<()>| {
        let answer = req.headers()["x-answer"].to_str().unwrap().to_owned();
        let alive = Alive::new(&alive);
        async move {
            let _alive = alive;
            match answer.as_str() {
                "err" => Err(std::io::Error::other("inner failed")),
                "wait" => std::future::pending().await,
                "sse" => {
                    let mut res = Response::new(Script([Out::Data("data: 1\n\n")].into()));
                    res.headers_mut().insert(
                        "content-type",
                        HeaderValue::from_static("text/event-stream"),
                    );
                    Ok(res)
                }
                code => {
                    let mut res = Response::new(Script(Default::default()));
                    *res.status_mut() = code.parse().unwrap();
                    Ok(res)
                }
            }
        }
    })
}

/// Runs `steps` against `svc`, describing each step's outcome and the state after it.
async fn trace<S, B>(
    mut svc: S,
    drain: &DrainController,
    breaker: Option<Breaker>,
    alive: &AtomicUsize,
    steps: &[Step],
) -> Vec<String>
where
    S: Service<Request<()>, Response = Response<B>, Error = std::io::Error>,
    B: Body<Data = Bytes>,
{
    let mut held: Vec<Pin<Box<B>>> = Vec::new();
    let mut out = Vec::new();
    for step in steps {
        let what = match *step {
            Call(method, path, answer, key) => {
                let mut req = Request::builder()
                    .method(method)
                    .uri(path)
                    .header("x-answer", answer);
                if let Some(key) = key {
                    req = req.header("x-user", key);
                }
                let req = req.body(()).unwrap();
                let res = svc.ready().await.unwrap().call(req).await;
                match res {
                    Err(e) => format!("{method} {path} {answer}: error {e}"),
                    Ok(res) => {
                        let h = res.headers();
                        let got = format!(
                            "{method} {path} {answer}: {} retry-after {:?} content-type {:?}",
                            res.status(),
                            h.get("retry-after"),
                            h.get("content-type"),
                        );
                        held.push(Box::pin(res.into_body()));
                        got
                    }
                }
            }
            Pump => {
                let mut cx = Context::from_waker(Waker::noop());
                let polled: Vec<String> = held
                    .iter_mut()
                    .map(|b| match b.as_mut().poll_frame(&mut cx) {
                        Poll::Pending => "pending".to_owned(),
                        Poll::Ready(None) => "end".to_owned(),
                        Poll::Ready(Some(Err(_))) => "error".to_owned(),
                        Poll::Ready(Some(Ok(f))) => match f.into_data() {
                            // The first line of a frame: the event's name or data.
                            Ok(d) => String::from_utf8_lossy(&d)
                                .lines()
                                .next()
                                .unwrap_or("")
                                .to_owned(),
                            Err(_) => "trailers".to_owned(),
                        },
                    })
                    .collect();
                format!("pump {polled:?}")
            }
            DropAll => {
                held.clear();
                "dropped".to_owned()
            }
            Drain => {
                drain.drain(DrainReason::Manual);
                drain.closing().await;
                "closing".to_owned()
            }
            Sleep(secs) => {
                tokio::time::sleep(Duration::from_secs(secs)).await;
                format!("slept {secs} s")
            }
        };
        out.push(format!(
            "{what} | active {} | inner futures {} | breaker {:?}",
            drain.active_streams(),
            alive.load(Ordering::SeqCst),
            breaker
                .as_ref()
                .map(|b| (b.state(), b.consecutive_failures())),
        ));
    }
    out.push(format!("notified {}", drain.notified_so_far()));
    out
}

/// `steps` through `DrainStack` (fused where it can) and through its four layers stacked by
/// hand, each with a controller of its own.
async fn both<M: Mode>(
    stack: impl Fn(DrainWatch) -> DrainStack<MemoryStore, M>,
    steps: &[Step],
) -> (Vec<String>, Vec<String>)
where
    M::Body<TrackedBody<GuardedBody<FrameBody<Script>>>>: Body<Data = Bytes>,
{
    let controller = || {
        DrainController::builder()
            .grace_period(Duration::from_secs(10))
            .propagation_delay(Duration::from_secs(1))
            .reconnect_jitter(0.0)
            .build()
            .unwrap()
    };
    let stack = &stack;
    let run = |nested: bool| async move {
        let drain = controller();
        let alive = Arc::new(AtomicUsize::new(0));
        let s = stack(drain.watch());
        let breaker = s.breaker();
        let svc = inner(alive.clone());
        if nested {
            trace(s.nested(svc), &drain, breaker, &alive, steps).await
        } else {
            trace(s.layer(svc), &drain, breaker, &alive, steps).await
        }
    };
    (run(false).await, run(true).await)
}

fn guarded(w: DrainWatch) -> DrainStack {
    DrainStack::new(w)
        .guard(|g| {
            g.failure_threshold(2)
                .cooldown(Duration::from_secs(30))
                .response_timeout(Duration::from_secs(5))
        })
        .unwrap()
}

/// Every answer of the guard and the frame layer while serving, then the drain.
const SERVING: &[Step] = &[
    Call("GET", "/", "200", None),
    Call("GET", "/", "500", None),
    DropAll,
    Call("GET", "/", "200", None),
    Call("GET", "/", "err", None),
    Call("GET", "/", "500", None),
    // Open: turned away, still tracked until the body goes.
    Call("GET", "/", "200", None),
    DropAll,
    Sleep(31),
    // Half-open: this one is the probe.
    Call("GET", "/", "200", None),
    Call("GET", "/", "wait", None),
    Call("HEAD", "/events", "sse", None),
    Call("GET", "/events", "sse", None),
    Call("POST", "/events", "204", None),
    Pump,
    Drain,
    Pump,
    Pump,
    // While closing: the nested path (rejections, the exempt probe paths).
    Call("GET", "/", "200", None),
    Call("GET", "/healthz", "200", None),
    DropAll,
];

#[tokio::test(start_paused = true)]
async fn the_fused_call_does_what_the_nested_layers_do() {
    let (fused, nested) = both(guarded, SERVING).await;
    assert_eq!(fused, nested);

    // The defaults (breaker on, no response timeout), and no breaker at all.
    let defaults: &[Step] = &[
        Call("GET", "/", "503", None),
        Call("GET", "/", "err", None),
        Call("GET", "/events", "sse", None),
        Pump,
        Drain,
        Pump,
        DropAll,
    ];
    let (fused, nested) = both(DrainStack::new, defaults).await;
    assert_eq!(fused, nested);
    let (fused, nested) = both(
        |w| {
            DrainStack::new(w)
                .guard(|g| g.circuit_breaker(false))
                .unwrap()
        },
        defaults,
    )
    .await;
    assert_eq!(fused, nested);

    // Keyed requests take the nested path all along; the same as stacking by hand.
    let keyed: &[Step] = &[
        Call("GET", "/events", "sse", Some("ann")),
        Call("GET", "/events", "sse", Some("ann")),
        Call("GET", "/events", "sse", Some("bob")),
        Call("GET", "/events", "sse", None),
        Pump,
        Drain,
        Pump,
        DropAll,
    ];
    let (fused, nested) = both(
        |w| {
            DrainStack::new(w).track(|t| {
                t.max_per_key(1)
                    .key_header(http::HeaderName::from_static("x-user"))
            })
        },
        keyed,
    )
    .await;
    assert_eq!(fused, nested);

    // The `sse_retry` mode serves like the plain one.
    let (fused, nested) = both(|w| guarded(w).reject(|r| r.sse_retry()), SERVING).await;
    assert_eq!(fused, nested);
}

/// What the fused call's traces say, in the terms a user relies on.
#[tokio::test(start_paused = true)]
async fn the_fused_call_keeps_each_layers_behaviour() {
    let (t, _) = both(guarded, SERVING).await;
    let line = |i: usize| t[i].as_str();
    let status = |i: usize| {
        line(i)
            .split(": ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
    };
    assert_eq!(status(0), "200");
    assert!(line(1).contains("| active 2 |"), "{}", line(1));
    assert!(
        line(1).contains("(Closed, 1)"),
        "a 5xx is a failure: {}",
        line(1)
    );
    assert!(line(2).contains("| active 0 |"), "{}", line(2));
    assert!(
        line(3).contains("(Closed, 0)"),
        "a success resets: {}",
        line(3)
    );
    assert!(
        line(4).starts_with("GET / err: error inner failed"),
        "{}",
        line(4)
    );
    assert!(
        line(5).contains("(Open, 2)"),
        "the threshold opens: {}",
        line(5)
    );
    // Open: 503 with the cool-down, tracked like any response.
    assert_eq!(status(6), StatusCode::SERVICE_UNAVAILABLE.as_str());
    assert!(line(6).contains("retry-after Some(\"30\")"), "{}", line(6));
    assert!(line(6).contains("| active 3 |"), "{}", line(6));
    // The probe's success closes the circuit.
    assert_eq!(status(9), "200");
    assert!(line(9).contains("(Closed, 0)"), "{}", line(9));
    // The response timeout: 504, the inner future dropped, a failure.
    assert_eq!(status(10), StatusCode::GATEWAY_TIMEOUT.as_str());
    assert!(line(10).contains("| inner futures 0 |"), "{}", line(10));
    assert!(line(10).contains("(Closed, 1)"), "{}", line(10));
    // A drain: the GET stream gets the frame; HEAD, 204 and the plain ones do not.
    assert_eq!(
        line(14).split(" | ").next().unwrap(),
        r#"pump ["pending", "end", "data: 1", "data: 1", "pending"]"#
    );
    assert_eq!(
        line(16).split(" | ").next().unwrap(),
        r#"pump ["pending", "end", "pending", "event: shutdown", "pending"]"#
    );
    assert_eq!(
        line(17).split(" | ").next().unwrap(),
        r#"pump ["pending", "end", "pending", "end", "pending"]"#
    );
    // Closing: new requests get 503, the probe paths still pass.
    assert_eq!(status(18), "503");
    assert_eq!(status(19), "200");
    assert!(line(20).contains("| active 0 |"), "{}", line(20));
    assert_eq!(t[21], "notified 1");
}
