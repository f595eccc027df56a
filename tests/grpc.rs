//! A real tonic client against `examples/grpc_stream` (tonic server under the stack, gRPC
//! final frames): what a gRPC client sees when the server drains.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::example::Example;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tonic_prost::ProstCodec;

/// The example's messages, hand-written as in the example (no protoc).
#[derive(Clone, PartialEq, prost::Message)]
struct WatchRequest {
    #[prost(uint32, tag = "1")]
    count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Tick {
    #[prost(uint64, tag = "1")]
    n: u64,
}

/// The drain message (the controller's default) that every UNAVAILABLE must carry.
const MESSAGE: &str = "Server is shutting down, please reconnect";
const GRACE: Duration = Duration::from_secs(5);
const WATCHDOG: Duration = Duration::from_secs(20);

async fn call(
    channel: &Channel,
    method: &'static str,
    count: u32,
) -> Result<Streaming<Tick>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    let res = grpc
        .server_streaming(
            tonic::Request::new(WatchRequest { count }),
            PathAndQuery::from_static(method),
            ProstCodec::<WatchRequest, Tick>::default(),
        )
        .await?;
    Ok(res.into_inner())
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WATCHDOG, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn assert_unavailable_with_message(status: &Status, what: &str) {
    assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
    // A bare HTTP 503 would also map to UNAVAILABLE in tonic, but with a message of its own
    // ("… mapped from HTTP status code 503"): the drain message proves the gRPC-shaped answer.
    assert_eq!(status.message(), MESSAGE, "{what}: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_unavailable_new_calls_are_rejected_unavailable_and_the_server_exits() {
    let server = Example::start(
        "grpc_stream",
        &[
            ("TICK_MS", "20"),
            ("SHUTDOWN_GRACE_PERIOD", "5"),
            ("RECONNECT_DELAY", "1"),
        ],
    );
    let addr = server.addr;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the example");

    // A resumable stream, and an export of 100 ticks (~2 s) that must run to completion.
    let mut watch = call(&channel, "/demo.Ticker/Watch", 0).await.unwrap();
    let mut export = call(&channel, "/demo.Ticker/Export", 100).await.unwrap();
    for n in 0..3 {
        let tick = within("watch tick", watch.message())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(tick.n, n);
    }
    let first = within("export tick", export.message()).await.unwrap();
    assert_eq!(first.unwrap().n, 0);
    // The raw check below can tell a streaming answer from a Trailers-Only one: a one-tick
    // export answers with headers first, its message, then trailers.
    let serving = within(
        "raw HTTP/2 call",
        raw_grpc_call(addr, "/demo.Ticker/Export", 1),
    )
    .await;
    assert_eq!(serving.status(), 200);
    assert!(serving.headers().get("grpc-status").is_none());
    assert!(!serving.body().is_end_stream());
    let done = within("one-tick export", serving.into_body().collect())
        .await
        .unwrap();
    assert_eq!(done.trailers().unwrap()["grpc-status"], "0");

    // Drain: SIGTERM. The exit is awaited concurrently while the client keeps working.
    let exit = tokio::spawn(server.terminate_within(GRACE + Duration::from_secs(3)));

    // 1. The open Watch stream ends with Status::unavailable carrying the drain message,
    //    after whole messages only.
    let mut next = 3;
    let status = loop {
        match within("watch to end", watch.message()).await {
            Ok(Some(tick)) => {
                assert_eq!(tick.n, next, "messages arrive whole and in order");
                next += 1;
            }
            Ok(None) => panic!("the watch stream ended with OK instead of UNAVAILABLE"),
            Err(status) => break status,
        }
    };
    assert_unavailable_with_message(&status, "open stream at drain");

    // 2. A new call during the drain (the export still holds the server open): UNAVAILABLE,
    //    gRPC-shaped, from the same channel ... The channel's connection got GOAWAY when
    //    `Closing` began; tonic still hands the next call to it, and hyper fails that call
    //    with CANCELLED before sending anything (tonic does not retry it). The channel then
    //    reconnects, and the call after that reaches the server.
    let mut status = within("new call", call(&channel, "/demo.Ticker/Watch", 0))
        .await
        .expect_err("a new call while draining must be rejected");
    if status.code() == Code::Cancelled {
        status = within("new call", call(&channel, "/demo.Ticker/Watch", 0))
            .await
            .expect_err("a new call while draining must be rejected");
    }
    assert_unavailable_with_message(&status, "new call while draining");

    // ... and on the wire a "Trailers-Only" answer: HTTP 200, grpc-status 14 in the one
    // HEADERS frame, which also ends the stream (what grpc-go / grpc-java expect too).
    let raw = within(
        "raw HTTP/2 call",
        raw_grpc_call(addr, "/demo.Ticker/Watch", 0),
    )
    .await;
    assert_eq!(raw.status(), 200, "gRPC rejections are not plain HTTP 503s");
    assert_eq!(raw.headers()["content-type"], "application/grpc");
    assert_eq!(raw.headers()["grpc-status"], "14");
    assert_eq!(
        raw.headers()["grpc-message"],
        "Server%20is%20shutting%20down,%20please%20reconnect"
    );
    assert_eq!(raw.headers()["grpc-retry-pushback-ms"], "1000");
    assert!(
        raw.body().is_end_stream(),
        "END_STREAM on the HEADERS frame"
    );

    // 3. The export is not interrupted: all 100 ticks, then OK.
    let mut n = 1;
    while let Some(tick) = within("export", export.message())
        .await
        .expect("the export runs to completion")
    {
        assert_eq!(tick.n, n);
        n += 1;
    }
    assert_eq!(n, 100);

    // 4. The server exits by itself, within the grace period, with a report.
    let exit = within("server exit", exit).await.unwrap();
    assert_eq!(exit.code, Some(0), "{exit:?}");
    assert!(exit.after_signal < GRACE, "{exit:?}");
    let report = exit.report();
    assert_eq!(report["reason"], "signal", "{report}");
    assert_eq!(report["streams_at_drain"], 2, "{report}");
    assert_eq!(report["notified"], 1, "{report}");
    assert_eq!(report["closed_gracefully"], 2, "{report}");
    assert_eq!(report["force_closed"], 0, "{report}");
    assert_eq!(report["rejected"], 2, "{report}");
}

/// One gRPC call over a fresh HTTP/2 connection, with hyper: the response head as sent.
async fn raw_grpc_call(
    addr: std::net::SocketAddr,
    method: &str,
    count: u8,
) -> http::Response<hyper::body::Incoming> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    // A `WatchRequest`: uncompressed flag, length, then field 1 (varint) unless zero.
    let msg: &[u8] = if count == 0 {
        &[0, 0, 0, 0, 0]
    } else {
        &[0, 0, 0, 0, 2, 0x08, count]
    };
    let req = http::Request::post(format!("http://{addr}{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::copy_from_slice(msg)))
        .unwrap();
    sender.send_request(req).await.unwrap()
}
