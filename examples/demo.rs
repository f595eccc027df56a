//! The whole story in one process: an SSE server under the tower-drain stack, 1,000 clients,
//! a drain, what each side saw, and the shutdown report.
//!
//! ```text
//! cargo run --release --example demo            # 1,000 clients
//! cargo run --release --example demo -- 200     # or another number
//! ```

use std::convert::Infallible;
use std::future::IntoFuture;
use std::time::{Duration, Instant};

use axum::response::sse::{Event, Sse};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tower_drain::{DrainController, DrainReason, DrainStack};

/// What one client saw.
struct Seen {
    ticks: usize,
    shutdown_after: Option<Duration>,
    retry_ms: Option<u64>,
    clean_end: bool,
}

async fn client(
    addr: std::net::SocketAddr,
    ready: tokio::sync::mpsc::Sender<()>,
    trigger: tokio::sync::watch::Receiver<Option<Instant>>,
) -> Seen {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::get("/events")
        .header("host", "demo")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let mut body = tx.send_request(req).await.expect("response").into_body();
    let mut seen = Seen {
        ticks: 0,
        shutdown_after: None,
        retry_ms: None,
        clean_end: false,
    };
    let mut text = String::new();
    let mut ready = Some(ready);
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                text.push_str(std::str::from_utf8(&data).unwrap_or(""));
                while let Some(end) = text.find("\n\n") {
                    let event: String = text.drain(..end + 2).collect();
                    if event.starts_with("event: tick") {
                        seen.ticks += 1;
                        if let Some(r) = ready.take() {
                            let _ = r.send(()).await;
                        }
                    } else if event.starts_with("event: shutdown") {
                        seen.shutdown_after = trigger.borrow().map(|t| t.elapsed());
                        seen.retry_ms = event
                            .lines()
                            .find_map(|l| l.strip_prefix("retry: "))
                            .and_then(|v| v.parse().ok());
                    }
                }
            }
            Some(Err(_)) => break,
            None => {
                seen.clean_end = true;
                break;
            }
        }
    }
    seen
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let drain = DrainController::builder()
        .grace_period(Duration::from_secs(10))
        .reconnect_delay(Duration::from_secs(5))
        .drain_spread(Duration::from_millis(500))
        .build()
        .expect("valid settings");

    let events = || async {
        let ticks = futures_util::stream::unfold(
            tokio::time::interval(Duration::from_millis(250)),
            |mut iv| async move {
                iv.tick().await;
                Some((
                    Ok::<_, Infallible>(Event::default().event("tick").data("{}")),
                    iv,
                ))
            },
        );
        Sse::new(ticks)
    };
    let app = Router::new()
        .route("/events", get(events))
        .layer(DrainStack::new(drain.watch()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(drain.stopped())
            .into_future(),
    );
    eprintln!("server on http://{addr}; opening {n} SSE streams…");

    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(n.max(1));
    let (trigger_tx, trigger_rx) = tokio::sync::watch::channel(None);
    let clients: Vec<_> = (0..n)
        .map(|_| tokio::spawn(client(addr, ready_tx.clone(), trigger_rx.clone())))
        .collect();
    drop(ready_tx);
    for _ in 0..n {
        ready_rx
            .recv()
            .await
            .expect("every client gets its first event");
    }
    eprintln!(
        "all {n} clients streaming ({} active on the server); draining…",
        drain.active_streams()
    );

    trigger_tx.send(Some(Instant::now())).unwrap();
    drain.drain(DrainReason::Programmatic("demo"));
    let report = drain.report().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;

    let mut seen = Vec::with_capacity(n);
    for c in clients {
        seen.push(c.await.expect("client task"));
    }
    let notified = seen.iter().filter(|s| s.shutdown_after.is_some()).count();
    let clean = seen.iter().filter(|s| s.clean_end).count();
    let mut arrivals: Vec<Duration> = seen.iter().filter_map(|s| s.shutdown_after).collect();
    arrivals.sort();
    let retries: Vec<u64> = seen.iter().filter_map(|s| s.retry_ms).collect();
    let ticks: usize = seen.iter().map(|s| s.ticks).sum();

    println!("clients: {n} opened, {ticks} tick events received in total");
    println!("clients: {notified}/{n} received the shutdown frame, {clean}/{n} saw a clean end of stream");
    println!(
        "clients: frames arrived {:.1} ms (p50) / {:.1} ms (p99) / {:.1} ms (max) after the drain started (spread over 500 ms)",
        percentile(&arrivals, 0.5),
        percentile(&arrivals, 0.99),
        percentile(&arrivals, 1.0)
    );
    if let (Some(min), Some(max)) = (retries.iter().min(), retries.iter().max()) {
        println!("clients: retry hints from {min} ms to {max} ms (5 s ± 20 % jitter), so reconnects do not stampede");
    }
    println!(
        "server:  {}",
        serde_json::json!({ "shutdown_report": report })
    );
}
