//! The reference server: an axum SSE and WebSocket service under the full tower-drain stack,
//! with probes, a manual drain endpoint and Prometheus metrics. Other programs (the load,
//! fault and rolling-deploy tools, the end-to-end tests) drive it over HTTP and signals, so
//! everything below is a contract.
//!
//! ```text
//! cargo run --release --example sse_server
//! ```
//!
//! # Configuration (environment variables, all optional)
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `ADDR` | `127.0.0.1:3000` | listen address (port `0`: any free port) |
//! | `SHUTDOWN_GRACE_PERIOD` | `20` | seconds from the drain's start until remaining streams are force-closed |
//! | `PROPAGATION_DELAY_MS` | `0` | readiness `503` this long before requests are rejected and streams notified |
//! | `RECONNECT_DELAY` | `30` | seconds suggested to clients in the shutdown frame (`0` allowed) |
//! | `DRAIN_SPREAD_MS` | `0` | spread the shutdown frames evenly over this window (from the end of the propagation delay) |
//! | `DRAIN_AUTH_KEY` | unset | bearer key for `POST /drain`; unset: manual drain disabled (`403`) |
//! | `TICK_MS` | `1000` | interval between ticks on `/events` and `/ws` |
//! | `MAX_STREAM_LIFETIME` | `1800` | seconds; an older stream ends with the timeout frame |
//! | `MAX_STREAMS_PER_CLIENT` | `0` | concurrent streams per `x-client-id` (`0`: unlimited) |
//! | `REDIS_URL` | unset | tracking and limits in Redis (else in memory) |
//! | `REDIS_CLUSTER_NODES` | unset | comma-separated seed URLs of a Redis Cluster; when set, `REDIS_URL` is ignored |
//! | `REDIS_LEASE_TTL` | `30` | seconds a Redis lease lives without a heartbeat |
//!
//! An invalid value — not a whole number, negative, zero where zero makes no sense, longer than
//! 365 days, or a propagation delay plus spread that does not fit inside the grace period —
//! makes the process exit with status 2 and a one-line error on stderr naming the variable,
//! before it listens.
//!
//! # Startup
//!
//! It listens with a backlog of 1024 and `SO_REUSEADDR` (a new process can take the port the
//! moment the old one exits), serves HTTP/1.1 and cleartext HTTP/2 (prior knowledge) on that
//! port, and prints exactly one line to stdout: `listening on http://127.0.0.1:PORT`. Stdout
//! carries only that line and the final report; logs go to stderr. Every `tower_drain_*`
//! metric is registered at zero.
//!
//! # Routes
//!
//! | route | behaviour |
//! |---|---|
//! | `GET /events` | `text/event-stream`: `event: tick` / `data: {"n":N}` (N = 0, 1, …), the first at once, then every `TICK_MS`; tracked, limited, guarded and drained |
//! | `GET /ws` | WebSocket: a text message `{"n":N}` at once, then every `TICK_MS`; counts as a stream and is closed with `1001` on drain |
//! | `GET /healthz` | `200 ok` (liveness, even while draining) |
//! | `GET /readyz` | `200 ready` while serving, `503 draining` from the moment a drain starts |
//! | `POST /drain` | `Authorization: Bearer <DRAIN_AUTH_KEY>` (scheme case-insensitive) → `202` and a drain (reason `manual`), again `202` when repeated; a missing header, another scheme or a wrong key → `401` and nothing changes; no key configured → `403` |
//! | `GET /status` | JSON `{"phase","draining","active_streams","reason"}` |
//! | `GET /metrics` | Prometheus text |
//!
//! The probes, `/status`, `/metrics` and `/drain` are exempt from rejection.
//!
//! # Draining
//!
//! `SIGTERM`, `SIGINT` or `POST /drain` start a drain. Readiness turns `503` at once; after the
//! propagation delay (`Closing`):
//!
//! - other requests get `503` with `retry-after: <RECONNECT_DELAY>` and, on HTTP/1.1,
//!   `connection: close`; every HTTP/2 connection gets GOAWAY; every later HTTP/1.1 response
//!   carries `connection: close` (idle keep-alive connections are not cut: a request may be on
//!   its way);
//! - every `/events` stream gets, once, at its share of the spread and only between whole
//!   events, `event: shutdown` / `data: {"type":"shutdown","message",…,"timestamp":"<RFC 3339>",
//!   "reconnect_delay":<secs>,"reason":…}` / `retry: <ms, ±20 % jitter>`, then a clean end
//!   (HTTP/1.1: the last chunk; HTTP/2: END_STREAM);
//! - every `/ws` socket gets `Close(1001)` with a short reason at its share of the spread; the
//!   server waits (until the grace deadline at most) for the client's close;
//! - at the grace deadline what is left is force-closed: a stream at an event boundary gets the
//!   shutdown event with `"forced":true`, one in the middle of an event is aborted (never a
//!   clean end after half an event); connections still open a moment later are dropped, so the
//!   process exits within 1 s of the deadline whatever its clients do;
//! - a second `SIGTERM`/`SIGINT` skips what is left of the delay and the grace period.
//!
//! When no stream is left (or after the deadline) the server stops, prints one JSON line
//! `{"shutdown_report":{"reason","streams_at_drain","notified","closed_gracefully",
//! "force_closed","rejected","opened_while_closing","duration_ms","store_cleanup":null|{…},…}}`
//! and exits with status 0. `streams_at_drain + opened_while_closing == closed_gracefully +
//! force_closed`.
//!
//! # Limits
//!
//! A stream reaching `MAX_STREAM_LIFETIME` gets `event: error` /
//! `data: {"error":"Connection timeout","code":"TIMEOUT"}` and ends cleanly (a socket: `Close(1001)`
//! saying so). With `MAX_STREAMS_PER_CLIENT = N`, the (N+1)-th concurrent stream of one
//! `x-client-id` gets `429` with `retry-after`; a stream whose client left frees its slot at
//! once. With Redis the limit holds across every process sharing it; a killed process's slots
//! free themselves within `REDIS_LEASE_TTL`; a draining one releases all of its slots and
//! reports it in `store_cleanup`; while Redis is down the server serves without limits.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use axum::response::sse::{Event, Sse};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures_util::stream::Stream;
use http::{HeaderName, HeaderValue, StatusCode};
use tower_drain::conn::Connections;
use tower_drain::controller::MAX_DURATION;
use tower_drain::probe::Probes;
use tower_drain::track::{ConnectionStore, RedisStore, RedisStoreBuilder};
use tower_drain::{DrainBuilder, DrainController, DrainStack};

/// Settings from the environment; every invalid value names its variable.
struct Settings {
    addr: SocketAddr,
    drain: DrainBuilder,
    drain_key: Option<String>,
    tick: Duration,
    max_lifetime: Duration,
    max_per_client: u32,
    redis_url: Option<String>,
    redis_lease_ttl: Duration,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn number(name: &'static str, default: u64, allow_zero: bool) -> Result<u64, String> {
    let Some(v) = var(name) else {
        return Ok(default);
    };
    let n: u64 = v
        .trim()
        .parse()
        .map_err(|_| format!("invalid {name}: must be a non-negative whole number, got {v:?}"))?;
    if n == 0 && !allow_zero {
        return Err(format!("invalid {name}: must be greater than zero"));
    }
    Ok(n)
}

/// A duration variable: a whole number of `unit`s, at most [`MAX_DURATION`].
fn duration(
    name: &'static str,
    default: u64,
    unit: fn(u64) -> Duration,
    allow_zero: bool,
) -> Result<Duration, String> {
    let d = unit(number(name, default, allow_zero)?);
    if d > MAX_DURATION {
        return Err(format!("invalid {name}: must be at most 365 days"));
    }
    Ok(d)
}

fn settings() -> Result<Settings, String> {
    let addr = var("ADDR").unwrap_or_else(|| "127.0.0.1:3000".into());
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| format!("invalid ADDR: expected host:port, got {addr:?}"))?;
    let drain = DrainBuilder::from_env().map_err(|e| e.to_string())?;
    // Validate the combination now, naming the variable.
    drain.clone().build().map_err(|e| e.to_string())?;
    Ok(Settings {
        addr,
        drain,
        drain_key: var("DRAIN_AUTH_KEY").filter(|k| !k.is_empty()),
        tick: duration("TICK_MS", 1000, Duration::from_millis, false)?,
        max_lifetime: duration("MAX_STREAM_LIFETIME", 1800, Duration::from_secs, false)?,
        max_per_client: u32::try_from(number("MAX_STREAMS_PER_CLIENT", 0, true)?)
            .map_err(|_| "invalid MAX_STREAMS_PER_CLIENT: too large".to_string())?,
        redis_url: var("REDIS_URL").filter(|u| !u.is_empty()),
        redis_lease_ttl: duration("REDIS_LEASE_TTL", 30, Duration::from_secs, false)?,
    })
}

fn ticks(every: Duration) -> impl Stream<Item = Result<Event, Infallible>> {
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

/// `GET /ws`: a text message `{"n":N}` every `tick`, the first at once; counted as a stream
/// and closed with `1001` at its share of the drain spread (see `tower_drain::ws`).
async fn ws_ticks(
    upgrade: axum::extract::ws::WebSocketUpgrade,
    mut handle: tower_drain::ws::WsHandle,
    tick: Duration,
) -> axum::response::Response {
    use axum::extract::ws::Message;
    upgrade.on_upgrade(move |mut socket| async move {
        let mut interval = tokio::time::interval(tick);
        let mut n = 0u64;
        loop {
            tokio::select! {
                cause = handle.notified() => {
                    tower_drain::ws::close(socket, handle, cause).await;
                    return;
                }
                _ = interval.tick() => {
                    let msg = Message::text(format!("{{\"n\":{n}}}"));
                    if socket.send(msg).await.is_err() {
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
    })
}

/// `/events` (and every other non-probe path) under the full stack.
fn events_router<St>(stack: DrainStack<St>, tick: Duration) -> Router
where
    St: ConnectionStore + std::fmt::Debug,
{
    Router::new()
        .route(
            "/events",
            get(move || async move {
                let mut res = Sse::new(ticks(tick)).into_response();
                res.headers_mut()
                    .insert("x-accel-buffering", HeaderValue::from_static("no"));
                res
            }),
        )
        .route("/ws", get(move |up, handle| ws_ticks(up, handle, tick)))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found") })
        .layer(stack)
}

fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

#[tokio::main]
async fn main() {
    let settings = match settings() {
        Ok(s) => s,
        Err(msg) => {
            eprintln!("error: {msg}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    // The recorder must exist before the controller caches its metric handles.
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("install the Prometheus recorder");
    // Forced streams get half a second to hand over their last frame; then every connection
    // still open is dropped, so the process exits within a second of the grace deadline.
    let drain: DrainController = (settings.drain.force_linger(Duration::from_millis(500)))
        .build()
        .expect("validated above");
    drain.listen_for_signals();

    let mut stack = DrainStack::new(drain.watch())
        .guard(|g| g.max_lifetime(settings.max_lifetime))
        .expect("MAX_STREAM_LIFETIME is validated to be > 0");
    if settings.max_per_client > 0 {
        stack = stack.track(|t| {
            t.max_per_key(settings.max_per_client)
                .key_header(HeaderName::from_static("x-client-id"))
        });
    }

    let events = match redis_builder(settings.redis_url.as_deref()) {
        // Limits across every process sharing this Redis. Building the store does not
        // connect, so the server starts (and serves, fail-open) while Redis is down.
        Some((builder, variable)) => {
            let store = builder
                .lease_ttl(settings.redis_lease_ttl)
                .build()
                .unwrap_or_else(|e| {
                    // Name the variable the invalid setting came from.
                    let variable = match e.config().map(|c| c.setting()) {
                        Some("lease_ttl") => "REDIS_LEASE_TTL",
                        _ => variable,
                    };
                    eprintln!("error: invalid {variable}: {e}");
                    std::process::exit(2);
                });
            events_router(stack.track(|t| t.store(store)), settings.tick)
        }
        None => events_router(stack, settings.tick),
    };

    let mut probes = Probes::new(drain.clone());
    if let Some(key) = &settings.drain_key {
        probes = probes.drain_key(key);
    }
    let app = Router::new()
        .route_service("/healthz", probes.clone())
        .route_service("/readyz", probes.clone())
        .route_service("/status", probes.clone())
        .route_service("/drain", probes)
        .route("/metrics", get(move || async move { prometheus.render() }))
        .merge(events);

    let listener = match listen(settings.addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", settings.addr);
            std::process::exit(1);
        }
    };
    let local = listener.local_addr().expect("local address");
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{local}").expect("write stdout");
        out.flush().expect("flush stdout");
    }

    // HTTP/1.1 and h2c on one port. Each connection follows the drain: HTTP/2 ones get
    // GOAWAY when `Closing` begins, HTTP/1.1 responses carry `connection: close` from then
    // on, and whatever is still open at the hard deadline (grace + linger) is dropped. It
    // accepts until `Stopped`, so late clients get a 503 rather than a refused connection.
    let server = tokio::spawn(Connections::new(drain.watch()).serve(listener, app));
    let report = drain.report().await;
    // After a forced drain every connection is gone by now (dropped at the hard deadline,
    // as `Stopped` comes). After an early `Stopped`, idle connections close at once; one
    // with a request still in flight (say, a client that never finishes its headers) could
    // keep the server until the hard deadline: do not wait more than 2 s for it.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;

    let line = serde_json::json!({ "shutdown_report": report });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").expect("write stdout");
    out.flush().expect("flush stdout");
    std::process::exit(0);
}

/// The Redis store's builder and the variable it comes from: `REDIS_CLUSTER_NODES`
/// (comma-separated seed URLs of a Redis Cluster; when set, `REDIS_URL` is ignored), else
/// `REDIS_URL`.
fn redis_builder(redis_url: Option<&str>) -> Option<(RedisStoreBuilder, &'static str)> {
    if let Some(nodes) = var("REDIS_CLUSTER_NODES").filter(|n| !n.trim().is_empty()) {
        let seeds: Vec<String> = nodes
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        #[cfg(feature = "redis-cluster")]
        return Some((RedisStore::cluster_builder(seeds), "REDIS_CLUSTER_NODES"));
        #[cfg(not(feature = "redis-cluster"))]
        {
            eprintln!(
                "error: invalid REDIS_CLUSTER_NODES ({} nodes): this build lacks the `redis-cluster` feature",
                seeds.len()
            );
            std::process::exit(2);
        }
    }
    redis_url.map(|url| (RedisStore::builder(url), "REDIS_URL"))
}
