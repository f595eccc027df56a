//! A real browser across a drain: Debian's headless Chromium, driven through `chromedriver`
//! (W3C WebDriver), loads a page whose script opens a native `EventSource` on `/events` and
//! records every event. Server A drains; server B then starts on the same port.
//!
//! * Plain `503` (the default): the browser's reconnect to draining A gets `503`, which the
//!   SSE spec makes fatal, and the `EventSource` ends `CLOSED` for good.
//! * `sse_retry`: the reconnect gets `200` with only the shutdown frame; the browser retries
//!   by itself after the frame's `retry:` delay, reaches B, sends `Last-Event-ID` and receives
//!   B's events.
//!
//! The WebDriver client is the `fantoccini` crate.
//!
//! Needs `chromium` and `chromedriver` (Debian: `apt-get install chromium chromium-driver`;
//! `.ci/run` installs them). `CHROMIUM` / `CHROMEDRIVER` override the binaries. Without them
//! the tests fail, naming the packages: they never pass silently.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{Html, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use support::browser::Browser;
use tokio::sync::{mpsc, oneshot};
use tower_drain::{DrainController, DrainReason, DrainStack};

const PAGE: &str = include_str!("assets/eventsource.html");
const TICK: Duration = Duration::from_millis(100);
/// The `retry:` the servers send (no jitter, so the timing can be checked).
const RETRY: Duration = Duration::from_millis(1000);
/// Chromium's own reconnection time when no `retry:` was received.
const BROWSER_DEFAULT_RETRY: Duration = Duration::from_millis(3000);
use support::WATCHDOG;

// ---------------------------------------------------------------------------------------
// The servers: the page outside the stack, `/events` under it.

/// What a server saw of one `/events` request.
#[derive(Debug)]
struct Seen {
    server: &'static str,
    last_event_id: Option<String>,
    status: u16,
}

struct Server {
    addr: SocketAddr,
    drain: DrainController,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Stops accepting and waits until the listener is closed.
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WATCHDOG, self.task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

fn ticks(server: &'static str) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let s = futures_util::stream::unfold(
        (tokio::time::interval(TICK), 0u64),
        move |(mut iv, n)| async move {
            iv.tick().await;
            let ev = Event::default()
                .event("tick")
                .id(format!("{server}-{n}"))
                .data(json!({ "server": server, "n": n }).to_string());
            Some((Ok(ev), (iv, n + 1)))
        },
    );
    Sse::new(s)
}

/// Server `name` on `port` (0: any free port) of 127.0.0.1, reporting every `/events` request.
async fn start_server(
    name: &'static str,
    port: u16,
    sse_retry: bool,
    seen: mpsc::UnboundedSender<Seen>,
) -> Server {
    let drain = DrainController::builder()
        .reconnect_delay(RETRY)
        .reconnect_jitter(0.0)
        .grace_period(Duration::from_secs(30))
        .build()
        .unwrap();
    let events = Router::new().route("/events", get(move || async move { ticks(name) }));
    let stack = DrainStack::new(drain.watch());
    let events = if sse_retry {
        events.layer(stack.reject(|r| r.sse_retry()))
    } else {
        events.layer(stack)
    };
    let events = events.layer(middleware::from_fn(move |req: Request, next: Next| {
        let seen = seen.clone();
        async move {
            if req.uri().path() != "/events" {
                return next.run(req).await;
            }
            let last_event_id = req
                .headers()
                .get("last-event-id")
                .map(|v| v.to_str().unwrap().to_owned());
            let res: Response = next.run(req).await;

            let _ = seen.send(Seen {
                server: name,
                last_event_id,
                status: res.status().as_u16(),
            });
            res
        }
    }));
    let app = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .merge(events);

    // SO_REUSEADDR, so B can take A's port the moment A has closed it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .unwrap_or_else(|e| panic!("server {name}: bind 127.0.0.1:{port}: {e}"));
    let listener = socket.listen(1024).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    Server {
        addr,
        drain,
        stop,
        task,
    }
}

async fn next_seen(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(WATCHDOG, rx.recv())
        .await
        .expect("timed out waiting for an /events request")
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Reading the record.

fn kind(r: &Value) -> &str {
    r["kind"].as_str().unwrap()
}

fn at(r: &Value) -> f64 {
    r["t"].as_f64().unwrap()
}

/// `readyState` values.
const CONNECTING: u64 = 0;
const CLOSED: u64 = 2;

fn summary(rec: &[Value]) -> String {
    rec.iter()
        .map(|r| {
            format!(
                "{:>7.0}ms {:<8} state={} id={} data={}",
                at(r),
                kind(r),
                r["state"],
                r["id"],
                r["data"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The tick records from server `name`, as (id, n).
fn ticks_from(rec: &[Value], name: &str) -> Vec<(String, u64)> {
    rec.iter()
        .filter(|r| kind(r) == "tick")
        .map(|r| {
            let data: Value = serde_json::from_str(r["data"].as_str().unwrap()).unwrap();
            (
                r["id"].as_str().unwrap().to_owned(),
                data["n"].as_u64().unwrap(),
                data["server"].as_str().unwrap().to_owned(),
            )
        })
        .filter(|(_, _, s)| s == name)
        .map(|(id, n, _)| (id, n))
        .collect()
}

/// Checks a received shutdown event: the frame's JSON, and `lastEventId` left at `last_id`.
fn assert_shutdown_event(r: &Value, last_id: &str, rec: &[Value]) {
    let data: Value = serde_json::from_str(r["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["type"], "shutdown", "{}", summary(rec));
    assert_eq!(data["reconnect_delay"], 1, "{}", summary(rec));
    assert_eq!(data["reason"], "manual", "{}", summary(rec));
    assert_eq!(r["id"], last_id, "the frame has no id:\n{}", summary(rec));
}

/// The stream ended (`error` with `CONNECTING`) and the next `open` came about `RETRY` later.
fn assert_reconnected_after_retry(error: &Value, open: &Value, rec: &[Value]) {
    assert_eq!(kind(error), "error", "{}", summary(rec));
    assert_eq!(error["state"], CONNECTING, "{}", summary(rec));
    assert_eq!(kind(open), "open", "{}", summary(rec));
    let gap = at(open) - at(error);
    let (lo, hi) = (
        RETRY.as_millis() as f64 * 0.9,
        BROWSER_DEFAULT_RETRY.as_millis() as f64 * 0.8,
    );
    assert!(
        (lo..hi).contains(&gap),
        "reconnected {gap:.0} ms after the stream ended; expected about the retry: of {} ms\n{}",
        RETRY.as_millis(),
        summary(rec)
    );
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_503_leaves_the_browser_event_source_closed() {
    let browser = Browser::start().await;
    let (tx, mut seen) = mpsc::unbounded_channel();
    let a = start_server("a", 0, false, tx.clone()).await;
    browser.goto(&format!("http://{}/", a.addr)).await;

    let rec = browser
        .until(
            "3 ticks from A",
            "(r) => r.filter((e) => e.kind === 'tick').length >= 3",
        )
        .await;
    assert_eq!(kind(&rec[0]), "open", "{}", summary(&rec));
    let first = next_seen(&mut seen).await;
    assert_eq!((first.server, first.status), ("a", 200));
    assert_eq!(first.last_event_id, None);

    // Drain A. The page gets the shutdown frame, the stream ends, the browser reconnects after
    // `retry:` ... into A, which is still closing, and answers 503.
    a.drain.drain(DrainReason::Manual);
    let rec = browser
        .until(
            "the EventSource to close",
            "(r) => r.some((e) => e.kind === 'error' && e.state === 2)",
        )
        .await;
    let retry = next_seen(&mut seen).await;
    assert_eq!((retry.server, retry.status), ("a", 503), "{retry:?}");

    let a_ticks = ticks_from(&rec, "a");
    let last_id = a_ticks.last().unwrap().0.clone();
    assert_eq!(retry.last_event_id.as_deref(), Some(last_id.as_str()));
    let shutdown = rec.iter().position(|r| kind(r) == "shutdown");
    let shutdown = shutdown.unwrap_or_else(|| panic!("no shutdown event:\n{}", summary(&rec)));
    assert_shutdown_event(&rec[shutdown], &last_id, &rec);
    // After the frame: the stream ends (error, CONNECTING), one retry, then error with CLOSED.
    let after: Vec<_> = rec[shutdown + 1..].iter().collect();
    assert_eq!(after.len(), 2, "{}", summary(&rec));
    assert_eq!(
        (kind(after[0]), &after[0]["state"]),
        ("error", &json!(CONNECTING))
    );
    assert_eq!(
        (kind(after[1]), &after[1]["state"]),
        ("error", &json!(CLOSED))
    );
    let gap = at(after[1]) - at(after[0]);
    assert!(
        gap >= RETRY.as_millis() as f64 * 0.9,
        "the 503 came {gap:.0} ms after the stream ended; the retry: was not honoured"
    );

    // B takes over the port. A CLOSED EventSource never tries again (there is no signal for
    // "nothing happens", so give it two retry periods).
    let port = a.addr.port();
    a.stop().await;
    let b = start_server("b", port, false, tx).await;
    tokio::time::sleep(RETRY * 2).await;
    assert!(seen.try_recv().is_err(), "B was contacted");
    let rec = browser.record().await;
    assert_eq!(kind(rec.last().unwrap()), "error", "{}", summary(&rec));
    assert!(ticks_from(&rec, "b").is_empty(), "{}", summary(&rec));
    eprintln!("what the page recorded:\n{}", summary(&rec));

    drop(browser);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_retry_lets_the_browser_reconnect_by_itself_to_the_next_server() {
    let browser = Browser::start().await;
    let (tx, mut seen) = mpsc::unbounded_channel();
    let a = start_server("a", 0, true, tx.clone()).await;
    browser.goto(&format!("http://{}/", a.addr)).await;

    browser
        .until(
            "3 ticks from A",
            "(r) => r.filter((e) => e.kind === 'tick').length >= 3",
        )
        .await;
    let first = next_seen(&mut seen).await;
    assert_eq!((first.server, first.status), ("a", 200));

    // Drain A. The browser's reconnect (after `retry:`) lands on A, still closing, which
    // answers 200 with only the shutdown frame; as soon as A has answered, A goes away and B
    // takes its port.
    a.drain.drain(DrainReason::Manual);
    let rejected = next_seen(&mut seen).await;
    assert_eq!(
        (rejected.server, rejected.status),
        ("a", 200),
        "{rejected:?}"
    );
    let port = a.addr.port();
    a.stop().await;
    let b = start_server("b", port, true, tx).await;

    let rec = browser
        .until(
            "2 ticks from B",
            "(r) => r.filter((e) => e.kind === 'tick' && JSON.parse(e.data).server === 'b').length >= 2",
        )
        .await;
    let resumed = next_seen(&mut seen).await;
    assert_eq!((resumed.server, resumed.status), ("b", 200), "{resumed:?}");

    // Never CLOSED: the browser kept reconnecting by itself.
    assert!(
        rec.iter().all(|r| r["state"] != CLOSED),
        "the EventSource closed:\n{}",
        summary(&rec)
    );
    // A's events, then B's, with the ids they were sent with.
    let a_ticks = ticks_from(&rec, "a");
    let last_id = a_ticks.last().unwrap().0.clone();
    for (i, (id, n)) in a_ticks.iter().enumerate() {
        assert_eq!((id.as_str(), *n), (format!("a-{i}").as_str(), i as u64));
    }
    let b_ticks = ticks_from(&rec, "b");
    assert_eq!(b_ticks[0], ("b-0".to_owned(), 0), "{}", summary(&rec));
    // `Last-Event-ID`: A's last id, on the rejected reconnect and on the one that reached B.
    assert_eq!(rejected.last_event_id.as_deref(), Some(last_id.as_str()));
    assert_eq!(resumed.last_event_id.as_deref(), Some(last_id.as_str()));

    // Two shutdown frames: the one ending A's stream and the rejection's; each followed by the
    // stream's end and, about `retry:` later, the browser's own reconnect.
    let shutdowns: Vec<usize> = (0..rec.len())
        .filter(|&i| kind(&rec[i]) == "shutdown")
        .collect();
    assert_eq!(shutdowns.len(), 2, "{}", summary(&rec));
    for &i in &shutdowns {
        assert_shutdown_event(&rec[i], &last_id, &rec);
        assert_reconnected_after_retry(&rec[i + 1], &rec[i + 2], &rec);
    }
    assert_eq!(kind(&rec[shutdowns[1] + 3]), "tick", "{}", summary(&rec));
    eprintln!("what the page recorded:\n{}", summary(&rec));

    drop(browser);
    b.stop().await;
}
