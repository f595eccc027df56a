//! gRPC health checking follows the drain (`examples/grpc_stream`, feature `tonic-health`):
//! a real health client sees `SERVING`, then `NOT_SERVING` as soon as the drain starts, a
//! `Watch` stream receives the change, and `Check` is still answered (not rejected) once the
//! server is closing.

mod support;

use std::time::Duration;

use support::example::Example;
use support::h2;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

async fn check(client: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let req = HealthCheckRequest {
        service: service.into(),
    };
    within("check", client.check(req))
        .await
        .unwrap_or_else(|s| panic!("Check({service:?}) failed: {s:?}"))
        .into_inner()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_when_the_drain_starts_and_watchers_see_it() {
    let server = Example::start(
        "grpc_stream",
        &[
            ("TICK_MS", "50"),
            ("SHUTDOWN_GRACE_PERIOD", "10"),
            ("PROPAGATION_DELAY_MS", "1000"),
            ("RECONNECT_DELAY", "1"),
        ],
    );
    let addr = server.addr;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    assert_eq!(check(&mut client, "").await, ServingStatus::Serving);
    assert_eq!(
        check(&mut client, "demo.Ticker").await,
        ServingStatus::Serving
    );
    let unknown = within(
        "unknown service",
        client.check(HealthCheckRequest {
            service: "demo.Nope".into(),
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut watch = within(
        "watch",
        client.watch(HealthCheckRequest {
            service: "demo.Ticker".into(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    let first = within("first status", watch.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    server.signal("-TERM");
    // During the propagation delay: the watcher hears of it, and Check says so too.
    let next = within("status change", watch.message())
        .await
        .unwrap()
        .expect("a status change, not the end of the stream");
    assert_eq!(next.status(), ServingStatus::NotServing);
    assert_eq!(
        check(&mut client, "demo.Ticker").await,
        ServingStatus::NotServing
    );
    assert_eq!(check(&mut client, "").await, ServingStatus::NotServing);

    // At `Closing` the Watch stream ends like any stream: UNAVAILABLE, so it reconnects
    // elsewhere.
    let end = within("watch end", watch.message()).await;
    match end {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        Ok(m) => panic!("expected UNAVAILABLE at Closing, got {m:?}"),
    }

    let exit = server.exit_within(Duration::from_secs(15)).await;
    assert_eq!(exit.code, Some(0), "{exit:?}");
}

/// `Check("demo.Ticker")` on a new connection, sent with the preface; returns the gRPC
/// message bytes of the answer (none for a Trailers-Only answer).
async fn raw_check(addr: std::net::SocketAddr) -> Vec<u8> {
    // A HealthCheckRequest for "demo.Ticker" (field 1, string).
    let mut msg = vec![0x0a, 11];
    msg.extend(b"demo.Ticker");
    let (mut probe, id) =
        h2::H2::connect_and_grpc(addr, "/grpc.health.v1.Health/Check", &msg).await;
    let mut data = Vec::new();
    loop {
        let f = within("probe answer", probe.next())
            .await
            .expect("an answer before EOF");
        if f.stream != id {
            continue;
        }
        assert_ne!(f.kind, h2::RST_STREAM, "probe reset");
        if f.kind == h2::DATA {
            data.extend(&f.payload);
        }
        if f.ends_stream() {
            return data;
        }
    }
}

/// While the server is closing, a probe on a new connection (as the kubelet's gRPC probe
/// makes) is answered `NOT_SERVING`, not rejected: the health service is exempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_is_answered_not_rejected_while_closing() {
    let server = Example::start(
        "grpc_stream",
        &[
            ("TICK_MS", "50"),
            ("SHUTDOWN_GRACE_PERIOD", "10"),
            ("RECONNECT_DELAY", "1"),
        ],
    );
    let addr = server.addr;
    assert_eq!(raw_check(addr).await, [0, 0, 0, 0, 2, 0x08, 1], "SERVING");
    // An export of 60 ticks (3 s) runs to completion, keeping the server in `Closing`.
    let (mut export, _) = h2::H2::connect_and_grpc(addr, "/demo.Ticker/Export", &[0x08, 60]).await;
    let first = within("first tick", export.next()).await.unwrap();
    assert!(matches!(first.kind, h2::HEADERS | h2::DATA), "{first:?}");
    server.signal("-TERM");
    // GOAWAY on the export's connection: `Closing` has begun.
    loop {
        let f = within("GOAWAY", export.next())
            .await
            .expect("GOAWAY before EOF");
        if f.kind == h2::GOAWAY {
            break;
        }
    }
    let data = raw_check(addr).await;
    // One gRPC message: HealthCheckResponse { status: NOT_SERVING (2) }. A rejection would
    // be Trailers-Only, without any message.
    assert_eq!(data, [0, 0, 0, 0, 2, 0x08, 2]);
    drop(export);
    let exit = server.exit_within(Duration::from_secs(15)).await;
    assert_eq!(exit.code, Some(0), "{exit:?}");
}
