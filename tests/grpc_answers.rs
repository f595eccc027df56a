//! Every answer the stack makes itself to a gRPC request is gRPC-native, as a real tonic
//! client sees it over h2c: the per-key limit is RESOURCE_EXHAUSTED (not a retryable
//! UNAVAILABLE), an open circuit and a fail-closed store are UNAVAILABLE with a pushback, and
//! a response timeout is DEADLINE_EXCEEDED, honouring the call's own `grpc-timeout`.

mod support;

use std::future::{ready, Ready};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::uri::PathAndQuery;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use tower_drain::track::{ConnectionStore, Lease, StoreError, StoreFailure};
use tower_drain::{DrainController, DrainStack};

const WATCHDOG: Duration = Duration::from_secs(20);

#[derive(Clone, PartialEq, prost::Message)]
struct Ping {
    #[prost(uint32, tag = "1")]
    n: u32,
}

/// A store whose every acquire fails.
#[derive(Clone, Debug)]
struct BrokenStore;

impl ConnectionStore for BrokenStore {
    type Future = Ready<Result<Option<Lease>, StoreError>>;

    fn acquire(&self, _key: &str, _limit: u32) -> Self::Future {
        ready(Err(StoreError::new("store unreachable")))
    }
}

/// A gRPC response whose body never ends (a server stream that holds its slot).
fn open_stream() -> Response {
    let mut res = Response::new(Body::from_stream(futures_util::stream::pending::<
        Result<Bytes, std::io::Error>,
    >()));
    res.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    res
}

/// A server-streaming call to `path` with `metadata`: its stream once the response headers say
/// OK (dropping it cancels the call).
async fn call(
    channel: &Channel,
    path: &'static str,
    metadata: &[(&'static str, &'static str)],
) -> Result<tonic::Streaming<Ping>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    let mut req = tonic::Request::new(Ping { n: 1 });
    for (k, v) in metadata {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    grpc.server_streaming(
        req,
        PathAndQuery::from_static(path),
        ProstCodec::<Ping, Ping>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_answer_of_the_stack_is_grpc_native() {
    tokio::time::timeout(WATCHDOG, async {
        let drain = DrainController::new();
        let limited = Router::new()
            .route("/demo.Svc/Limited", post(|| async { open_stream() }))
            .layer(DrainStack::new(drain.watch()).track(|t| {
                t.max_per_key(1)
                    .key_header(http::HeaderName::from_static("x-client-id"))
                    .retry_after(Duration::from_secs(3))
            }));
        let broken_store = Router::new()
            .route("/demo.Svc/Stored", post(|| async { open_stream() }))
            .layer(DrainStack::new(drain.watch()).track(|t| {
                t.store(BrokenStore)
                    .max_per_key(1)
                    .key_header(http::HeaderName::from_static("x-client-id"))
                    .on_store_error(StoreFailure::Closed)
            }));
        let failing = Router::new()
            .route(
                "/demo.Svc/Failing",
                post(|| async { (http::StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
            )
            .layer(
                DrainStack::new(drain.watch())
                    .guard(|g| g.failure_threshold(1).cooldown(Duration::from_secs(20)))
                    .unwrap(),
            );
        let slow = Router::new()
            .route("/demo.Svc/Slow", post(std::future::pending::<Response>))
            .layer(
                DrainStack::new(drain.watch())
                    .guard(|g| g.response_timeout(Duration::from_secs(10)))
                    .unwrap(),
            );
        let quick_timeout = Router::new()
            .route("/demo.Svc/Stuck", post(std::future::pending::<Response>))
            .layer(
                DrainStack::new(drain.watch())
                    .guard(|g| g.response_timeout(Duration::from_millis(300)))
                    .unwrap(),
            );
        let addr = support::serve_h1_h2(
            limited
                .merge(broken_store)
                .merge(failing)
                .merge(slow)
                .merge(quick_timeout),
        )
        .await;
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();

        // The per-key limit: RESOURCE_EXHAUSTED, which retry policies do not retry by default.
        let _held = call(&channel, "/demo.Svc/Limited", &[("x-client-id", "alice")])
            .await
            .expect("the first stream holds the slot");
        let s = call(&channel, "/demo.Svc/Limited", &[("x-client-id", "alice")])
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        assert_eq!(s.message(), "too many concurrent streams for this key");
        assert_eq!(s.metadata().get("grpc-retry-pushback-ms").unwrap(), "3000");

        // A fail-closed store: UNAVAILABLE with a pushback.
        let s = call(&channel, "/demo.Svc/Stored", &[("x-client-id", "bob")])
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        assert_eq!(
            s.message(),
            "stream limits unavailable: the connection store failed"
        );
        assert_eq!(s.metadata().get("grpc-retry-pushback-ms").unwrap(), "1000");

        // The circuit breaker, once open: UNAVAILABLE, pushback = the rest of the cool-down.
        // (An HTTP 500 from the service: a failure for the breaker, whatever tonic makes of it.)
        let _ = call(&channel, "/demo.Svc/Failing", &[]).await;
        let s = call(&channel, "/demo.Svc/Failing", &[]).await.unwrap_err();
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        assert_eq!(s.message(), "circuit breaker open: the service is failing");
        let pushback: u64 = s
            .metadata()
            .get("grpc-retry-pushback-ms")
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((15_000..=20_000).contains(&pushback), "{pushback}");

        // The response timeout: DEADLINE_EXCEEDED.
        let s = call(&channel, "/demo.Svc/Stuck", &[]).await.unwrap_err();
        assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
        assert_eq!(s.message(), "response timeout: no response in time");

        // ...at the call's own deadline when it is shorter than the guard's (read with a raw
        // HTTP/2 client: tonic's own client gives up at that deadline too, and would win).
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let started = Instant::now();
        let res = tx
            .send_request(
                http::Request::post(format!("http://{addr}/demo.Svc/Slow"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .header("grpc-timeout", "300m")
                    .body(http_body_util::Empty::<Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["grpc-status"], "4");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the call's grpc-timeout (300 ms) applies, not the guard's 10 s"
        );
    })
    .await
    .expect("watchdog");
}
