//! `examples/hyper_server` (the stack on plain hyper, connections served by `conn::Connections`)
//! stops within the grace period although streams are open when SIGTERM arrives.

mod support;

use std::time::Duration;

use support::example::Example;
use support::{within, SseClient};

const GRACE: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_open_streams_stops_the_server_within_the_grace_period() {
    const N: usize = 5;
    let server = Example::start(
        "hyper_server",
        &[
            ("TICK_MS", "20"),
            ("SHUTDOWN_GRACE_PERIOD", "5"),
            ("RECONNECT_DELAY", "2"),
        ],
    );
    let addr = server.addr;
    let mut clients = Vec::new();
    for _ in 0..N {
        let mut c = SseClient::open(addr, "/events").await;
        let first = within("first tick", c.next_event()).await.unwrap();
        assert_eq!(first.event.as_deref(), Some("tick"));
        clients.push(c);
    }

    // Each client keeps its connection (keep-alive) after its stream ends, so hyper's
    // GracefulShutdown has connections to close too.
    let exit = tokio::spawn(server.terminate_within(GRACE + Duration::from_secs(3)));
    for c in &mut clients {
        let (events, end) = within("stream end", c.rest()).await;
        assert_eq!(end, Ok(()), "the chunked body ends cleanly");
        let last = events.last().expect("the shutdown event");
        assert_eq!(last.event.as_deref(), Some("shutdown"), "{}", c.raw);
        assert_eq!(last.json()["reconnect_delay"], 2);
        let retry = last.retry.expect("a retry: line");
        assert!((1600..=2400).contains(&retry), "retry {retry}");
        assert!(events[..events.len() - 1]
            .iter()
            .all(|e| e.event.as_deref() == Some("tick")));
        assert_eq!(c.leftover(), "", "nothing after the last whole event");
    }

    let exit = within("server exit", exit).await.unwrap();
    assert_eq!(exit.code, Some(0), "{exit:?}");
    assert!(exit.after_signal < GRACE, "{exit:?}");
    let report = exit.report();
    assert_eq!(report["reason"], "signal", "{report}");
    assert_eq!(report["streams_at_drain"], N, "{report}");
    assert_eq!(report["notified"], N, "{report}");
    assert_eq!(report["closed_gracefully"], N, "{report}");
    assert_eq!(report["force_closed"], 0, "{report}");

    // And the port is closed: new connections are refused.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
