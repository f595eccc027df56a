//! `DrainStack` against its four layers stacked by hand (`RejectLayer → TrackLayer →
//! GuardLayer → FrameLayer` with `ServiceBuilder`, the guard using the frame layer's
//! encoder), through the public API only.
//!
//! `DrainStack` fuses the layers: one body instead of four nested ones, one call instead of
//! four nested futures while serving. Every scenario below runs twice, once through each, on
//! a controller of its own with a metrics recorder of its own, under paused time, and the
//! two traces must be equal: every body frame (bytes, with the wall-clock timestamp blanked),
//! how the body ends, its size hint and end-of-stream flag, whether its task was woken,
//! statuses and headers, the tracked streams, the breaker, the inner futures alive, the
//! drain's report and every metric.
//!
//! The inner bodies are [`Script`]s (`tests/support/script.rs`): the test decides where
//! event boundaries fall, where a record is cut, and when a quiet body wakes up.

mod support;

use std::convert::Infallible;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::Full;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_drain::frame::{FrameLayer, Grpc, NdJson};
use tower_drain::guard::{Breaker, GuardBuilder, GuardLayer};
use tower_drain::reject::RejectLayer;
use tower_drain::stack::DrainService;
use tower_drain::track::{MemoryStore, TrackLayer};
use tower_drain::{DrainController, DrainReason, DrainStack, DrainWatch};

use support::script::{Remote, Script, Step};

const SSE: &str = "text/event-stream";

fn x_user() -> HeaderName {
    HeaderName::from_static("x-user")
}

// ---------------------------------------------------------------------------------------
// The two stacks

/// The final frames' protocol.
#[derive(Clone, Copy, Debug)]
enum Enc {
    Sse,
    NdJson,
    Grpc,
}

/// The guard's settings in a scenario.
#[derive(Clone, Copy, Debug)]
struct GuardSettings {
    max_lifetime: Option<Duration>,
    heartbeat: Option<Duration>,
    response_timeout: Option<Duration>,
    /// The circuit breaker's failure threshold and cool-down.
    breaker: Option<(u32, Duration)>,
    /// `circuit_breaker(false)`.
    no_breaker: bool,
}

const NO_LIMITS: GuardSettings = GuardSettings {
    max_lifetime: None,
    heartbeat: None,
    response_timeout: None,
    breaker: None,
    no_breaker: false,
};

/// A scenario's stack.
#[derive(Clone, Copy, Debug)]
struct Setup {
    encoder: Enc,
    guard: GuardSettings,
    /// At most one stream per `x-user` value.
    keyed: bool,
}

const PLAIN: Setup = Setup {
    encoder: Enc::Sse,
    guard: NO_LIMITS,
    keyed: false,
};

/// Every guard of this file is configured here, with `g`'s settings and `enc`'s frames.
fn guard_settings(mut guard: GuardBuilder, g: &GuardSettings, enc: Enc) -> GuardBuilder {
    if let Some(d) = g.max_lifetime {
        guard = guard.max_lifetime(d);
    }
    if let Some(d) = g.heartbeat {
        guard = guard.heartbeat(d);
    }
    if let Some(d) = g.response_timeout {
        guard = guard.response_timeout(d);
    }
    if let Some((threshold, cooldown)) = g.breaker {
        guard = guard.failure_threshold(threshold).cooldown(cooldown);
    }
    if g.no_breaker {
        guard = guard.circuit_breaker(false);
    }
    match enc {
        Enc::Sse => guard,
        Enc::NdJson => guard.encoder(NdJson::new()),
        Enc::Grpc => guard.encoder(Grpc::new()),
    }
}

/// The hand-stacked guard layer of `g`.
fn guard_layer(w: DrainWatch, g: &GuardSettings, enc: Enc) -> GuardLayer {
    guard_settings(GuardLayer::builder(w), g, enc)
        .build()
        .unwrap()
}

/// `setup` as an application configures `DrainStack`: its encoder, then the guard's and the
/// track layer's settings through the stack's closures.
fn fused_stack(w: DrainWatch, setup: &Setup) -> DrainStack {
    let mut s = DrainStack::new(w);
    s = match setup.encoder {
        Enc::Sse => s,
        Enc::NdJson => s.encoder(NdJson::new()),
        Enc::Grpc => s.encoder(Grpc::new()),
    };
    // The stack's own encoder is the guard's.
    let s = s
        .guard(|g| guard_settings(g, &setup.guard, Enc::Sse))
        .unwrap();
    if setup.keyed {
        return s.track(|t| t.max_per_key(1).key_header(x_user()));
    }
    s
}

/// The inner three layers of `setup`, for stacking by hand under a `RejectLayer`.
struct Hand {
    track: TrackLayer,
    guard: GuardLayer,
    frame: FrameLayer,
}

fn hand_layers(w: DrainWatch, setup: &Setup) -> Hand {
    let frame = match setup.encoder {
        Enc::Sse => FrameLayer::new(w.clone()),
        Enc::NdJson => FrameLayer::with_encoder(w.clone(), NdJson::new()),
        Enc::Grpc => FrameLayer::with_encoder(w.clone(), Grpc::new()),
    };
    let guard = guard_layer(w.clone(), &setup.guard, setup.encoder);
    let mut track = TrackLayer::new(w);
    if setup.keyed {
        track = track.max_per_key(1).key_header(x_user());
    }
    Hand {
        track,
        guard,
        frame,
    }
}

/// `inner` under the fused stack.
fn fused<M, S>(stack: DrainStack<MemoryStore, M>, inner: S) -> DrainService<S, MemoryStore, M> {
    ServiceBuilder::new().layer(stack).service(inner)
}

/// `RejectLayer → TrackLayer → GuardLayer → FrameLayer → inner`, by hand (`$reject` is the
/// reject layer, plain or `sse_retry`).
macro_rules! by_hand {
    ($reject:expr, $hand:expr, $inner:expr) => {{
        let reject = $reject;
        let hand: Hand = $hand;
        ServiceBuilder::new()
            .layer(reject)
            .layer(hand.track)
            .layer(hand.guard)
            .layer(hand.frame)
            .service($inner)
    }};
}

// ---------------------------------------------------------------------------------------
// What both sides share: a controller, its report and metrics

/// One side of a comparison: its controller, built under a metrics recorder of its own.
struct Side {
    drain: DrainController,
    recorder: DebuggingRecorder,
}

impl Side {
    fn new() -> Self {
        let recorder = DebuggingRecorder::new();
        let drain = metrics::with_local_recorder(&recorder, || {
            DrainController::builder()
                .grace_period(Duration::from_secs(10))
                .propagation_delay(Duration::from_secs(1))
                // Every stream's retry hint the same: frames compare byte for byte.
                .reconnect_jitter(0.0)
                .build()
                .unwrap()
        });
        Self { drain, recorder }
    }

    /// Drains (if the scenario did not), waits for the report, and describes it with every
    /// metric recorded.
    async fn finish(&self) -> Vec<String> {
        self.drain.drain(DrainReason::Manual);
        let r = self.drain.report().await;
        let mut out = vec![format!(
            "report: at drain {}, notified {}, graceful {}, forced {}, rejected {}, \
             opened while closing {}",
            r.streams_at_drain,
            r.notified,
            r.closed_gracefully,
            r.force_closed,
            r.rejected,
            r.opened_while_closing
        )];
        let mut metrics: Vec<String> = self
            .recorder
            .snapshotter()
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let key = key.key();
                let labels: Vec<String> = key
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                let value = match value {
                    // Durations under paused time: the same on both sides, to the nanosecond.
                    DebugValue::Histogram(v) => format!("histogram {v:?}"),
                    other => format!("{other:?}"),
                };
                format!("metric {}{{{}}} {value}", key.name(), labels.join(","))
            })
            .collect();
        metrics.sort();
        out.extend(metrics);
        out
    }
}

/// A frame's text with the timestamp (wall-clock time) blanked out.
fn text(b: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(b).into_owned();
    let field = "\"timestamp\":\"";
    if let Some(i) = s.find(field) {
        let start = i + field.len();
        let end = start + s[start..].find('"').unwrap();
        s.replace_range(start..end, "N");
    }
    s
}

/// A body's poll result.
fn describe<E: std::fmt::Display>(p: Poll<Option<Result<Frame<Bytes>, E>>>) -> String {
    match p {
        Poll::Pending => "pending".to_owned(),
        Poll::Ready(None) => "end".to_owned(),
        Poll::Ready(Some(Err(e))) => format!("error {e}"),
        Poll::Ready(Some(Ok(f))) => match f.into_data() {
            Ok(d) => format!("data {}", text(&d)),
            Err(f) => format!("trailers {:?}", f.into_trailers().unwrap()),
        },
    }
}

/// Counts the wake-ups of the task polling a body.
#[derive(Default)]
struct Wakes(AtomicUsize);

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Wakes {
    /// Whether the task was woken since the last call.
    fn take(&self) -> bool {
        self.0.swap(0, Ordering::SeqCst) > 0
    }

    fn woken(&self) -> bool {
        self.0.load(Ordering::SeqCst) > 0
    }
}

// ---------------------------------------------------------------------------------------
// One streaming response, act by act

/// What the test does with the response body.
#[derive(Clone, Copy, Debug)]
enum Act {
    /// Polls the body once.
    P,
    /// Starts a drain and waits until `Closing`.
    Drain,
    /// Lets (paused) time pass, in milliseconds.
    Sleep(u64),
    /// Wakes the script from its `Pending` step.
    Wake,
}

use Act::{Drain, Sleep, Wake as W, P};

/// A scenario: the response's content type, the stack, the inner body's script, the acts.
struct Case {
    name: &'static str,
    content_type: &'static str,
    setup: Setup,
    script: &'static [Step],
    acts: &'static [Act],
}

/// Runs `acts` against one response of `svc`: one line per act, then the state once the
/// body is dropped.
async fn trace_body<S, B>(
    mut svc: S,
    drain: &DrainController,
    remote: &Remote,
    acts: &[Act],
) -> Vec<String>
where
    S: Service<Request<()>, Response = Response<B>, Error = std::io::Error>,
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
    let mut out = vec![format!(
        "status {} content-type {:?} | active {}",
        res.status(),
        res.headers().get("content-type"),
        drain.active_streams()
    )];
    let wakes = Arc::new(Wakes::default());
    let waker = Waker::from(wakes.clone());
    let mut cx = Context::from_waker(&waker);
    let mut body = Box::pin(res.into_body());
    for act in acts {
        out.push(match act {
            P => {
                let woken = wakes.take();
                let got = describe(body.as_mut().poll_frame(&mut cx));
                let hint = body.size_hint();
                format!(
                    "{got} | woken {woken} | end {} hint {}..{:?} | active {}",
                    body.is_end_stream(),
                    hint.lower(),
                    hint.upper(),
                    drain.active_streams()
                )
            }
            Drain => {
                drain.drain(DrainReason::Manual);
                drain.closing().await;
                format!(
                    "closing | woken {} | active {}",
                    wakes.woken(),
                    drain.active_streams()
                )
            }
            Sleep(ms) => {
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                format!("slept {ms} ms | woken {}", wakes.woken())
            }
            W => {
                remote.wake();
                format!("woke the script | woken {}", wakes.woken())
            }
        });
    }
    drop(body);
    out.push(format!("dropped | active {}", drain.active_streams()));
    out
}

/// One side of `case`.
async fn body_side(case: &Case, hand: bool) -> Vec<String> {
    let side = Side::new();
    let script = Script::new(case.script.iter().copied());
    let remote = script.remote();
    let slot = Arc::new(Mutex::new(Some(script)));
    let content_type = case.content_type;
    let inner = tower::service_fn(move |_req: Request<()>| {
        let script = slot.lock().unwrap().take().expect("one request per case");
        async move {
            let mut res = Response::new(script);
            res.headers_mut()
                .insert("content-type", HeaderValue::from_static(content_type));
            Ok::<_, std::io::Error>(res)
        }
    });
    let w = side.drain.watch();
    let mut out = if hand {
        let svc = by_hand!(
            RejectLayer::new(w.clone()),
            hand_layers(w, &case.setup),
            inner
        );
        trace_body(svc, &side.drain, &remote, case.acts).await
    } else {
        let svc = fused(fused_stack(w, &case.setup), inner);
        trace_body(svc, &side.drain, &remote, case.acts).await
    };
    out.extend(side.finish().await);
    out
}

/// `case` through `DrainStack` and through the layers stacked by hand: (fused, by hand).
async fn both(case: &Case) -> (Vec<String>, Vec<String>) {
    (body_side(case, false).await, body_side(case, true).await)
}

const WITH_LIMITS: Setup = Setup {
    guard: GuardSettings {
        max_lifetime: Some(Duration::from_secs(3)),
        heartbeat: Some(Duration::from_secs(1)),
        ..NO_LIMITS
    },
    ..PLAIN
};

const NDJSON: Setup = Setup {
    encoder: Enc::NdJson,
    ..PLAIN
};

const GRPC: Setup = Setup {
    encoder: Enc::Grpc,
    ..PLAIN
};

use Step::{Data, End, Error as Fail, Pending, Trailers};

const GRPC_OK: Step = Trailers(&[("grpc-status", "0")]);

const CASES: &[Case] = &[
    Case {
        name: "sse events, then the end",
        content_type: SSE,
        setup: PLAIN,
        script: &[Data("data: 1\n\n"), Data("data: 2\n\n"), End],
        acts: &[P, P, P, P],
    },
    Case {
        name: "sse events, then trailers",
        content_type: SSE,
        setup: PLAIN,
        script: &[Data("data: 1\n\n"), GRPC_OK, End],
        acts: &[P, P, P, P],
    },
    Case {
        name: "sse error at a boundary: the error frame",
        content_type: SSE,
        setup: PLAIN,
        script: &[Data("data: 1\n\n"), Fail("upstream failed")],
        acts: &[P, P, P, P],
    },
    Case {
        name: "sse error mid-event: the response is aborted",
        content_type: SSE,
        setup: PLAIN,
        script: &[
            Data("data: 1\n\n"),
            Data("data: par"),
            Fail("upstream failed"),
        ],
        acts: &[P, P, P, P],
    },
    Case {
        name: "sse drained while busy, at a boundary",
        content_type: SSE,
        setup: PLAIN,
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
        setup: PLAIN,
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
        setup: PLAIN,
        script: &[
            Data("data: 1\n\n"),
            Data("data: pa"),
            Fail("upstream failed"),
        ],
        acts: &[P, P, Drain, P, P],
    },
    Case {
        name: "sse drained while pending",
        content_type: SSE,
        setup: PLAIN,
        script: &[Data("data: 1\n\n"), Pending, Pending],
        acts: &[P, P, Drain, P, P, P],
    },
    Case {
        name: "sse quiet, then woken by its source",
        content_type: SSE,
        setup: PLAIN,
        script: &[Data("data: 1\n\n"), Pending, Data("data: 2\n\n"), End],
        acts: &[P, P, P, W, P, P],
    },
    Case {
        name: "sse quiet mid-event when drained: the frame waits for the event's end",
        content_type: SSE,
        setup: PLAIN,
        script: &[
            Data("data: 1\n\n"),
            Data("data: pa"),
            Pending,
            Data("rt\n\n"),
            Pending,
        ],
        acts: &[P, P, P, Drain, P, W, P, P, P],
    },
    Case {
        name: "sse stuck mid-event past the grace period: aborted",
        content_type: SSE,
        setup: PLAIN,
        script: &[Data("data: 1\n\n"), Data("data: stuck"), Pending],
        acts: &[P, P, Drain, P, Sleep(11_000), P, P],
    },
    Case {
        name: "sse with guard limits: heartbeats, then the lifetime frame",
        content_type: SSE,
        setup: WITH_LIMITS,
        script: &[Data("data: 1\n\n"), Pending],
        acts: &[P, P, Sleep(1_100), P, P, Sleep(2_000), P, P, P],
    },
    Case {
        name: "sse with guard limits, drained",
        content_type: SSE,
        setup: WITH_LIMITS,
        script: &[Data("data: 1\n\n"), Pending],
        acts: &[P, P, Drain, P, P],
    },
    Case {
        name: "sse with guard limits, drained, then a heartbeat's interval: no heartbeat",
        content_type: SSE,
        setup: WITH_LIMITS,
        script: &[Data("data: 1\n\n"), Pending],
        // The drain's propagation delay makes a heartbeat due first.
        acts: &[P, P, Drain, P, P, Sleep(1_100), P, P],
    },
    Case {
        name: "sse with guard limits, quiet mid-event: no heartbeat inside an event",
        content_type: SSE,
        setup: WITH_LIMITS,
        script: &[
            Data("data: 1\n\n"),
            Data("data: pa"),
            Pending,
            Data("rt\n\n"),
        ],
        acts: &[P, P, P, Sleep(1_100), P, W, P, P, P],
    },
    Case {
        name: "ndjson drained",
        content_type: "application/x-ndjson",
        setup: NDJSON,
        script: &[Data("{\"a\":1}\n"), Data("{\"a\":"), Data("2}\n")],
        acts: &[P, P, Drain, P, P, P],
    },
    Case {
        name: "grpc drained: trailers only",
        content_type: "application/grpc",
        setup: GRPC,
        script: &[Data("\0\0\0\0\x02hi"), Pending],
        acts: &[P, Drain, P, P, P],
    },
    Case {
        name: "grpc error: trailers only",
        content_type: "application/grpc",
        setup: GRPC,
        script: &[Data("\0\0\0\0\x02hi"), Fail("upstream failed")],
        acts: &[P, P, P],
    },
    Case {
        name: "grpc ending with its own trailers",
        content_type: "application/grpc",
        setup: GRPC,
        script: &[Data("\0\0\0\0\x02hi"), GRPC_OK, End],
        acts: &[P, P, P],
    },
    Case {
        name: "plain response, whole",
        content_type: "text/plain",
        setup: PLAIN,
        script: &[Data("hello"), End],
        acts: &[P, P],
    },
    Case {
        name: "plain response, failing",
        content_type: "text/plain",
        setup: PLAIN,
        script: &[Data("hel"), Fail("upstream failed")],
        acts: &[P, P, P],
    },
    Case {
        name: "plain response during a drain",
        content_type: "text/plain",
        setup: PLAIN,
        script: &[Data("hello"), End],
        acts: &[Drain, P, P],
    },
];

fn case(name: &str) -> &'static Case {
    CASES.iter().find(|c| c.name == name).unwrap()
}

/// The line of act `i` (line 0 describes the response).
fn act(t: &[String], i: usize) -> &str {
    &t[i + 1]
}

fn report(t: &[String]) -> &str {
    t.iter().find(|l| l.starts_with("report: ")).unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_fused_body_does_what_the_stacked_bodies_do() {
    for case in CASES {
        let (fused, by_hand) = both(case).await;
        assert_eq!(fused, by_hand, "{}", case.name);
    }
}

#[tokio::test(start_paused = true)]
async fn both_bodies_keep_each_layers_behaviour() {
    // A few of the cases above, checked against what a user relies on (so that both stacks
    // cannot be wrong the same way).
    let (t, _) = both(case("sse drained while busy, at a boundary")).await;
    assert!(act(&t, 2).starts_with("data event: shutdown\n"), "{t:#?}");
    assert!(act(&t, 2).contains("retry: 30000\n\n"), "{t:#?}");
    assert!(
        act(&t, 3).starts_with("end | woken false | end true hint 0..Some(0) | active 0"),
        "{t:#?}"
    );

    let (t, _) = both(case(
        "sse drained mid-event: the frame waits for the event's end",
    ))
    .await;
    assert!(act(&t, 3).starts_with("data rt\n\n"), "{t:#?}");
    assert!(act(&t, 4).starts_with("data event: shutdown\n"), "{t:#?}");

    // A clean end always means whole records: mid-record, the error goes on.
    let (t, _) = both(case("sse error mid-event: the response is aborted")).await;
    assert!(act(&t, 2).starts_with("error upstream failed"), "{t:#?}");
    assert!(act(&t, 2).ends_with("active 0"), "{t:#?}");

    let (t, _) = both(case("sse events, then trailers")).await;
    assert!(act(&t, 1).starts_with("trailers"), "{t:#?}");
    assert!(act(&t, 1).ends_with("active 1"), "{t:#?}");
    assert!(
        act(&t, 2).starts_with("end | woken false | end true"),
        "{t:#?}"
    );
    assert!(act(&t, 2).ends_with("active 0"), "{t:#?}");

    let (t, _) = both(case("sse stuck mid-event past the grace period: aborted")).await;
    assert!(
        act(&t, 5).starts_with("error stream ended in the middle of a record"),
        "{t:#?}"
    );
    assert!(act(&t, 6).starts_with("end | "), "{t:#?}");
    assert!(act(&t, 6).contains("| end true"), "{t:#?}");
    assert!(report(&t).contains("notified 0,"), "{t:#?}");
    assert!(report(&t).contains("forced 1,"), "{t:#?}");

    // A quiet stream is woken by its source, and by the drain.
    let (t, _) = both(case("sse quiet, then woken by its source")).await;
    assert!(act(&t, 2).starts_with("pending | woken false"), "{t:#?}");
    assert!(act(&t, 3).ends_with("woken true"), "{t:#?}");
    assert!(
        act(&t, 4).starts_with("data data: 2\n\n | woken true"),
        "{t:#?}"
    );
    let (t, _) = both(case("sse drained while pending")).await;
    assert!(act(&t, 2).starts_with("closing | woken true"), "{t:#?}");
    assert!(act(&t, 3).starts_with("data event: shutdown\n"), "{t:#?}");

    // Quiet mid-event at the drain: nothing until the event is whole, then the frame.
    let (t, _) = both(case(
        "sse quiet mid-event when drained: the frame waits for the event's end",
    ))
    .await;
    assert!(act(&t, 4).starts_with("pending"), "{t:#?}");
    assert!(act(&t, 6).starts_with("data rt\n\n"), "{t:#?}");
    assert!(act(&t, 7).starts_with("data event: shutdown\n"), "{t:#?}");
    assert!(act(&t, 8).starts_with("end | "), "{t:#?}");

    let (t, _) = both(case(
        "sse with guard limits: heartbeats, then the lifetime frame",
    ))
    .await;
    assert!(act(&t, 2).ends_with("woken true"), "{t:#?}");
    assert!(act(&t, 3).starts_with("data :\n\n"), "{t:#?}");
    assert!(
        t.iter().any(|l| l.starts_with("data event: error\n")),
        "{t:#?}"
    );

    // No heartbeat inside an event: the guard waits for the boundary.
    let (t, _) = both(case(
        "sse with guard limits, quiet mid-event: no heartbeat inside an event",
    ))
    .await;
    assert!(act(&t, 4).starts_with("pending"), "{t:#?}");
    assert!(act(&t, 6).starts_with("data rt\n\n"), "{t:#?}");

    // The frame layer's final frame is the stream's last: the guard, which shares its flag,
    // adds no heartbeat after it.
    let (t, _) = both(case(
        "sse with guard limits, drained, then a heartbeat's interval: no heartbeat",
    ))
    .await;
    assert!(act(&t, 3).starts_with("data :\n\n"), "{t:#?}");
    assert!(act(&t, 4).starts_with("data event: shutdown\n"), "{t:#?}");
    assert!(act(&t, 6).starts_with("end | "), "{t:#?}");
    assert!(report(&t).contains("notified 1,"), "{t:#?}");

    let (t, _) = both(case("grpc drained: trailers only")).await;
    assert!(
        act(&t, 2).starts_with("trailers {\"grpc-status\": \"14\""),
        "{t:#?}"
    );
    let (t, _) = both(case("grpc ending with its own trailers")).await;
    assert!(
        act(&t, 1).starts_with("trailers {\"grpc-status\": \"0\"}"),
        "{t:#?}"
    );

    let (t, _) = both(case("plain response, whole")).await;
    // Released as soon as the inner body says it is at its end.
    assert_eq!(
        act(&t, 0),
        "data hello | woken false | end true hint 0..None | active 0",
        "{t:#?}"
    );
}

// ---------------------------------------------------------------------------------------
// `sse_retry`: the shutdown frame served to a reconnecting `EventSource`

/// The answer to an `EventSource` reconnecting while closing.
async fn retry_frame<S, B>(svc: S) -> Vec<String>
where
    S: Service<Request<()>, Response = Response<B>, Error = std::io::Error>,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let req = Request::builder().header("accept", SSE).body(()).unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let mut out = vec![format!(
        "status {} content-type {:?}",
        res.status(),
        res.headers().get("content-type")
    )];
    let mut body = pin!(res.into_body());
    let mut cx = Context::from_waker(Waker::noop());
    let hint = body.size_hint();
    out.push(format!(
        "end {} hint {}..{:?}",
        body.is_end_stream(),
        hint.lower(),
        hint.upper()
    ));
    let frame = body.as_mut().poll_frame(&mut cx);
    if let Poll::Ready(Some(Ok(f))) = &frame {
        out.push(format!(
            "frame of {} bytes",
            f.data_ref().map_or(0, |d| d.len())
        ));
    }
    out.push(describe(frame));
    out.push(format!("end {}", body.is_end_stream()));
    out.push(describe(body.as_mut().poll_frame(&mut cx)));
    out
}

async fn retry_side(hand: bool) -> Vec<String> {
    let side = Side::new();
    let w = side.drain.watch();
    let inner = tower::service_fn(|_req: Request<()>| async {
        Ok::<_, std::io::Error>(Response::new(Script::default()))
    });
    side.drain.drain(DrainReason::Manual);
    side.drain.closing().await;
    let mut out = if hand {
        let svc = by_hand!(
            RejectLayer::new(w.clone()).sse_retry(),
            hand_layers(w, &PLAIN),
            inner
        );
        retry_frame(svc).await
    } else {
        retry_frame(fused(
            fused_stack(w, &PLAIN).reject(|r| r.sse_retry()),
            inner,
        ))
        .await
    };
    out.extend(side.finish().await);
    out
}

#[tokio::test(start_paused = true)]
async fn both_serve_the_sse_retry_frame() {
    let fused = retry_side(false).await;
    assert_eq!(fused, retry_side(true).await);
    assert!(fused[0].starts_with("status 200 OK"), "{fused:#?}");
    // The size hint is exact, and the frame is all of the body.
    let len: &str = fused[2]
        .strip_prefix("frame of ")
        .unwrap()
        .strip_suffix(" bytes")
        .unwrap();
    assert_eq!(fused[1], format!("end false hint {len}..Some({len})"));
    assert!(fused[3].starts_with("data event: shutdown\n"), "{fused:#?}");
    assert_eq!(fused[4], "end true");
    assert_eq!(fused[5], "end");
}

// ---------------------------------------------------------------------------------------
// Keyed requests: `DrainStack` serves them through its nested layers

/// A keyed request (`x-user: ann`) and an unkeyed one, held open over a drain.
async fn keyed_trace<S, B>(svc: S, drain: &DrainController) -> (Vec<String>, Vec<usize>)
where
    S: Service<Request<()>, Response = Response<B>, Error = std::io::Error> + Clone,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let keyed = Request::builder().header("x-user", "ann").body(()).unwrap();
    let mut out = Vec::new();
    let mut extensions = Vec::new();
    let mut bodies = Vec::new();
    for req in [keyed, Request::new(())] {
        let res = svc.clone().oneshot(req).await.unwrap();
        out.push(format!("status {}", res.status()));
        extensions.push(res.extensions().len());
        bodies.push(Box::pin(res.into_body()));
    }
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..2 {
        for b in &mut bodies {
            out.push(describe(b.as_mut().poll_frame(&mut cx)));
        }
    }
    drain.drain(DrainReason::Manual);
    drain.closing().await;
    for _ in 0..2 {
        for b in &mut bodies {
            let got = describe(b.as_mut().poll_frame(&mut cx));
            out.push(format!("{got} | end {}", b.is_end_stream()));
        }
    }
    out.push(format!("active {}", drain.active_streams()));
    (out, extensions)
}

async fn keyed_side(hand: bool) -> (Vec<String>, Vec<usize>) {
    let side = Side::new();
    let w = side.drain.watch();
    let setup = Setup {
        keyed: true,
        ..PLAIN
    };
    let inner = tower::service_fn(|_req: Request<()>| async {
        let mut res = Response::new(Script::new([Data("data: 1\n\n")]));
        res.headers_mut()
            .insert("content-type", HeaderValue::from_static(SSE));
        Ok::<_, std::io::Error>(res)
    });
    let (mut out, extensions) = if hand {
        let svc = by_hand!(RejectLayer::new(w.clone()), hand_layers(w, &setup), inner);
        keyed_trace(svc, &side.drain).await
    } else {
        keyed_trace(fused(fused_stack(w, &setup), inner), &side.drain).await
    };
    out.extend(side.finish().await);
    (out, extensions)
}

/// A stream answered through the nested layers (a keyed request) drains as a fused one
/// does, as when stacked by hand; and `DrainStack` leaves none of its layers' per-stream
/// state in the responses' extensions (where an outer guard would take it).
#[tokio::test(start_paused = true)]
async fn keyed_and_fused_streams_drain_alike() {
    let (fused, fused_extensions) = keyed_side(false).await;
    let (by_hand, _) = keyed_side(true).await;
    assert_eq!(fused, by_hand);
    assert_eq!(fused_extensions, [0, 0]);
    assert_eq!(&fused[..2], ["status 200 OK", "status 200 OK"]);
    assert!(fused[6].starts_with("data event: shutdown\n"), "{fused:#?}");
    assert!(fused[7].starts_with("data event: shutdown\n"), "{fused:#?}");
    assert_eq!(
        &fused[8..11],
        ["end | end true", "end | end true", "active 0"]
    );
    assert!(report(&fused).contains("notified 2,"), "{fused:#?}");
}

#[test]
fn the_bodies_are_send_sync_and_unpin() {
    fn check<S, B>(_: &S)
    where
        S: Service<Request<()>, Response = Response<B>>,
        B: Send + Sync + Unpin,
    {
    }
    let drain = DrainController::new();
    let w = drain.watch();
    let inner = tower::service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    check(&fused(DrainStack::new(w.clone()), inner));
    check(&fused(
        DrainStack::new(w.clone()).reject(|r| r.sse_retry()),
        inner,
    ));
    check(&by_hand!(
        RejectLayer::new(w.clone()),
        hand_layers(w.clone(), &PLAIN),
        inner
    ));
    check(&by_hand!(
        RejectLayer::new(w.clone()).sse_retry(),
        hand_layers(w, &PLAIN),
        inner
    ));
}

// ---------------------------------------------------------------------------------------
// Calls: statuses, headers, the breaker, the inner futures

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
enum Op {
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
    /// Lets (paused) time pass, in seconds.
    Sleep(u64),
}

use Op::{Call, DropAll, Pump};

/// The inner service: answers what the request's `x-answer` header says.
fn answering(
    alive: Arc<AtomicUsize>,
) -> impl Service<Request<()>, Response = Response<Script>, Error = std::io::Error> + Clone {
    tower::service_fn(move |req: Request<()>| {
        let answer = req.headers()["x-answer"].to_str().unwrap().to_owned();
        let alive = Alive::new(&alive);
        async move {
            let _alive = alive;
            match answer.as_str() {
                "err" => Err(std::io::Error::other("inner failed")),
                "wait" => std::future::pending().await,
                "sse" => {
                    let mut res = Response::new(Script::new([Data("data: 1\n\n")]));
                    res.headers_mut()
                        .insert("content-type", HeaderValue::from_static(SSE));
                    Ok(res)
                }
                code => {
                    let mut res = Response::new(Script::default());
                    *res.status_mut() = code.parse().unwrap();
                    Ok(res)
                }
            }
        }
    })
}

/// Runs `ops` against `svc`, describing each one's outcome and the state after it.
async fn trace_calls<S, B>(
    mut svc: S,
    drain: &DrainController,
    breaker: Option<Breaker>,
    alive: &AtomicUsize,
    ops: &[Op],
) -> Vec<String>
where
    S: Service<Request<()>, Response = Response<B>, Error = std::io::Error>,
    B: Body<Data = Bytes>,
{
    let mut held: Vec<std::pin::Pin<Box<B>>> = Vec::new();
    let mut out = Vec::new();
    for op in ops {
        let what = match *op {
            Call(method, path, answer, key) => {
                let mut req = Request::builder()
                    .method(method)
                    .uri(path)
                    .header("x-answer", answer);
                if let Some(key) = key {
                    req = req.header("x-user", key);
                }
                let req = req.body(()).unwrap();
                match svc.ready().await.unwrap().call(req).await {
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
            Op::Drain => {
                drain.drain(DrainReason::Manual);
                drain.closing().await;
                "closing".to_owned()
            }
            Op::Sleep(secs) => {
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
    out
}

async fn call_side(setup: &Setup, sse_retry: bool, hand: bool, ops: &[Op]) -> Vec<String> {
    let side = Side::new();
    let alive = Arc::new(AtomicUsize::new(0));
    let inner = answering(alive.clone());
    let w = side.drain.watch();
    let drain = &side.drain;
    let mut out = if hand {
        let layers = hand_layers(w.clone(), setup);
        let breaker = layers.guard.breaker();
        if sse_retry {
            let svc = by_hand!(RejectLayer::new(w).sse_retry(), layers, inner);
            trace_calls(svc, drain, breaker, &alive, ops).await
        } else {
            let svc = by_hand!(RejectLayer::new(w), layers, inner);
            trace_calls(svc, drain, breaker, &alive, ops).await
        }
    } else {
        let stack = fused_stack(w, setup);
        let breaker = stack.breaker();
        if sse_retry {
            let svc = fused(stack.reject(|r| r.sse_retry()), inner);
            trace_calls(svc, drain, breaker, &alive, ops).await
        } else {
            trace_calls(fused(stack, inner), drain, breaker, &alive, ops).await
        }
    };
    out.extend(side.finish().await);
    out
}

/// `ops` through `DrainStack` and through the layers stacked by hand: (fused, by hand).
async fn calls(setup: &Setup, sse_retry: bool, ops: &[Op]) -> (Vec<String>, Vec<String>) {
    (
        call_side(setup, sse_retry, false, ops).await,
        call_side(setup, sse_retry, true, ops).await,
    )
}

/// A breaker (2 failures, 30 s cool-down) and a 5 s response timeout.
const GUARDED: Setup = Setup {
    guard: GuardSettings {
        response_timeout: Some(Duration::from_secs(5)),
        breaker: Some((2, Duration::from_secs(30))),
        ..NO_LIMITS
    },
    ..PLAIN
};

/// Every answer of the guard and the frame layer while serving, then the drain.
const SERVING: &[Op] = &[
    Call("GET", "/", "200", None),
    Call("GET", "/", "500", None),
    DropAll,
    Call("GET", "/", "200", None),
    Call("GET", "/", "err", None),
    Call("GET", "/", "500", None),
    // Open: turned away, still tracked until the body goes.
    Call("GET", "/", "200", None),
    DropAll,
    Op::Sleep(31),
    // Half-open: this one is the probe.
    Call("GET", "/", "200", None),
    Call("GET", "/", "wait", None),
    Call("HEAD", "/events", "sse", None),
    Call("GET", "/events", "sse", None),
    Call("POST", "/events", "204", None),
    Pump,
    Op::Drain,
    Pump,
    Pump,
    // While closing: the nested path (rejections, the exempt probe paths).
    Call("GET", "/", "200", None),
    Call("GET", "/healthz", "200", None),
    DropAll,
];

#[tokio::test(start_paused = true)]
async fn the_fused_call_does_what_the_stacked_layers_do() {
    let (fused, by_hand) = calls(&GUARDED, false, SERVING).await;
    assert_eq!(fused, by_hand);

    // The defaults (no breaker, no response timeout), and the breaker turned off.
    let defaults: &[Op] = &[
        Call("GET", "/", "503", None),
        Call("GET", "/", "err", None),
        Call("GET", "/events", "sse", None),
        Pump,
        Op::Drain,
        Pump,
        DropAll,
    ];
    let (fused, by_hand) = calls(&PLAIN, false, defaults).await;
    assert_eq!(fused, by_hand);
    let no_breaker = Setup {
        guard: GuardSettings {
            no_breaker: true,
            ..NO_LIMITS
        },
        ..PLAIN
    };
    let (fused, by_hand) = calls(&no_breaker, false, defaults).await;
    assert_eq!(fused, by_hand);

    // Keyed requests take the nested path all along; the same as stacking by hand.
    let keyed: &[Op] = &[
        Call("GET", "/events", "sse", Some("ann")),
        Call("GET", "/events", "sse", Some("ann")),
        Call("GET", "/events", "sse", Some("bob")),
        Call("GET", "/events", "sse", None),
        Pump,
        Op::Drain,
        Pump,
        DropAll,
    ];
    let keyed_setup = Setup {
        keyed: true,
        ..PLAIN
    };
    let (fused, by_hand) = calls(&keyed_setup, false, keyed).await;
    assert_eq!(fused, by_hand);
    assert!(
        fused[1].contains(": 429 "),
        "the second stream of ann: {fused:#?}"
    );

    // The `sse_retry` mode serves like the plain one.
    let (fused, by_hand) = calls(&GUARDED, true, SERVING).await;
    assert_eq!(fused, by_hand);
}

/// What the traces say, in the terms a user relies on.
#[tokio::test(start_paused = true)]
async fn both_calls_keep_each_layers_behaviour() {
    let (t, _) = calls(&GUARDED, false, SERVING).await;
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
    assert!(report(&t).contains("notified 1,"), "{t:#?}");
    assert!(report(&t).contains("rejected 1,"), "{t:#?}");
}
