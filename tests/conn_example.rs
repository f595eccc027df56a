//! `examples/sse_server` drains its connections, driven over real sockets and signals:
//! GOAWAY on HTTP/2 when `Closing` begins, `connection: close` on HTTP/1.1 from then on, an
//! exit within a second of the grace deadline whatever the clients do, and a second SIGTERM
//! that cuts the drain short.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::example::Example;
use support::h2::{DATA, GOAWAY, H2, RST_STREAM};
use support::within;

async fn readyz_is_draining(addr: std::net::SocketAddr) -> bool {
    let res = support::fetch(addr, "/readyz").await;
    res.status() == 503
}

/// The measurement: 20 SSE streams on one h2c connection, a propagation delay of
/// 800 ms and a spread of 1.5 s. GOAWAY now comes when `Closing` begins (not when the server
/// stops), every stream still gets its shutdown event and ends with END_STREAM; an idle
/// HTTP/1.1 keep-alive connection is not closed, and its next answer carries
/// `connection: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_at_closing_and_connection_close_on_http1() {
    const N: usize = 20;
    let server = Example::start(
        "sse_server",
        &[
            ("TICK_MS", "100"),
            ("SHUTDOWN_GRACE_PERIOD", "10"),
            ("PROPAGATION_DELAY_MS", "800"),
            ("DRAIN_SPREAD_MS", "1500"),
            ("RECONNECT_DELAY", "2"),
        ],
    );
    let addr = server.addr;
    let mut h2 = H2::connect(addr).await;
    let mut ids = Vec::new();
    for _ in 0..N {
        ids.push(h2.get(addr, "/events").await);
    }
    let mut ticking = std::collections::HashSet::new();
    while ticking.len() < N {
        let f = within("first ticks", h2.next()).await.expect("a frame");
        if f.kind == DATA && String::from_utf8_lossy(&f.payload).contains("event: tick") {
            ticking.insert(f.stream);
        }
    }
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let head = support::read_http1_response(&mut idle).await;
    assert!(!head.contains("connection: close"), "{head}");

    let signalled = Instant::now();
    server.signal("-TERM");
    let mut goaway_at = None;
    let mut ended = 0;
    let mut ended_before_goaway = 0;
    let mut last_event = HashMap::new();
    while ended < N {
        let f = within("drain frames", h2.next())
            .await
            .expect("no EOF before every stream ended");
        match f.kind {
            GOAWAY => {
                assert!(f.last_stream_id() >= *ids.last().unwrap());
                if goaway_at.is_none() {
                    goaway_at = Some(signalled.elapsed());
                    ended_before_goaway = ended;
                    // `Closing` has begun and the spread still runs: the idle HTTP/1.1
                    // connection was not closed, and its next answer closes it.
                    idle.write_all(b"GET /status HTTP/1.1\r\nhost: x\r\n\r\n")
                        .await
                        .unwrap();
                    let head = support::read_http1_response(&mut idle).await;
                    assert!(head.starts_with("http/1.1 200"), "{head}");
                    assert!(head.contains("connection: close"), "{head}");
                    let mut rest = Vec::new();
                    let n = within("close", idle.read_to_end(&mut rest)).await.unwrap();
                    assert_eq!(n, 0, "nothing after the last response");
                }
            }
            RST_STREAM => panic!("stream {} reset", f.stream),
            DATA => {
                let text = String::from_utf8_lossy(&f.payload).into_owned();
                if let Some(ev) = text.split("\n\n").filter(|e| !e.is_empty()).last() {
                    last_event.insert(f.stream, ev.to_string());
                }
                ended += usize::from(f.ends_stream());
            }
            _ => ended += usize::from(f.ends_stream()),
        }
    }
    let goaway_at = goaway_at.expect("a GOAWAY");
    // At `Closing` (after the propagation delay), while the spread still had streams to end.
    assert!(goaway_at >= Duration::from_millis(800), "{goaway_at:?}");
    assert!(
        ended_before_goaway <= 1,
        "{ended_before_goaway} streams ended before GOAWAY"
    );
    for id in &ids {
        assert!(
            last_event[id].starts_with("event: shutdown\n"),
            "stream {id}: {:?}",
            last_event[id]
        );
    }
    let all_ended = signalled.elapsed();

    let exit = server.exit_within(Duration::from_secs(10)).await;
    assert_eq!(exit.code, Some(0), "{exit:?}");
    assert_eq!(exit.report()["closed_gracefully"], N, "{exit:?}");
    eprintln!(
        "GOAWAY {goaway_at:?} after SIGTERM (Closing at 800 ms); last stream ended at {all_ended:?}"
    );
}

/// Clients that stop reading: twenty HTTP/2 streams whose flow-control window is zero (the
/// server can send them nothing) and HTTP/1.1 clients that never read. The process exits
/// after the grace deadline (they cannot finish before it) and within a second of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_clients_cannot_hold_the_process_past_the_deadline() {
    const GRACE: Duration = Duration::from_secs(2);
    let server = Example::start(
        "sse_server",
        &[
            ("TICK_MS", "1"),
            ("SHUTDOWN_GRACE_PERIOD", "2"),
            ("RECONNECT_DELAY", "2"),
        ],
    );
    let addr = server.addr;
    let mut stuck = Vec::new();
    for _ in 0..20 {
        let mut h2 = H2::connect_with_window(addr, 0).await;
        h2.get(addr, "/events").await;
        stuck.push(h2);
    }
    let mut h1 = Vec::new();
    for _ in 0..20 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /events HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        h1.push(tcp);
    }
    // Every stream is registered before the signal (bounded).
    let mut tries = 0;
    let status = loop {
        tries += 1;
        assert!(tries < 500, "40 streams never opened");
        let mut res = support::fetch(addr, "/status").await;
        let body = http_body_util::BodyExt::collect(res.body_mut())
            .await
            .unwrap()
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if v["active_streams"] == 40 {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status["phase"], "serving");

    let exit = server
        .terminate_within(GRACE + Duration::from_secs(5))
        .await;
    assert_eq!(exit.code, Some(0), "{exit:?}");
    let report = exit.report();
    assert_eq!(report["streams_at_drain"], 40, "{report}");
    assert!(report["force_closed"].as_u64().unwrap() >= 20, "{report}");
    assert!(exit.after_signal >= GRACE, "{exit:?}");
    assert!(
        exit.after_signal < GRACE + Duration::from_secs(1),
        "exit {:?} after SIGTERM, grace {GRACE:?}",
        exit.after_signal
    );
    eprintln!(
        "grace {GRACE:?}: exit {:?} after SIGTERM, report {report}",
        exit.after_signal
    );
    drop((stuck, h1));
}

/// A second SIGTERM during the drain skips the rest of the propagation delay and of the
/// grace period: the open streams are force-closed at once (they still get a shutdown
/// event and end cleanly), and the report and exit follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_cuts_the_drain_short() {
    const N: usize = 3;
    let server = Example::start(
        "sse_server",
        &[
            ("TICK_MS", "50"),
            ("SHUTDOWN_GRACE_PERIOD", "60"),
            ("PROPAGATION_DELAY_MS", "30000"),
            ("RECONNECT_DELAY", "2"),
        ],
    );
    let addr = server.addr;
    let mut clients = Vec::new();
    for _ in 0..N {
        let mut c = support::SseClient::open(addr, "/events").await;
        within("first tick", c.next_event()).await.unwrap();
        clients.push(c);
    }
    server.signal("-TERM");
    // The first signal has been handled: the drain is under way (readiness fails).
    let mut draining = false;
    for _ in 0..500 {
        if readyz_is_draining(addr).await {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(draining, "the first SIGTERM started a drain");

    let exit = server.terminate_within(Duration::from_secs(10)).await;
    // Long before the propagation delay (30 s) would have ended.
    assert_eq!(exit.code, Some(0), "{exit:?}");
    let report = exit.report();
    assert_eq!(report["reason"], "signal", "{report}");
    assert_eq!(report["streams_at_drain"], N, "{report}");
    assert_eq!(report["force_closed"], N, "{report}");
    for c in &mut clients {
        let (events, end) = within("stream end", c.rest()).await;
        assert_eq!(end, Ok(()), "ends cleanly");
        let last = events.last().expect("the shutdown event");
        assert_eq!(last.event.as_deref(), Some("shutdown"), "{}", c.raw);
    }
    eprintln!(
        "second SIGTERM: exit {:?} after it, report {report}",
        exit.after_signal
    );
}
