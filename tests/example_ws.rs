//! The example server's `GET /ws` contract, driven over real sockets and signals: ticks
//! `{"n":N}` from the first at once, counted as streams, `1001` for every socket at a drain,
//! the report counting them, and a socket that never answers force-closed at the deadline.
//! (The binary is built by `cargo test`; `cargo test --test example_ws` alone does not rebuild
//! it after a change to the example.)

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

use support::example::Example;
use support::WATCHDOG;

type Client = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(addr: SocketAddr) -> Client {
    let (mut ws, res) = connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("upgrade");
    assert_eq!(res.status(), 101);
    // The first tick comes at once.
    let first = tokio::time::timeout(WATCHDOG, ws.next()).await.unwrap();
    match first {
        Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "{\"n\":0}"),
        other => panic!("want the first tick, got {other:?}"),
    }
    ws
}

async fn active_streams(addr: SocketAddr) -> u64 {
    use http_body_util::BodyExt;
    let res = support::fetch(addr, "/status").await;
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["active_streams"].as_u64().unwrap()
}

/// Reads ticks (in order) until the close frame; returns its code and reason.
async fn until_close(mut ws: Client) -> (u16, String) {
    let mut next_n = 1u64;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                assert_eq!(t.as_str(), format!("{{\"n\":{next_n}}}"));
                next_n += 1;
            }
            Some(Ok(Message::Close(Some(f)))) => {
                let got = (u16::from(f.code), f.reason.as_str().to_owned());
                // tungstenite answers; the server then closes the connection.
                let end = ws.next().await;
                assert!(!matches!(end, Some(Ok(_))), "{end:?}");
                return got;
            }
            other => panic!("ended without a close frame: {other:?}"),
        }
    }
}

#[tokio::test]
async fn fifty_sockets_all_get_1001_and_the_report_counts_them() {
    let server = Example::start(
        "sse_server",
        &[("TICK_MS", "100"), ("DRAIN_SPREAD_MS", "500")],
    );
    let addr = server.addr;
    let mut sockets = Vec::new();
    for _ in 0..50 {
        sockets.push(open(addr).await);
    }
    assert_eq!(active_streams(addr).await, 50);

    let readers: Vec<_> = sockets
        .into_iter()
        .map(|ws| tokio::spawn(until_close(ws)))
        .collect();
    let exit = server.terminate_within(Duration::from_secs(10)).await;
    for r in readers {
        let (code, reason) = r.await.unwrap();
        assert_eq!(code, 1001);
        assert!(!reason.is_empty());
    }
    assert_eq!(exit.code, Some(0));
    let report = exit.report();
    assert_eq!(report["reason"], "signal");
    assert_eq!(report["streams_at_drain"], 50);
    assert_eq!(report["notified"], 50);
    assert_eq!(report["closed_gracefully"], 50);
    assert_eq!(report["force_closed"], 0);
    // The default grace period is 20 s; the drain needs the 0.5 s spread and round trips.
    assert!(
        exit.after_signal < Duration::from_secs(5),
        "{:?}",
        exit.after_signal
    );
}

#[tokio::test]
async fn a_socket_that_never_answers_is_force_closed_at_the_deadline() {
    let server = Example::start(
        "sse_server",
        &[("TICK_MS", "100"), ("SHUTDOWN_GRACE_PERIOD", "1")],
    );
    let addr = server.addr;
    // Read nothing after the first tick: tungstenite answers a close frame only when read.
    let deaf = open(addr).await;
    let polite = open(addr).await;
    let reader = tokio::spawn(until_close(polite));
    let before_signal = std::time::Instant::now();
    let exit = server.terminate_within(Duration::from_secs(10)).await;
    let exited_after = before_signal.elapsed();
    assert_eq!(reader.await.unwrap().0, 1001);
    let report = exit.report();
    assert_eq!(report["streams_at_drain"], 2);
    assert_eq!(report["notified"], 2);
    assert_eq!(report["closed_gracefully"], 1);
    assert_eq!(report["force_closed"], 1);
    assert!(exited_after >= Duration::from_secs(1), "{exited_after:?}");
    assert!(
        exit.after_signal < Duration::from_secs(3),
        "exits within 1 s of the deadline: {:?}",
        exit.after_signal
    );
    drop(deaf);
}
