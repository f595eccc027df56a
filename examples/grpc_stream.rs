//! A tonic server-streaming service under the tower-drain stack, with gRPC final frames.
//!
//! `demo.Ticker/Watch` streams a tick every `TICK_MS` until the client leaves; on a drain it
//! ends with the trailers `grpc-status: 14` (UNAVAILABLE) and the drain message, so the client
//! sees `Status::unavailable` and reconnects. `demo.Ticker/Export` sends `count` ticks and is
//! marked [`RunToCompletion`]: a drain lets it finish (within the grace period). New calls
//! while the server closes get a gRPC-shaped `UNAVAILABLE`, never a bare HTTP `503`.
//!
//! The messages are hand-written `prost` types, so no `protoc` or build script is needed:
//!
//! ```text
//! service Ticker {
//!   rpc Watch(WatchRequest) returns (stream Tick);
//!   rpc Export(WatchRequest) returns (stream Tick);
//! }
//! message WatchRequest { uint32 count = 1; }  // Watch: 0 = endless
//! message Tick { uint64 n = 1; }
//! ```
//!
//! ```text
//! cargo run --example grpc_stream        # ADDR (default 127.0.0.1:50051), TICK_MS (1000),
//!                                        # SHUTDOWN_GRACE_PERIOD, RECONNECT_DELAY, …
//! ```
//!
//! It prints `listening on http://ADDR`, drains on SIGTERM / SIGINT (a second signal cuts the
//! drain short), and prints the shutdown report as one JSON line before it exits.
//!
//! Connections are served by [`Connections`] rather than tonic's `Server`, whose
//! `serve_with_shutdown` has no per-connection control: each HTTP/2 connection gets GOAWAY
//! when `Closing` begins, so channels move their next calls to another backend, and any
//! connection still open at the hard deadline (grace + linger) is dropped. The services
//! go in a `tonic::service::Routes`, which is a plain tower service.
//!
//! With the `tonic-health` feature, gRPC health checking (`grpc.health.v1.Health`) is served too:
//! `demo.Ticker` and the server (`""`) report `SERVING`, and `NOT_SERVING` from the moment
//! the drain starts; `Check` is exempt from rejection, so it keeps answering while the
//! server closes.

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::service::Routes;
use tonic::Status;
use tonic_prost::ProstCodec;
use tower::ServiceBuilder;
use tower_drain::conn::Connections;
use tower_drain::frame::{self, RunToCompletion};
#[cfg(feature = "tonic-health")]
use tower_drain::health::DrainHealth;
use tower_drain::{DrainBuilder, DrainStack};

/// What `protoc` would have generated.
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct WatchRequest {
        #[prost(uint32, tag = "1")]
        pub(crate) count: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct Tick {
        #[prost(uint64, tag = "1")]
        pub(crate) n: u64,
    }
}

use proto::{Tick, WatchRequest};

type TickStream = Pin<Box<dyn Stream<Item = Result<Tick, Status>> + Send>>;

/// One streaming method: endless ticks (`Watch`) or `count` ticks that must not be cut short
/// (`Export`).
struct Ticks {
    every: Duration,
    export: bool,
}

impl ServerStreamingService<WatchRequest> for Ticks {
    type Response = Tick;
    type ResponseStream = TickStream;
    type Future = Ready<Result<tonic::Response<TickStream>, Status>>;

    fn call(&mut self, req: tonic::Request<WatchRequest>) -> Self::Future {
        let count = match req.into_inner().count {
            0 if !self.export => usize::MAX,
            n => n as usize,
        };
        let ticks = futures_util::stream::unfold(
            (tokio::time::interval(self.every), 0u64),
            |(mut interval, n)| async move {
                interval.tick().await;
                Some((Ok(Tick { n }), (interval, n + 1)))
            },
        )
        .take(count);
        let mut res = tonic::Response::new(Box::pin(ticks) as TickStream);
        if self.export {
            // An export cannot resume elsewhere: no UNAVAILABLE at `Closing`, only a forced
            // end if it outlives the grace period.
            res.extensions_mut().insert(RunToCompletion);
        }
        ready(Ok(res))
    }
}

/// The service as `tonic-build` would generate it: route by path, decode, stream, encode.
#[derive(Clone)]
struct TickerServer {
    every: Duration,
}

impl NamedService for TickerServer {
    const NAME: &'static str = "demo.Ticker";
}

impl tower::Service<http::Request<tonic::body::Body>> for TickerServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let export = match req.uri().path() {
            "/demo.Ticker/Watch" => false,
            "/demo.Ticker/Export" => true,
            _ => {
                return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) })
            }
        };
        let method = Ticks {
            every: self.every,
            export,
        };
        Box::pin(async move {
            let mut grpc = Grpc::new(ProstCodec::<Tick, WatchRequest>::default());
            Ok(grpc.server_streaming(method, req).await)
        })
    }
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
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:50051".into());
    let addr: std::net::SocketAddr = addr.parse().unwrap_or_else(|_| exit_with("invalid ADDR"));
    let every = std::env::var("TICK_MS").map_or(Ok(1000), |v| v.parse::<u64>());
    let every = Duration::from_millis(every.unwrap_or_else(|_| exit_with("invalid TICK_MS")));

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| exit_with(format!("cannot listen on {addr}: {e}")));
    println!("listening on http://{}", listener.local_addr().unwrap());
    std::io::stdout().flush().unwrap();

    // The stack goes around every route; `frame::Grpc` makes the final frame UNAVAILABLE
    // trailers. Health checks pass the reject layer (exempt by default).
    let routes = Routes::new(TickerServer { every });
    #[cfg(feature = "tonic-health")]
    let routes = {
        let (health, health_service) = DrainHealth::new(drain.watch());
        health.set_serving::<TickerServer>().await;
        routes.add_service(health_service)
    };
    let svc = ServiceBuilder::new()
        .layer(DrainStack::new(drain.watch()).encoder(frame::Grpc::new()))
        .service(routes);
    let server = tokio::spawn(Connections::new(drain.watch()).serve(listener, svc));

    let report = drain.report().await;
    // Every connection is closed, or dropped at the hard deadline, by then or just after.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    println!("{}", serde_json::json!({ "shutdown_report": report }));
}
