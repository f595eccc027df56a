//! The baseline for `examples/rolling_deploy.rs`: the reference server's routes as a plain
//! axum service would serve them, with no tower-drain layer at all.
//!
//! * `GET /events`: the same SSE ticks as `examples/sse_server.rs` (`event: tick`,
//!   `data: {"n":N}`, the first at once, then one every `TICK_MS`);
//! * `GET /ws`: the same WebSocket ticks (`{"n":N}` text messages);
//! * `GET /healthz`, `GET /readyz`: `200` while the process serves.
//!
//! Shutdown is what `axum::serve(..).with_graceful_shutdown(signal)` does on its own: at
//! `SIGTERM` it stops accepting (so the load balancer's checks fail with a refused
//! connection) and waits for every open response to finish. An SSE stream never finishes, so
//! the process stays until the orchestrator's `SIGKILL` at the end of the grace period, and
//! every open stream is cut then.
//!
//! ```text
//! ADDR=127.0.0.1:0 TICK_MS=1000 cargo run --example baseline_server
//! ```
//!
//! Prints `listening on http://ADDR` once it listens, like the reference server.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::SinkExt;
use http::{header, HeaderValue, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

fn ticks(every: Duration) -> impl futures_util::Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold(
        (tokio::time::interval(every), 0u64),
        |(mut interval, n)| async move {
            interval.tick().await;
            let event = Event::default()
                .event("tick")
                .data(format!("{{\"n\":{n}}}"));
            Some((Ok(event), (interval, n + 1)))
        },
    )
}

/// `GET /ws`: the upgrade by hand (hyper's `upgrade::on`), then one text message per tick.
async fn ws(req: Request, every: Duration) -> Response {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return (StatusCode::BAD_REQUEST, "not a WebSocket upgrade").into_response();
    };
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(io) = upgrade.await else { return };
        let mut socket =
            WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None).await;
        let mut interval = tokio::time::interval(every);
        for n in 0u64.. {
            interval.tick().await;
            let msg = Message::text(format!("{{\"n\":{n}}}"));
            if socket.send(msg).await.is_err() {
                return;
            }
        }
    });
    let accept = derive_accept_key(key.as_bytes());
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .expect("a valid response")
}

#[tokio::main]
async fn main() {
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let addr: SocketAddr = addr.parse().unwrap_or_else(|_| {
        eprintln!("error: invalid ADDR: expected host:port, got {addr:?}");
        std::process::exit(2)
    });
    let tick = std::env::var("TICK_MS").map_or(Ok(1000), |v| v.trim().parse::<u64>());
    let tick = match tick {
        Ok(ms) if ms > 0 => Duration::from_millis(ms),
        _ => {
            eprintln!("error: invalid TICK_MS: must be a whole number greater than zero");
            std::process::exit(2)
        }
    };

    let app = Router::new()
        .route(
            "/events",
            get(move || async move {
                let mut res = Sse::new(ticks(tick)).into_response();
                res.headers_mut()
                    .insert("x-accel-buffering", HeaderValue::from_static("no"));
                res
            }),
        )
        .route("/ws", get(move |req: Request| ws(req, tick)))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ready" }));

    // SO_REUSEADDR and a deep backlog, as the reference server has.
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    if let Err(e) = socket.bind(addr) {
        eprintln!("error: cannot listen on {addr}: {e}");
        std::process::exit(1);
    }
    let listener = socket.listen(1024).expect("listen");
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "listening on http://{}",
            listener.local_addr().unwrap()
        )
        .unwrap();
        out.flush().unwrap();
    }

    let signal = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await
        .expect("serve");
}
