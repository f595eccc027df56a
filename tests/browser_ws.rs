//! Chromium's own `WebSocket` across a drain, driven through `chromedriver` with fantoccini.
//!
//! * A page holds a `WebSocket` to server A. A drains: the page's `close` event has code
//!   `1001`, the server's reason and `wasClean === true`; the page's own reconnect (a timer
//!   after `close`) reaches server B, started on the same port once A has stopped.
//! * A page holds an `EventSource` and a `WebSocket` at once: one drain ends both (the SSE
//!   shutdown event, the `1001` close), and one report counts both.
//!
//! Needs `chromium` and `chromedriver` (Debian: `apt-get install chromium chromium-driver`;
//! `.ci/run` installs them). `CHROMIUM` / `CHROMEDRIVER` override the binaries. Without them
//! the tests fail, naming the packages: they never pass silently.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::sse::{Event, Sse};
use axum::response::Html;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use support::browser::Browser;
use tower_drain::ws::{self, WsHandle, DEFAULT_DRAIN_REASON};
use tower_drain::{DrainController, DrainReason, DrainStack, ShutdownReport};

use support::WATCHDOG;
const TICK: Duration = Duration::from_millis(100);

/// The page: `?ws=1` opens a WebSocket on `/ws` (and reopens it 300 ms after every close while
/// `reconnect` is on), `?sse=1` an EventSource on `/events`. Everything is recorded in
/// `window.rec`; `window.until(test)` resolves once `test(rec)` holds.
const PAGE: &str = r#"<!doctype html><html><body><script>
const params = new URLSearchParams(location.search);
const rec = [];
window.rec = rec;
const waiters = [];
function push(r) {
  r.t = performance.now();
  rec.push(r);
  for (const w of waiters.splice(0)) { if (w.test(rec)) w.resolve(rec); else waiters.push(w); }
}
window.until = (test) => new Promise((resolve) => {
  if (test(rec)) resolve(rec); else waiters.push({ test, resolve });
});
function openWs() {
  const ws = new WebSocket('ws://' + location.host + '/ws');
  ws.onopen = () => push({ kind: 'ws-open' });
  ws.onmessage = (e) => push({ kind: 'ws-msg', data: e.data });
  ws.onclose = (e) => {
    push({ kind: 'ws-close', code: e.code, reason: e.reason, wasClean: e.wasClean });
    if (params.get('reconnect') === '1') setTimeout(openWs, 300);
  };
}
if (params.get('ws') === '1') openWs();
if (params.get('sse') === '1') {
  const es = new EventSource('/events');
  es.addEventListener('tick', (e) => push({ kind: 'sse-tick', data: e.data }));
  es.addEventListener('shutdown', (e) => { push({ kind: 'sse-shutdown', data: e.data }); es.close(); });
}
</script></body></html>"#;

// ---------------------------------------------------------------------------------------
// The servers: the page outside the stack, `/ws` and `/events` under it.

struct Server {
    addr: SocketAddr,
    drain: DrainController,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn socket_loop(mut socket: WebSocket, mut handle: WsHandle, name: &'static str) {
    let mut every = tokio::time::interval(TICK);
    let mut n = 0u64;
    loop {
        tokio::select! {
            cause = handle.notified() => {
                ws::close(socket, handle, cause).await;
                return;
            }
            _ = every.tick() => {
                let text = json!({ "server": name, "n": n }).to_string();
                if socket.send(Message::text(text)).await.is_err() {
                    return;
                }
                n += 1;
            }
            msg = socket.recv() => match msg {
                Some(Ok(_)) => {}
                _ => return,
            },
        }
    }
}

/// Serves on `port` (0: any) with `SO_REUSEADDR`, until its drain stops.
async fn start_server(name: &'static str, port: u16) -> Server {
    start_server_with_grace(name, port, Duration::from_secs(5)).await
}

async fn start_server_with_grace(name: &'static str, port: u16, grace: Duration) -> Server {
    let drain = DrainController::builder()
        .propagation_delay(Duration::ZERO)
        .grace_period(grace)
        .reconnect_delay(Duration::from_secs(1))
        .build()
        .unwrap();
    let streams = Router::new()
        .route(
            "/ws",
            get(
                move |upgrade: WebSocketUpgrade, handle: WsHandle| async move {
                    upgrade.on_upgrade(move |socket| socket_loop(socket, handle, name))
                },
            ),
        )
        .route(
            "/events",
            get(|| async {
                let ticks = futures_util::stream::unfold(0u64, |n| async move {
                    tokio::time::sleep(TICK).await;
                    Some((
                        Ok::<_, Infallible>(Event::default().event("tick").data(n.to_string())),
                        n + 1,
                    ))
                });
                Sse::new(ticks)
            }),
        )
        .layer(DrainStack::new(drain.watch()));
    let app = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        // Outside the stack, so that the browser's own request is never rejected.
        .route(
            "/favicon.ico",
            get(|| async { http::StatusCode::NO_CONTENT }),
        )
        .merge(streams);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .unwrap();
    let listener = socket.listen(1024).unwrap();
    let addr = listener.local_addr().unwrap();
    let stopped = drain.stopped();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
    });
    Server { addr, drain, task }
}

impl Server {
    /// Drains, waits for the report and for the server to stop listening.
    async fn drain(self) -> ShutdownReport {
        self.drain.drain(DrainReason::Manual);
        let report = tokio::time::timeout(WATCHDOG, self.drain.report())
            .await
            .expect("the drain ends");
        // Upgraded connections are not the server's to wait for: it stops at `Stopped`.
        tokio::time::timeout(WATCHDOG, self.task)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
        report
    }
}

fn kind(r: &Value) -> &str {
    r["kind"].as_str().unwrap_or("")
}

fn summary(rec: &[Value]) -> String {
    rec.iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The server named in a WebSocket message.
fn server_of(r: &Value) -> Option<String> {
    let data: Value = serde_json::from_str(r["data"].as_str()?).ok()?;
    data["server"].as_str().map(String::from)
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_websocket_gets_a_clean_1001_then_reconnects_to_the_next_server() {
    let browser = Browser::start().await;
    let a = start_server("a", 0).await;
    let port = a.addr.port();
    browser
        .goto(&format!("http://{}/?ws=1&reconnect=1", a.addr))
        .await;
    browser
        .until(
            "2 messages from A",
            "(r) => r.filter((e) => e.kind === 'ws-msg').length >= 2",
        )
        .await;

    let report = a.drain().await;
    assert_eq!(report.streams_at_drain, 1);
    assert_eq!(report.notified, 1);
    assert_eq!(report.closed_gracefully, 1);
    assert_eq!(report.force_closed, 0);

    let rec = browser
        .until("the close", "(r) => r.some((e) => e.kind === 'ws-close')")
        .await;
    let close = rec.iter().find(|r| kind(r) == "ws-close").unwrap();
    assert_eq!(close["code"], 1001, "{}", summary(&rec));
    assert_eq!(close["reason"], DEFAULT_DRAIN_REASON, "{}", summary(&rec));
    assert_eq!(close["wasClean"], true, "{}", summary(&rec));

    // A is gone; B takes the same port, and the page's own reconnect finds it.
    let b = start_server("b", port).await;
    let rec = browser
        .until(
            "a message from B",
            "(r) => r.some((e) => e.kind === 'ws-msg' && JSON.parse(e.data).server === 'b')",
        )
        .await;
    let first_b = rec
        .iter()
        .position(|r| server_of(r).as_deref() == Some("b"))
        .unwrap();
    // Between A's clean close and B's first message: only failed attempts (A stopping, or the
    // port closed), which a browser shows as 1006.
    let after = &rec[rec.iter().position(|r| kind(r) == "ws-close").unwrap() + 1..first_b];
    for r in after.iter().filter(|r| kind(r) == "ws-close") {
        assert_eq!(r["code"], 1006, "{}", summary(&rec));
        assert_eq!(r["wasClean"], false, "{}", summary(&rec));
    }
    assert!(
        rec[..first_b]
            .iter()
            .all(|r| kind(r) != "ws-msg" || server_of(r).as_deref() == Some("a")),
        "{}",
        summary(&rec)
    );
    b.drain.drain(DrainReason::Manual);
    drop(browser);
    let _ = tokio::time::timeout(WATCHDOG, b.drain.report()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_event_source_and_websocket_drain_in_one_report() {
    let browser = Browser::start().await;
    let a = start_server("a", 0).await;
    browser
        .goto(&format!("http://{}/?ws=1&sse=1", a.addr))
        .await;
    browser
        .until(
            "a WebSocket message and an SSE tick",
            "(r) => r.some((e) => e.kind === 'ws-msg') && r.some((e) => e.kind === 'sse-tick')",
        )
        .await;
    assert_eq!(a.drain.active_streams(), 2);

    let report = a.drain().await;
    let rec = browser
        .until(
            "the close and the shutdown event",
            "(r) => r.some((e) => e.kind === 'ws-close') && r.some((e) => e.kind === 'sse-shutdown')",
        )
        .await;
    let close = rec.iter().find(|r| kind(r) == "ws-close").unwrap();
    assert_eq!(
        (close["code"].as_u64(), close["wasClean"].as_bool()),
        (Some(1001), Some(true)),
        "{}",
        summary(&rec)
    );
    let shutdown = rec.iter().find(|r| kind(r) == "sse-shutdown").unwrap();
    let data: Value = serde_json::from_str(shutdown["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["type"], "shutdown");
    assert_eq!(report.streams_at_drain, 2);
    assert_eq!(report.notified, 2);
    assert_eq!(report.closed_gracefully, 2);
    assert_eq!(report.force_closed, 0);
}

/// What a page sees of a rejected handshake: the `503` is not exposed; the socket closes with
/// `1006` and `wasClean === false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_sees_an_upgrade_rejected_while_closing_as_1006() {
    use futures_util::StreamExt;

    let browser = Browser::start().await;
    let a = start_server_with_grace("a", 0, Duration::from_secs(10)).await;
    // The page loads while A serves; its socket opens only once A is closing.
    browser.goto(&format!("http://{}/", a.addr)).await;
    // A client that does not read keeps A in `Closing` until it leaves.
    let (mut deaf, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", a.addr))
        .await
        .unwrap();
    let _ = deaf.next().await;
    a.drain.drain(DrainReason::Manual);
    a.drain.closing().await;

    browser.client.execute("openWs();", vec![]).await.unwrap();
    let rec = browser
        .until("the close", "(r) => r.some((e) => e.kind === 'ws-close')")
        .await;
    let close = rec.iter().find(|r| kind(r) == "ws-close").unwrap();
    assert_eq!(close["code"], 1006, "{}", summary(&rec));
    assert_eq!(close["wasClean"], false, "{}", summary(&rec));
    assert!(
        rec.iter().all(|r| kind(r) != "ws-open"),
        "{}",
        summary(&rec)
    );

    drop(deaf); // the server's socket sees the peer leave and ends
    let report = a.drain().await;
    assert_eq!(report.rejected, 1, "{report:?}");
    assert_eq!((report.closed_gracefully, report.force_closed), (1, 0));
}
