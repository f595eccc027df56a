//! `conn::Connections` over real sockets: HTTP/2 GOAWAY when `Closing` begins (not at
//! `Stopped`), HTTP/1.1 keep-alive connections left open while idle and closed through
//! `connection: close`, and connections whose clients stopped reading dropped at the hard
//! deadline.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tower::ServiceBuilder;
use tower_drain::conn::{ConnectionEnd, Connections};
use tower_drain::frame::RunToCompletion;
use tower_drain::{DrainController, DrainReason, DrainStack, Phase};

use support::h2::{GOAWAY, H2, RST_STREAM};
use support::within;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// `/events`: SSE ticks every 20 ms. `/hold`: an endless plain stream that runs to
/// completion (keeps the drain in `Closing` until the grace deadline). `/flood`: 64 KiB SSE
/// events as fast as the connection takes them (counted in `produced`). `/hang`: never
/// answers. `/readyz`: exempt from rejection. Anything else: `200 ok`.
async fn app(
    req: Request<Incoming>,
    produced: Arc<AtomicU64>,
) -> Result<Response<Body>, Infallible> {
    let sse = |body: Body| {
        let mut res = Response::new(body);
        res.headers_mut()
            .insert(header::CONTENT_TYPE, "text/event-stream".parse().unwrap());
        res
    };
    match req.uri().path() {
        "/events" => {
            let ticks = futures_util::stream::unfold(0u64, |n| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let ev = format!("event: tick\ndata: {{\"n\":{n}}}\n\n");
                Some((Ok(Frame::data(Bytes::from(ev))), n + 1))
            });
            Ok(sse(StreamBody::new(ticks).boxed_unsync()))
        }
        "/hold" => {
            let ticks = futures_util::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((Ok(Frame::data(Bytes::from_static(b"."))), ()))
            });
            let mut res = Response::new(StreamBody::new(ticks).boxed_unsync());
            res.extensions_mut().insert(RunToCompletion);
            Ok(res)
        }
        "/flood" => {
            let event = Bytes::from(format!("event: big\ndata: {}\n\n", "x".repeat(65536)));
            let events = futures_util::stream::repeat_with(move || {
                produced.fetch_add(1, Ordering::Relaxed);
                Ok(Frame::data(event.clone()))
            });
            Ok(sse(StreamBody::new(events).boxed_unsync()))
        }
        "/hang" => std::future::pending().await,
        _ => Ok(Response::new(Full::new(Bytes::from("ok")).boxed_unsync())),
    }
}

struct Setup {
    drain: DrainController,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

/// The stack around `app` (with `/hang` outside it: an untracked request), served by
/// `Connections::serve`.
async fn setup(drain: DrainController) -> Setup {
    let produced = Arc::new(AtomicU64::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = tracked(&drain, produced);
    let server = tokio::spawn(Connections::new(drain.watch()).serve(listener, svc));
    Setup {
        drain,
        addr,
        server,
    }
}

type Svc = tower::util::BoxCloneSyncService<
    Request<Incoming>,
    Response<UnsyncBoxBody<Bytes, tower_drain::BoxError>>,
    Infallible,
>;

fn tracked(drain: &DrainController, produced: Arc<AtomicU64>) -> Svc {
    let stacked = ServiceBuilder::new()
        .map_response(|r: Response<_>| r.map(|b: _| BodyExt::map_err(b, Into::into).boxed_unsync()))
        .layer(DrainStack::new(drain.watch()))
        .service_fn(move |req| app(req, produced.clone()));
    let untracked = ServiceBuilder::new()
        .map_response(|r: Response<Body>| r.map(|b| BodyExt::map_err(b, Into::into).boxed_unsync()))
        .service_fn(|req| app(req, Arc::new(AtomicU64::new(0))));
    let steer = tower::steer::Steer::new(
        vec![Svc::new(stacked), Svc::new(untracked)],
        |req: &Request<Incoming>, _: &[_]| usize::from(req.uri().path() == "/hang"),
    );
    Svc::new(steer)
}

fn sse_data(f: &support::h2::Frame) -> String {
    String::from_utf8_lossy(&f.payload).into_owned()
}

/// Several streams on one h2c connection: GOAWAY arrives when `Closing` begins, long before
/// `Stopped` (a propagation delay, then a spread); every stream still gets its shutdown event
/// and ends with END_STREAM, never RST_STREAM; then the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_gets_goaway_at_closing_and_every_stream_ends_cleanly() {
    const N: usize = 5;
    let drain = DrainController::builder()
        .grace_period(Duration::from_secs(10))
        .propagation_delay(Duration::from_millis(300))
        .drain_spread(Duration::from_millis(1500))
        .build()
        .unwrap();
    let s = setup(drain).await;
    let mut h2 = H2::connect(s.addr).await;
    let mut ids = Vec::new();
    for _ in 0..N {
        ids.push(h2.get(s.addr, "/events").await);
    }
    // Every stream is open and ticking.
    let mut ticking = std::collections::HashSet::new();
    while ticking.len() < N {
        let f = within("first ticks", h2.next()).await.expect("a frame");
        if f.kind == support::h2::DATA && sse_data(&f).contains("event: tick") {
            ticking.insert(f.stream);
        }
    }

    let started = Instant::now();
    s.drain.drain(DrainReason::Manual);
    let mut goaway_at = None;
    let mut ended = Vec::new();
    let mut last_event = std::collections::HashMap::new();
    while ended.len() < N {
        let f = within("drain frames", h2.next())
            .await
            .expect("no EOF before every stream ended");
        match f.kind {
            GOAWAY if goaway_at.is_none() => {
                // Sent when `Closing` began: never during the propagation delay, and while
                // the spread still has streams to notify.
                assert_eq!(
                    s.drain.phase(),
                    Phase::Closing,
                    "GOAWAY at {:?}",
                    started.elapsed()
                );
                assert!(started.elapsed() >= Duration::from_millis(300));
                assert!(
                    ended.len() <= 1,
                    "GOAWAY after {} streams had ended",
                    ended.len()
                );
                assert!(
                    f.last_stream_id() >= *ids.last().unwrap(),
                    "open streams are kept"
                );
                goaway_at = Some(started.elapsed());
            }
            GOAWAY => {
                assert!(
                    f.last_stream_id() >= *ids.last().unwrap(),
                    "open streams are kept"
                );
            }
            RST_STREAM => panic!("stream {} reset", f.stream),
            support::h2::DATA => {
                let text = sse_data(&f);
                if let Some(ev) = text.split("\n\n").filter(|e| !e.is_empty()).last() {
                    last_event.insert(f.stream, ev.to_string());
                }
                if f.ends_stream() {
                    ended.push(f.stream);
                }
            }
            _ if f.ends_stream() => ended.push(f.stream),
            _ => {}
        }
    }
    let goaway_at = goaway_at.expect("a GOAWAY");
    for id in &ids {
        let last = &last_event[id];
        assert!(
            last.starts_with("event: shutdown\n"),
            "stream {id}: {last:?}"
        );
    }
    // The connection closes once its streams are done, and the server stops.
    assert!(within("connection close", h2.next()).await.is_none());
    let report = within("report", s.drain.report()).await;
    assert_eq!(report.streams_at_drain, N as u64);
    assert_eq!(report.closed_gracefully, N as u64);
    within("server end", s.server).await.unwrap();
    eprintln!(
        "GOAWAY {goaway_at:?} after drain(); Closing at 300 ms; Stopped at {:?}",
        report.duration
    );
}

/// An idle keep-alive HTTP/1.1 connection is not closed when `Closing` begins; its next
/// request is answered with `connection: close`, and then the connection closes. Both for a
/// rejected route (503) and an exempt one (the probe's 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_idle_connection_is_not_closed_at_closing_and_its_next_answer_closes_it() {
    let drain = DrainController::builder()
        .grace_period(Duration::from_secs(10))
        .build()
        .unwrap();
    let s = setup(drain).await;
    // Keeps the drain in `Closing` (runs to completion) until we let it go.
    let hold = support::fetch(s.addr, "/hold").await;

    let mut conns = Vec::new();
    for path in ["/other", "/readyz"] {
        let mut tcp = TcpStream::connect(s.addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let head = support::read_http1_response(&mut tcp).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        conns.push((path, tcp));
    }

    // One more kept-alive connection that stays idle throughout.
    let mut idle = TcpStream::connect(s.addr).await.unwrap();
    idle.write_all(b"GET /other HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    support::read_http1_response(&mut idle).await;

    s.drain.drain(DrainReason::Manual);
    s.drain.closing().await;
    // A third connection's request after `Closing` has been answered: by then every
    // connection task has seen `Closing` (they are woken together) and had its turn.
    let mut third = TcpStream::connect(s.addr).await.unwrap();
    third
        .write_all(b"GET /other HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let head = support::read_http1_response(&mut third).await;
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("connection: close"), "{head}");

    for (path, mut tcp) in conns {
        // Still open: a request sent now is answered, not reset.
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let head = support::read_http1_response(&mut tcp).await;
        let status = if path == "/readyz" { "200" } else { "503" };
        assert!(
            head.starts_with(&format!("http/1.1 {status}")),
            "{path}: {head}"
        );
        assert!(head.contains("connection: close"), "{path}: {head}");
        // … and then closed by the server.
        let mut rest = Vec::new();
        let n = within("close", tcp.read_to_end(&mut rest)).await.unwrap();
        assert_eq!(n, 0, "nothing after the last response");
    }
    assert_eq!(s.drain.phase(), Phase::Closing);
    // The idle one is still open while closing …
    let mut probe = [0u8; 1];
    assert!(
        matches!(idle.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "an idle connection is left open at Closing"
    );
    drop(hold);
    within("report", s.drain.report()).await;
    // … and closed when the server stops.
    let mut rest = Vec::new();
    let n = within("idle close at Stopped", idle.read_to_end(&mut rest))
        .await
        .unwrap();
    assert_eq!(n, 0);
    within("server end", s.server).await.unwrap();
}

/// Clients that stop reading (full send buffers) on HTTP/1.1 and HTTP/2, and a request the
/// stack does not track that never gets an answer: every connection is dropped at the hard
/// deadline (grace + linger), so the accept loop ends within the linger of the grace
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_clients_are_dropped_at_the_hard_deadline() {
    const GRACE: Duration = Duration::from_millis(1500);
    const LINGER: Duration = Duration::from_millis(300);
    let drain = DrainController::builder()
        .grace_period(GRACE)
        .force_linger(LINGER)
        .build()
        .unwrap();
    let produced = Arc::new(AtomicU64::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Connections::new(drain.watch());
    let svc = tracked(&drain, produced.clone());
    // Our own accept loop, to see how each connection ended.
    let (ends_tx, mut ends) = tokio::sync::mpsc::unbounded_channel();
    let stopped = drain.stopped();
    tokio::spawn(async move {
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                () = &mut stopped => break,
                Ok((tcp, _)) = listener.accept() => {
                    let conn = conns.serve_connection(tcp, svc.clone());
                    let tx = ends_tx.clone();
                    tokio::spawn(async move { let _ = tx.send(conn.await); });
                }
            }
        }
    });

    // Three HTTP/1.1 floods and one HTTP/2 flood that nobody reads, and one untracked
    // request that never gets an answer.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /flood HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        clients.push(tcp);
    }
    let mut h2 = H2::connect(addr).await;
    h2.get(addr, "/flood").await;
    let mut hang = TcpStream::connect(addr).await.unwrap();
    hang.write_all(b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // Wait (bounded) until the floods are stuck: nothing more produced for 200 ms.
    let mut last = u64::MAX;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = produced.load(Ordering::Relaxed);
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    assert_eq!(
        produced.load(Ordering::Relaxed),
        last,
        "the floods never got stuck"
    );
    assert_eq!(drain.active_streams(), 4);

    let started = Instant::now();
    drain.drain(DrainReason::Signal);
    let mut got = Vec::new();
    while got.len() < 5 {
        got.push(within("connection ends", ends.recv()).await.unwrap());
    }
    let last_end = started.elapsed();
    assert!(
        got.iter().all(|e| *e == ConnectionEnd::Dropped),
        "every stuck connection is dropped: {got:?}"
    );
    // Not before the hard deadline, and not long after it.
    assert!(last_end >= GRACE + LINGER, "{last_end:?}");
    assert!(last_end < GRACE + Duration::from_secs(1), "{last_end:?}");
    let report = within("report", drain.report()).await;
    // A stream whose shutdown frame was handed to hyper counts as graceful even if the
    // bytes never left; the others are force-closed. None is left out.
    assert_eq!(report.streams_at_drain, 4, "{report:?}");
    assert_eq!(
        report.force_closed + report.closed_gracefully,
        4,
        "{report:?}"
    );
    eprintln!(
        "grace {GRACE:?}, linger {LINGER:?}: every connection gone {last_end:?} after drain()"
    );
    drop((clients, h2, hang));
}
