//! The tower-drain stack on a plain hyper 1.x server, with hyper-util's `GracefulShutdown`.
//!
//! hyper's graceful shutdown waits for every response to finish, and an SSE stream never
//! does. The drain controller closes the streams first; this example shows where its futures
//! plug into the accept loop:
//!
//! 1. SIGTERM / SIGINT start the drain; new requests get `503`, every `/events` stream gets
//!    its shutdown frame and ends (streams still open at the grace deadline are force-closed);
//! 2. `drain.stopped()` ends the accept loop once no stream is left;
//! 3. `GracefulShutdown::shutdown()` then has only idle keep-alive connections to close.
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
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
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

    let http = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let stopped = drain.stopped();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((tcp, _)) = conn else { continue };
                let conn = http.serve_connection_with_upgrades(
                    TokioIo::new(tcp),
                    TowerToHyperService::new(svc.clone()),
                );
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            // Keep accepting while draining (new requests get a clean 503), stop once every
            // stream is gone or the grace period has force-closed the rest.
            () = &mut stopped => break,
        }
    }
    drop(listener);

    // Only idle keep-alive connections remain; bound the wait anyway, as hyper-util's own
    // example does.
    if tokio::time::timeout(Duration::from_secs(2), graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!("some connections did not close in time; exiting anyway");
    }
    let report = drain.report().await;
    println!("{}", serde_json::json!({ "shutdown_report": report }));
}
