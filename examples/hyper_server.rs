//! The tower-drain stack on a plain hyper 1.x server: your own accept loop, each connection
//! served by `conn::Connections::serve_connection`.
//!
//! hyper-util's `GracefulShutdown` waits for every response to finish, and an SSE stream
//! never does; it also acts only once the server stops. Here the drain drives each
//! connection instead:
//!
//! 1. SIGTERM / SIGINT start the drain (a second one cuts it short); new requests get `503`,
//!    every `/events` stream gets its shutdown frame and ends (streams still open at the
//!    grace deadline are force-closed);
//! 2. when `Closing` begins, HTTP/2 connections get GOAWAY and HTTP/1.1 responses carry
//!    `connection: close`;
//! 3. `drain.stopped()` ends the accept loop; idle connections close, and whatever is still
//!    open at the hard deadline (grace + linger) is dropped, so the loop below that waits
//!    for the connection tasks is bounded.
//!
//! ```text
//! cargo run --example hyper_server    # ADDR (default 127.0.0.1:3000), TICK_MS (1000),
//!                                     # SHUTDOWN_GRACE_PERIOD, RECONNECT_DELAY, …
//! ```
//!
//! It prints `listening on http://ADDR`, and the shutdown report as one JSON line at the end.

use std::convert::Infallible;
use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tower::ServiceBuilder;
use tower_drain::conn::Connections;
use tower_drain::{DrainBuilder, DrainStack};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// `/events`: one SSE `tick` every `every`; anything else: 404.
async fn app(req: Request<Incoming>, every: Duration) -> Result<Response<Body>, Infallible> {
    if req.uri().path() != "/events" {
        let mut res = Response::new(Full::new(Bytes::from("not found")).boxed_unsync());
        *res.status_mut() = StatusCode::NOT_FOUND;
        return Ok(res);
    }
    let ticks = futures_util::stream::unfold(
        (tokio::time::interval(every), 0u64),
        |(mut interval, n)| async move {
            interval.tick().await;
            let event = format!("event: tick\ndata: {{\"n\":{n}}}\n\n");
            let frame = Ok::<_, Infallible>(Frame::data(Bytes::from(event)));
            Some((frame, (interval, n + 1)))
        },
    );
    let mut res = Response::new(StreamBody::new(ticks).boxed_unsync());
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, "text/event-stream".parse().unwrap());
    h.insert(header::CACHE_CONTROL, "no-cache".parse().unwrap());
    Ok(res)
}

fn exit_with(msg: impl std::fmt::Display) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let drain = DrainBuilder::from_env()
        .and_then(DrainBuilder::build)
        .unwrap_or_else(|e| exit_with(e));
    drain.listen_for_signals();
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let every = std::env::var("TICK_MS").map_or(Ok(1000), |v| v.parse::<u64>());
    let every = Duration::from_millis(every.unwrap_or_else(|_| exit_with("invalid TICK_MS")));

    // Any tower service works; the stack goes around it.
    let svc = ServiceBuilder::new()
        .layer(DrainStack::new(drain.watch()))
        .service_fn(move |req| app(req, every));

    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .unwrap_or_else(|e| exit_with(format!("cannot listen on {addr}: {e}")));
    println!("listening on http://{}", listener.local_addr().unwrap());
    std::io::stdout().flush().unwrap();

    // HTTP/1.1 and h2c (prior knowledge) on one port.
    let conns = Connections::new(drain.watch());
    let mut tasks = tokio::task::JoinSet::new();
    let stopped = drain.stopped();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((tcp, _)) = conn else { continue };
                tasks.spawn(conns.serve_connection(tcp, svc.clone()));
            }
            // Reap finished connection tasks as they end.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            // Keep accepting while draining (new requests get a clean 503), stop once every
            // stream is gone or the grace period has force-closed the rest.
            () = &mut stopped => break,
        }
    }
    drop(listener);
    // Every connection ends by the hard deadline at the latest.
    while tasks.join_next().await.is_some() {}
    let report = drain.report().await;
    println!("{}", serde_json::json!({ "shutdown_report": report }));
}
