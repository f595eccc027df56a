//! Drives the compiled `examples/sse_server` binary the way operators and load tools do:
//! environment, HTTP and signals. The binary is built by `cargo test` (all targets); after
//! changing the example, `cargo test --test example_server` alone does not rebuild it.

mod support;

use std::process::Command;
use std::time::Duration;

use support::example::Example;
use support::*;

fn start(env: &[(&str, &str)]) -> Example {
    Example::start("sse_server", env)
}

fn binary() -> std::path::PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/sse_server
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    dir.join("examples").join("sse_server")
}

async fn body_text(res: http::Response<hyper::body::Incoming>) -> String {
    use http_body_util::BodyExt;
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

#[test]
fn invalid_settings_exit_2_naming_the_variable() {
    for (var, value) in [
        ("TICK_MS", "0"),
        ("TICK_MS", "fast"),
        ("SHUTDOWN_GRACE_PERIOD", "0"),
        ("SHUTDOWN_GRACE_PERIOD", "-3"),
        ("MAX_STREAM_LIFETIME", "0"),
        ("REDIS_LEASE_TTL", "0"),
        ("MAX_STREAMS_PER_CLIENT", "x"),
        ("RECONNECT_DELAY", "1.5"),
        // Absurd durations (they used to panic on SIGTERM or on the first stream).
        ("SHUTDOWN_GRACE_PERIOD", "18446744073709551615"),
        ("PROPAGATION_DELAY_MS", "18446744073709551615"),
        ("RECONNECT_DELAY", "18446744073709551615"),
        ("DRAIN_SPREAD_MS", "18446744073709551615"),
        ("TICK_MS", "18446744073709551615"),
        ("MAX_STREAM_LIFETIME", "18446744073709551615"),
        ("REDIS_LEASE_TTL", "18446744073709551615"),
    ] {
        let out = Command::new(binary())
            .env("ADDR", "127.0.0.1:0")
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        assert!(out.stdout.is_empty(), "nothing on stdout before listening");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(var), "{var}: {err}");
    }
    let out = Command::new(binary())
        .env("ADDR", "127.0.0.1:0")
        .env("SHUTDOWN_GRACE_PERIOD", "2")
        .env("PROPAGATION_DELAY_MS", "1500")
        .env("DRAIN_SPREAD_MS", "600")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("DRAIN_SPREAD_MS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_stream_and_exits_0_with_the_report() {
    const N: usize = 200;
    let p = start(&[("TICK_MS", "50"), ("RECONNECT_DELAY", "3")]);

    // Every metric is listed from the start.
    let metrics = body_text(fetch(p.addr, "/metrics").await).await;
    for name in [
        "tower_drain_active_streams",
        "tower_drain_streams_total",
        "tower_drain_rejected_total",
        "tower_drain_notified_total",
        "tower_drain_force_closed_total",
        "tower_drain_timeouts_total",
        "tower_drain_breaker_open",
        "tower_drain_breaker_trips_total",
        "tower_drain_store_errors_total",
        "tower_drain_stale_leases_cleaned_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }

    let mut clients = Vec::new();
    for _ in 0..N {
        let res = fetch(p.addr, "/events").await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        assert_eq!(res.headers()["cache-control"], "no-cache");
        assert_eq!(res.headers()["x-accel-buffering"], "no");
        let mut c = SseClient::new(res);
        let first = c.next_event().await.unwrap();
        assert_eq!(first.event.as_deref(), Some("tick"));
        assert_eq!(first.json(), serde_json::json!({"n": 0}));
        clients.push(c);
    }
    let status: serde_json::Value =
        serde_json::from_str(&body_text(fetch(p.addr, "/status").await).await).unwrap();
    assert_eq!(status["active_streams"], N);
    assert_eq!(status["phase"], "serving");

    p.signal("-TERM");
    let results = within(
        "every client reads to the end",
        futures_util::future::join_all(clients.iter_mut().map(|c| c.rest())),
    )
    .await;
    for (events, end) in &results {
        assert_eq!(end, &Ok(()));
        let shutdowns: Vec<_> = events
            .iter()
            .filter(|e| e.event.as_deref() == Some("shutdown"))
            .collect();
        assert_eq!(shutdowns.len(), 1);
        let last = events.last().unwrap();
        assert_eq!(last.event.as_deref(), Some("shutdown"));
        let data = last.json();
        assert_eq!(data["reason"], "signal");
        assert_eq!(data["reconnect_delay"], 3);
        let retry = last.retry.unwrap();
        assert!((2400..=3600).contains(&retry), "{retry}");
    }

    let addr = p.addr;
    let exit = p.exit_within(WATCHDOG).await;
    let (code, rest) = (exit.code, exit.stdout);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = rest.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one more stdout line: {rest:?}");
    let report: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let r = &report["shutdown_report"];
    assert_eq!(r["reason"], "signal");
    assert_eq!(r["streams_at_drain"], N);
    assert_eq!(r["notified"], N);
    assert_eq!(r["closed_gracefully"], N);
    assert_eq!(r["force_closed"], 0);
    assert_eq!(r["rejected"], 0);
    assert!(r["duration_ms"].is_u64());
    assert!(r["store_cleanup"].is_null());
    // The server has stopped: new connections are refused.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_drain_needs_the_key_and_changes_nothing_on_401() {
    let p = start(&[
        ("DRAIN_AUTH_KEY", "s3cret"),
        ("PROPAGATION_DELAY_MS", "200"),
        ("RECONNECT_DELAY", "5"),
    ]);
    let post = |auth: Option<&'static str>| {
        let mut b = http::Request::post("/drain").header("host", "x");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        request(p.addr, b.body(http_body_util::Empty::new()).unwrap())
    };
    assert_eq!(post(None).await.status(), 401);
    assert_eq!(post(Some("Bearer wrong")).await.status(), 401);
    assert_eq!(post(Some("Basic s3cret")).await.status(), 401);
    assert_eq!(
        fetch(p.addr, "/readyz").await.status(),
        200,
        "401 changed nothing"
    );

    // A stream open across the drain keeps the process up while we look.
    let mut stream = SseClient::open(p.addr, "/events").await;
    stream.next_event().await.unwrap();
    assert_eq!(post(Some("bEaReR s3cret")).await.status(), 202);
    assert_eq!(post(Some("Bearer s3cret")).await.status(), 202);
    assert_eq!(fetch(p.addr, "/readyz").await.status(), 503);
    assert_eq!(fetch(p.addr, "/healthz").await.status(), 200);
    let (events, end) = within("stream ends", stream.rest()).await;
    assert_eq!(end, Ok(()));
    assert_eq!(events.last().unwrap().json()["reason"], "manual");
    let exit = p.exit_within(WATCHDOG).await;
    let (code, rest) = (exit.code, exit.stdout);
    assert_eq!(code, Some(0));
    assert!(rest.contains("\"reason\":\"manual\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_endpoint_is_forbidden_without_a_key() {
    let p = start(&[]);
    let req = http::Request::post("/drain")
        .header("host", "x")
        .header("authorization", "Bearer anything")
        .body(http_body_util::Empty::new())
        .unwrap();
    assert_eq!(request(p.addr, req).await.status(), 403);
    assert_eq!(fetch(p.addr, "/readyz").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_the_limit_holds_across_processes_and_a_killed_one_frees_its_slots() {
    let redis = support::redis::Server::start();
    let prefix_free_env = [
        ("REDIS_URL", redis.url()),
        ("MAX_STREAMS_PER_CLIENT", "1"),
        ("REDIS_LEASE_TTL", "1"),
        ("TICK_MS", "50"),
    ];
    let a = start(&prefix_free_env);
    let b = start(&prefix_free_env);
    let alice = [("x-client-id", "alice")];

    let mut on_a = SseClient::new(fetch_with(a.addr, "/events", &alice).await);
    on_a.next_event().await.unwrap();
    let res = fetch_with(b.addr, "/events", &alice).await;
    assert_eq!(
        res.status(),
        429,
        "the other process holds alice's only slot"
    );
    assert!(
        res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );

    // A dies without cleaning up; its lease expires after REDIS_LEASE_TTL.
    a.signal("-KILL");
    let killed_at = std::time::Instant::now();
    let mut on_b = loop {
        let res = fetch_with(b.addr, "/events", &alice).await;
        if res.status() == 200 {
            break SseClient::new(res);
        }
        assert_eq!(res.status(), 429);
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "slot never freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    on_b.next_event().await.unwrap();

    // B drains with alice's stream open: the stream releases its own lease.
    b.signal("-TERM");
    let (events, end) = within("stream ends", on_b.rest()).await;
    assert_eq!(end, Ok(()));
    assert_eq!(events.last().unwrap().event.as_deref(), Some("shutdown"));
    let exit = b.exit_within(WATCHDOG).await;
    let (code, rest) = (exit.code, exit.stdout);
    assert_eq!(code, Some(0));
    let report: serde_json::Value = serde_json::from_str(rest.trim()).unwrap();
    let cleanup = &report["shutdown_report"]["store_cleanup"];
    assert!(cleanup.is_object(), "{report}");
    assert_eq!(cleanup["after"], 0);
    assert_eq!(cleanup["max_iterations_reached"], false);
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reaching_max_stream_lifetime_ends_with_the_timeout_frame() {
    let p = start(&[("MAX_STREAM_LIFETIME", "1"), ("TICK_MS", "100")]);
    let mut c = SseClient::open(p.addr, "/events").await;
    let (events, end) = within("the stream times out", c.rest()).await;
    assert_eq!(end, Ok(()), "ends cleanly, not with a cut connection");
    let (last, before) = events.split_last().unwrap();
    assert!(!before.is_empty() && before.iter().all(|e| e.event.as_deref() == Some("tick")));
    assert_eq!(last.event.as_deref(), Some("error"));
    assert_eq!(
        last.json(),
        serde_json::json!({"error": "Connection timeout", "code": "TIMEOUT"})
    );
    // The server keeps serving.
    assert_eq!(fetch(p.addr, "/readyz").await.status(), 200);
}
