//! A rolling deploy, measured: HAProxy in front of N replicas, C clients that behave like
//! browsers, and a rolling restart of every replica, R times. The same roll runs twice: with
//! the reference server (`examples/sse_server.rs`, the full tower-drain stack) and with a
//! baseline (`examples/baseline_server.rs`: the same routes under
//! `axum::serve(..).with_graceful_shutdown(signal)`, `SIGKILL`ed at the end of the grace
//! period, as Kubernetes does). Both results go in one table.
//!
//! ```text
//! cargo run --release --example rolling_deploy -- [--clients 3000] [--replicas 3] [--rounds 2]
//!     [--h2] [--h2-backend] [--ws-share 0.1] [--grpc] [--browser] [--only drain|baseline]
//!     [--grace 5] [--tick-ms 500] [--check-ms 200] [--reconnect 1] [--spread-ms 1000]
//!     [--json FILE] [--svg FILE] [--no-build] [--bin-dir DIR]
//! ```
//!
//! Needs `haproxy` on `PATH` (Debian: `apt-get install haproxy`); `--browser` also needs
//! `chromium` and `chromedriver`. Everything listens on 127.0.0.1 only. The run's files
//! (HAProxy's configuration and log, each replica's stderr) go to a temporary directory that
//! is removed at the end; `ROLLING_DEPLOY_LOG=1` keeps it and logs every request in HAProxy.
//!
//! # What it does
//!
//! 1. Builds the servers once (`cargo build --example sse_server --example baseline_server`,
//!    or `--example grpc_stream --features tonic-health` for `--grpc`, in the tool's own
//!    profile; `--no-build` skips this) and runs the binaries directly.
//! 2. Starts HAProxy with a generated configuration (see [`haproxy_config`]): every replica
//!    slot is a `server` line with an active `GET /readyz` check every 200 ms, `fall 1`;
//!    `retry-on conn-failure empty-response 503` with `option redispatch 1`.
//! 3. Starts N replicas on fixed ports (two slots per replica, so a replacement can run
//!    beside the one it replaces), with `PROPAGATION_DELAY_MS` = 3 check intervals.
//! 4. Opens C client streams through HAProxy. An SSE client does what a browser's
//!    `EventSource` does: it follows `retry:` (3 s when none was sent), reconnects with
//!    `Last-Event-ID` when it has one, reconnects after a network error, and gives up for
//!    good on a non-200 answer or a wrong `content-type`. `--h2` makes them speak h2c to
//!    HAProxy, 100 streams per connection, and `--h2-backend` makes HAProxy speak h2c to the
//!    replicas as well; `--ws-share F` moves a share F of them to `/ws`
//!    (WebSocket; reconnect 1 s ± 20 % after a close).
//! 5. Rolls: for each replica in turn, start its replacement, wait until HAProxy's stats
//!    socket says `UP`, `SIGTERM` the old one, and wait for it to exit (the baseline gets
//!    `SIGKILL` when the grace period is over). R rounds.
//! 6. Reports what the clients saw, each old replica's `shutdown_report` and its time from
//!    `SIGTERM` to exit.
//!
//! # What is measured
//!
//! * **streams cut**: streams that ended (end of body, reset or connection error) without a
//!   final frame (`event: shutdown` or `event: error`);
//! * **non-200**: answers other than `200 text/event-stream` (WebSocket: other than `101`);
//! * **gave up**: SSE clients that stopped for good after a non-200, as `EventSource` does;
//! * **connect errors**: requests that got no answer at all;
//! * **reconnect latency**: from the end of a stream to the `200` of the next one (this
//!   includes the `retry:` wait), and the **longest gap** a client spent without an open
//!   stream;
//! * **ticks missed**: the replicas do not share an event source (each stream numbers its
//!   ticks from 0 and sends no `id:`), so lost events cannot be counted by id. The tool
//!   counts the ticks a client would have received had its stream not moved: for each gap
//!   between two ticks, `round(gap / TICK_MS) - 1`;
//! * WebSocket: closes with `1001` (the drain's) and sockets that ended without a close
//!   frame (`1006`, a failure); gRPC: RPCs that failed with a status other than the drain's
//!   own `UNAVAILABLE`, and the retries the drain's `UNAVAILABLE` caused (at the end of a
//!   stream, or rejecting a new call that reached a closing replica).
//!
//! A client-visible failure is a cut stream, a non-200, a give-up, a connect error, a `1006`
//! or a failed RPC.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------
// Settings

/// Command-line settings.
#[derive(Clone, Debug)]
struct Args {
    replicas: usize,
    clients: usize,
    rounds: usize,
    h2: bool,
    h2_backend: bool,
    h2_streams: usize,
    ws_share: f64,
    grpc: bool,
    browser: bool,
    only: Option<String>,
    tick_ms: u64,
    grace_s: u64,
    check_ms: u64,
    reconnect_s: u64,
    spread_ms: u64,
    json: Option<PathBuf>,
    svg: Option<PathBuf>,
    build: bool,
    bin_dir: Option<PathBuf>,
}

const USAGE: &str = "usage: rolling_deploy [--clients N] [--replicas N] [--rounds N] [--h2] \
[--h2-streams N] [--h2-backend] [--ws-share F] [--grpc] [--browser] [--only drain|baseline] [--tick-ms MS] \
[--grace S] [--check-ms MS] [--reconnect S] [--spread-ms MS] [--json FILE] [--svg FILE] \
[--no-build] [--bin-dir DIR]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        replicas: 3,
        clients: 3000,
        rounds: 2,
        h2: false,
        h2_backend: false,
        h2_streams: 100,
        ws_share: 0.0,
        grpc: false,
        browser: false,
        only: None,
        tick_ms: 500,
        grace_s: 5,
        check_ms: 200,
        reconnect_s: 1,
        spread_ms: 1000,
        json: None,
        svg: None,
        build: true,
        bin_dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        fn num<T: std::str::FromStr>(name: &str, v: String) -> Result<T, String> {
            v.parse().map_err(|_| format!("invalid {name}: {v:?}"))
        }
        match flag.as_str() {
            "--replicas" => a.replicas = num(&flag, value(&flag)?)?,
            "--clients" => a.clients = num(&flag, value(&flag)?)?,
            "--rounds" => a.rounds = num(&flag, value(&flag)?)?,
            "--h2" => a.h2 = true,
            "--h2-backend" => a.h2_backend = true,
            "--h2-streams" => a.h2_streams = num(&flag, value(&flag)?)?,
            "--ws-share" => a.ws_share = num(&flag, value(&flag)?)?,
            "--grpc" => a.grpc = true,
            "--browser" => a.browser = true,
            "--only" => a.only = Some(value(&flag)?),
            "--tick-ms" => a.tick_ms = num(&flag, value(&flag)?)?,
            "--grace" => a.grace_s = num(&flag, value(&flag)?)?,
            "--check-ms" => a.check_ms = num(&flag, value(&flag)?)?,
            "--reconnect" => a.reconnect_s = num(&flag, value(&flag)?)?,
            "--spread-ms" => a.spread_ms = num(&flag, value(&flag)?)?,
            "--json" => a.json = Some(value(&flag)?.into()),
            "--svg" => a.svg = Some(value(&flag)?.into()),
            "--no-build" => a.build = false,
            "--bin-dir" => a.bin_dir = Some(value(&flag)?.into()),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if a.replicas == 0 || a.rounds == 0 || a.tick_ms == 0 || a.check_ms == 0 || a.grace_s == 0 {
        return Err("--replicas, --rounds, --tick-ms, --check-ms and --grace must be > 0".into());
    }
    if a.h2_streams == 0 || !(0.0..=1.0).contains(&a.ws_share) {
        return Err("--h2-streams must be > 0 and --ws-share within 0..=1".into());
    }
    if a.clients > 100_000 || a.replicas > 50 || a.rounds > 20 {
        return Err("at most 100000 clients, 50 replicas and 20 rounds".into());
    }
    if let Some(only) = &a.only {
        if only != "drain" && only != "baseline" {
            return Err(format!("--only takes drain or baseline, not {only:?}"));
        }
    }
    // The drain's own windows must fit in its grace period, or the server refuses to start.
    if a.propagation_ms() + a.spread_ms >= a.grace_s * 1000 {
        return Err("--spread-ms plus 3 check intervals must fit inside --grace".into());
    }
    Ok(a)
}

impl Args {
    /// The replicas' `PROPAGATION_DELAY_MS`: three check intervals, so HAProxy has marked a
    /// draining replica down (one failed check, `fall 1`, plus a check in flight) before it
    /// starts to turn requests away.
    fn propagation_ms(&self) -> u64 {
        3 * self.check_ms
    }
}

/// Which server the replicas run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `examples/sse_server.rs`: the full tower-drain stack.
    Drain,
    /// `examples/baseline_server.rs`: no tower-drain, `SIGKILL` after the grace period.
    Baseline,
    /// `examples/grpc_stream.rs`: tonic under tower-drain, HTTP/2 on both sides of HAProxy.
    Grpc,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Drain => "tower-drain",
            Kind::Baseline => "baseline",
            Kind::Grpc => "gRPC (tower-drain)",
        }
    }
    fn binary(self) -> &'static str {
        match self {
            Kind::Drain => "sse_server",
            Kind::Baseline => "baseline_server",
            Kind::Grpc => "grpc_stream",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Time, marks and shared counters

/// Milliseconds since the run's start.
#[derive(Clone, Debug)]
struct Clock(Instant);

impl Clock {
    fn ms(&self) -> f64 {
        self.0.elapsed().as_secs_f64() * 1000.0
    }
}

/// What every client and the roll report into.
#[derive(Debug)]
struct Shared {
    clock: Clock,
    /// Open streams per server slot, as HAProxy's `x-served-by` header named it.
    open: Vec<AtomicI64>,
    /// Client-visible failures: (ms, what).
    failures: Mutex<Vec<(f64, &'static str)>>,
    stop: CancellationToken,
}

impl Shared {
    fn fail(&self, what: &'static str) {
        let t = self.clock.ms();
        self.failures.lock().unwrap().push((t, what));
    }
    fn slot_of(&self, served_by: Option<&str>) -> Option<usize> {
        let s = served_by?.strip_prefix('s')?.parse::<usize>().ok()?;
        (s < self.open.len()).then_some(s)
    }
}

/// Counts an open stream on its slot for as long as it lives.
struct OpenGuard<'a>(&'a Shared, Option<usize>);

impl<'a> OpenGuard<'a> {
    fn new(shared: &'a Shared, slot: Option<usize>) -> Self {
        if let Some(s) = slot {
            shared.open[s].fetch_add(1, Ordering::Relaxed);
        }
        Self(shared, slot)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.1 {
            self.0.open[s].fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What one client saw over the whole run.
#[derive(Debug, Default, Clone)]
struct Outcome {
    streams: u64,
    final_frames: u64,
    cut: u64,
    non_200: u64,
    connect_errors: u64,
    gave_up: u64,
    ws_1001: u64,
    ws_1006: u64,
    rpc_failed: u64,
    rpc_retried: u64,
    /// Of `rpc_retried`: calls answered with the drain's `UNAVAILABLE` before any message (a
    /// new call that reached a closing replica's reject layer).
    rpc_rejected: u64,
    rpc_calls: u64,
    /// Stream end to the next open, ms.
    reconnect_ms: Vec<f64>,
    /// Request to response headers, ms.
    open_ms: Vec<f64>,
    max_gap_ms: f64,
    max_tick_gap_ms: f64,
    ticks: u64,
    missed_ticks: u64,
    /// What the failed RPCs said, by code and message.
    rpc_errors: BTreeMap<String, u64>,
}

impl Outcome {
    fn rpc_failed(&mut self, shared: &Shared, s: &tonic::Status) {
        self.rpc_failed += 1;
        let mut msg = format!("{:?}: {}", s.code(), s.message());
        msg.truncate(120);
        *self.rpc_errors.entry(msg).or_default() += 1;
        shared.fail("rpc failed");
    }

    fn merge(&mut self, o: Outcome) {
        self.streams += o.streams;
        self.final_frames += o.final_frames;
        self.cut += o.cut;
        self.non_200 += o.non_200;
        self.connect_errors += o.connect_errors;
        self.gave_up += o.gave_up;
        self.ws_1001 += o.ws_1001;
        self.ws_1006 += o.ws_1006;
        self.rpc_failed += o.rpc_failed;
        self.rpc_retried += o.rpc_retried;
        self.rpc_rejected += o.rpc_rejected;
        self.rpc_calls += o.rpc_calls;
        self.reconnect_ms.extend(o.reconnect_ms);
        self.open_ms.extend(o.open_ms);
        self.max_gap_ms = self.max_gap_ms.max(o.max_gap_ms);
        self.max_tick_gap_ms = self.max_tick_gap_ms.max(o.max_tick_gap_ms);
        self.ticks += o.ticks;
        self.missed_ticks += o.missed_ticks;
        for (k, n) in o.rpc_errors {
            *self.rpc_errors.entry(k).or_default() += n;
        }
    }

    fn failures(&self) -> u64 {
        self.cut
            + self.non_200
            + self.connect_errors
            + self.gave_up
            + self.ws_1006
            + self.rpc_failed
    }
}

/// Per-client bookkeeping of ticks and gaps.
struct Track {
    tick_ms: f64,
    last_tick: Option<f64>,
    /// When the last stream ended (no stream open since).
    down_since: Option<f64>,
}

impl Track {
    fn new(tick_ms: u64) -> Self {
        Self {
            tick_ms: tick_ms as f64,
            last_tick: None,
            down_since: None,
        }
    }
    fn tick(&mut self, now: f64, out: &mut Outcome) {
        if let Some(last) = self.last_tick {
            let gap = now - last;
            out.max_tick_gap_ms = out.max_tick_gap_ms.max(gap);
            out.missed_ticks += ((gap / self.tick_ms).round() as u64).saturating_sub(1);
        }
        self.last_tick = Some(now);
        out.ticks += 1;
    }
    fn opened(&mut self, now: f64, out: &mut Outcome) {
        out.streams += 1;
        if let Some(since) = self.down_since.take() {
            out.reconnect_ms.push(now - since);
            out.max_gap_ms = out.max_gap_ms.max(now - since);
        }
    }
    fn closed(&mut self, now: f64) {
        self.down_since.get_or_insert(now);
    }
}

// ---------------------------------------------------------------------------------------
// SSE clients (HTTP/1.1 or h2c)

/// A few shared h2c connections to HAProxy; each carries many streams.
#[derive(Debug)]
struct H2Pool {
    port: u16,
    /// Connections opened so far (a reconnect after HAProxy closed one counts again).
    opened: std::sync::atomic::AtomicU64,
    conns: Vec<tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<Empty<Bytes>>>>>,
}

impl H2Pool {
    fn new(port: u16, n: usize) -> Self {
        Self {
            port,
            opened: Default::default(),
            conns: (0..n.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
        }
    }

    async fn sender(
        &self,
        i: usize,
    ) -> Result<hyper::client::conn::http2::SendRequest<Empty<Bytes>>, String> {
        let mut slot = self.conns[i % self.conns.len()].lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .map_err(|e| e.to_string())?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        self.opened.fetch_add(1, Ordering::Relaxed);
        *slot = Some(sender.clone());
        Ok(sender)
    }
}

/// One HTTP exchange: the response or a connection error.
async fn send_events_request(
    port: u16,
    h2: Option<(&H2Pool, usize)>,
    last_event_id: Option<&str>,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let mut req = http::Request::builder()
        .method("GET")
        .header("accept", "text/event-stream")
        .header("cache-control", "no-cache");
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    match h2 {
        Some((pool, i)) => {
            let req = req
                .uri(format!("http://127.0.0.1:{port}/events"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let mut sender = pool.sender(i).await?;
            sender.ready().await.map_err(|e| e.to_string())?;
            sender.send_request(req).await.map_err(|e| e.to_string())
        }
        None => {
            let req = req
                .uri("/events")
                .header("host", format!("127.0.0.1:{port}"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| e.to_string())?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            sender.send_request(req).await.map_err(|e| e.to_string())
        }
    }
}

/// The SSE parser state of one stream (just what `EventSource` needs).
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
    event: String,
    has_data: bool,
}

/// One dispatched event or field that matters to the client.
enum SseItem {
    Event(String),
    Retry(u64),
    Id(String),
}

impl SseParser {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<SseItem>) {
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let line = &self.buf[start..start + pos];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = String::from_utf8_lossy(line).into_owned();
            start += pos + 1;
            if line.is_empty() {
                if self.has_data {
                    let ev = std::mem::take(&mut self.event);
                    out.push(SseItem::Event(if ev.is_empty() {
                        "message".into()
                    } else {
                        ev
                    }));
                }
                self.event.clear();
                self.has_data = false;
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f.to_owned(), v.strip_prefix(' ').unwrap_or(v).to_owned()),
                None => (line, String::new()),
            };
            match field.as_str() {
                "event" => self.event = value,
                "data" => self.has_data = true,
                "id" if !value.contains('\0') => out.push(SseItem::Id(value)),
                "retry" => {
                    if let Ok(ms) = value.parse() {
                        out.push(SseItem::Retry(ms));
                    }
                }
                _ => {}
            }
        }
        self.buf.drain(..start);
    }
}

/// How one stream ended.
enum StreamEnd {
    /// With a final frame (`shutdown` or `error` event) before the end of the body.
    Final,
    /// Without one: end of body, reset or connection error.
    Cut,
    /// The run is over.
    Stopped,
}

/// A browser's `EventSource`, as far as a rolling deploy can tell.
async fn sse_client(
    shared: Arc<Shared>,
    port: u16,
    h2: Option<(Arc<H2Pool>, usize)>,
    tick_ms: u64,
) -> Outcome {
    const DEFAULT_RETRY_MS: u64 = 3000; // Chromium's reconnection time without `retry:`
    let mut out = Outcome::default();
    let mut track = Track::new(tick_ms);
    let mut retry_ms = DEFAULT_RETRY_MS;
    let mut last_event_id: Option<String> = None;
    loop {
        if shared.stop.is_cancelled() {
            break;
        }
        let asked = shared.clock.ms();
        let res = tokio::select! {
            r = send_events_request(port, h2.as_ref().map(|(p, i)| (&**p, *i)), last_event_id.as_deref()) => r,
            _ = shared.stop.cancelled() => break,
        };
        let res = match res {
            Ok(res) => res,
            Err(_) => {
                // A network error: EventSource reconnects after its reconnection time.
                out.connect_errors += 1;
                shared.fail("connect error");
                track.closed(shared.clock.ms());
                if wait_or_stop(&shared, retry_ms).await {
                    break;
                }
                continue;
            }
        };
        let sse = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if res.status() != 200 || !sse {
            // "fail the connection": the EventSource is CLOSED for good.
            out.non_200 += 1;
            out.gave_up += 1;
            shared.fail("non-200");
            shared.fail("gave up");
            break;
        }
        let now = shared.clock.ms();
        out.open_ms.push(now - asked);
        track.opened(now, &mut out);
        let slot = shared.slot_of(
            res.headers()
                .get("x-served-by")
                .and_then(|v| v.to_str().ok()),
        );
        let end = {
            let _open = OpenGuard::new(&shared, slot);
            read_sse(
                &shared,
                res.into_body(),
                &mut track,
                &mut out,
                &mut retry_ms,
                &mut last_event_id,
            )
            .await
        };
        track.closed(shared.clock.ms());
        match end {
            StreamEnd::Stopped => break,
            StreamEnd::Final => out.final_frames += 1,
            StreamEnd::Cut => {
                out.cut += 1;
                shared.fail("stream cut");
            }
        }
        if wait_or_stop(&shared, retry_ms).await {
            break;
        }
    }
    out
}

async fn read_sse(
    shared: &Shared,
    mut body: hyper::body::Incoming,
    track: &mut Track,
    out: &mut Outcome,
    retry_ms: &mut u64,
    last_event_id: &mut Option<String>,
) -> StreamEnd {
    let mut parser = SseParser::default();
    let mut items = Vec::new();
    let mut saw_final = false;
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = shared.stop.cancelled() => return StreamEnd::Stopped,
        };
        match frame {
            None => {
                return if saw_final {
                    StreamEnd::Final
                } else {
                    StreamEnd::Cut
                }
            }
            Some(Err(_)) => return StreamEnd::Cut,
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                parser.feed(&data, &mut items);
                for item in items.drain(..) {
                    match item {
                        SseItem::Event(e) if e == "tick" => track.tick(shared.clock.ms(), out),
                        SseItem::Event(e) if e == "shutdown" || e == "error" => saw_final = true,
                        SseItem::Event(_) => {}
                        SseItem::Retry(ms) => *retry_ms = ms,
                        SseItem::Id(id) => *last_event_id = Some(id),
                    }
                }
            }
        }
    }
}

/// Sleeps `ms`; true when the run stopped meanwhile.
async fn wait_or_stop(shared: &Shared, ms: u64) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => false,
        _ = shared.stop.cancelled() => true,
    }
}

// ---------------------------------------------------------------------------------------
// WebSocket clients

/// Holds `/ws`; reconnects 1 s ± 20 % after a close, counts `1001` and `1006`.
async fn ws_client(shared: Arc<Shared>, port: u16, tick_ms: u64, seed: u64) -> Outcome {
    use tokio_tungstenite::tungstenite::{self, Message};
    let mut out = Outcome::default();
    let mut track = Track::new(tick_ms);
    let mut rng = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    loop {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = 800 + (rng >> 33) % 400;
        if shared.stop.is_cancelled() {
            break;
        }
        let asked = shared.clock.ms();
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            tokio_tungstenite::client_async(format!("ws://127.0.0.1:{port}/ws"), tcp)
                .await
                .map_err(std::io::Error::other)
        };
        let res = tokio::select! {
            r = connect => r,
            _ = shared.stop.cancelled() => break,
        };
        let (mut socket, res) = match res {
            Ok(ok) => ok,
            Err(e) => {
                let http = e
                    .get_ref()
                    .and_then(|e| e.downcast_ref::<tungstenite::Error>())
                    .is_some_and(|e| matches!(e, tungstenite::Error::Http(_)));
                if http {
                    out.non_200 += 1;
                    shared.fail("non-101");
                } else {
                    out.connect_errors += 1;
                    shared.fail("connect error");
                }
                track.closed(shared.clock.ms());
                if wait_or_stop(&shared, delay).await {
                    break;
                }
                continue;
            }
        };
        let now = shared.clock.ms();
        out.open_ms.push(now - asked);
        track.opened(now, &mut out);
        let slot = shared.slot_of(
            res.headers()
                .get("x-served-by")
                .and_then(|v| v.to_str().ok()),
        );
        let guard = OpenGuard::new(&shared, slot);
        let mut code = None;
        let stopped = loop {
            let msg = tokio::select! {
                m = socket.next() => m,
                _ = shared.stop.cancelled() => break true,
            };
            match msg {
                Some(Ok(Message::Text(_))) => track.tick(shared.clock.ms(), &mut out),
                Some(Ok(Message::Close(frame))) => {
                    code = Some(frame.map_or(1005, |f| u16::from(f.code)));
                }
                Some(Ok(_)) => {}
                // After a close frame, tungstenite answers it and the stream ends.
                Some(Err(_)) | None => break false,
            }
        };
        drop(guard);
        track.closed(shared.clock.ms());
        if stopped {
            let _ = socket.close(None).await;
            break;
        }
        match code {
            Some(1001) => {
                out.ws_1001 += 1;
                out.final_frames += 1;
            }
            Some(_) => out.final_frames += 1,
            None => {
                out.ws_1006 += 1;
                shared.fail("ws 1006");
            }
        }
        if wait_or_stop(&shared, delay).await {
            break;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// gRPC clients

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

/// The message of the drain's own `UNAVAILABLE` (the controller's default).
const DRAIN_MESSAGE: &str = "Server is shutting down, please reconnect";

fn drain_unavailable(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable && s.message() == DRAIN_MESSAGE
}

async fn grpc_call(
    channel: &tonic::transport::Channel,
    count: u32,
) -> Result<tonic::Response<tonic::Streaming<proto::Tick>>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.server_streaming(
        tonic::Request::new(proto::WatchRequest { count }),
        http::uri::PathAndQuery::from_static("/demo.Ticker/Watch"),
        tonic_prost::ProstCodec::<proto::WatchRequest, proto::Tick>::default(),
    )
    .await
}

/// Keeps one endless `Watch` going: the drain's `UNAVAILABLE` is retried with backoff (and
/// counted), any other status is a failure.
async fn grpc_watcher(
    shared: Arc<Shared>,
    channel: tonic::transport::Channel,
    tick_ms: u64,
) -> Outcome {
    let mut out = Outcome::default();
    let mut track = Track::new(tick_ms);
    let mut backoff = 50;
    'outer: while !shared.stop.is_cancelled() {
        out.rpc_calls += 1;
        let asked = shared.clock.ms();
        let res = tokio::select! {
            r = grpc_call(&channel, 0) => r,
            _ = shared.stop.cancelled() => break,
        };
        let mut rejected = false;
        let status = match res {
            Ok(res) => {
                let now = shared.clock.ms();
                out.open_ms.push(now - asked);
                track.opened(now, &mut out);
                let slot = shared.slot_of(
                    res.metadata()
                        .get("x-served-by")
                        .and_then(|v| v.to_str().ok()),
                );
                let _open = OpenGuard::new(&shared, slot);
                let mut stream = res.into_inner();
                loop {
                    let msg = tokio::select! {
                        m = stream.message() => m,
                        _ = shared.stop.cancelled() => break 'outer,
                    };
                    match msg {
                        Ok(Some(_)) => track.tick(shared.clock.ms(), &mut out),
                        Ok(None) => break tonic::Status::ok("ended"),
                        Err(s) => break s,
                    }
                }
            }
            Err(s) => {
                rejected = true;
                s
            }
        };
        track.closed(shared.clock.ms());
        if drain_unavailable(&status) {
            out.rpc_retried += 1;
            if rejected {
                out.rpc_rejected += 1;
            } else {
                out.final_frames += 1;
            }
        } else {
            out.rpc_failed(&shared, &status);
        }
        // gRPC-style backoff: 100 ms, doubling up to 1.6 s, reset by a stream that delivered.
        backoff = if track.last_tick.is_some_and(|t| t > asked) {
            100
        } else {
            (backoff * 2).min(1600)
        };
        if wait_or_stop(&shared, backoff).await {
            break;
        }
    }
    out
}

/// A stream of short calls (`Watch` with `count: 1`: one tick, then OK), one every 100 ms.
async fn grpc_caller(shared: Arc<Shared>, channel: tonic::transport::Channel) -> Outcome {
    let mut out = Outcome::default();
    while !shared.stop.is_cancelled() {
        out.rpc_calls += 1;
        let call = async {
            let mut s = grpc_call(&channel, 1)
                .await
                .map_err(|s| (true, s))?
                .into_inner();
            while s.message().await.map_err(|s| (false, s))?.is_some() {}
            Ok::<_, (bool, tonic::Status)>(())
        };
        let res = tokio::select! {
            r = call => r,
            _ = shared.stop.cancelled() => break,
        };
        match res {
            Ok(()) => out.streams += 1,
            Err((rejected, s)) if drain_unavailable(&s) => {
                out.rpc_retried += 1;
                out.rpc_rejected += u64::from(rejected);
                // Back off a little before the retry, as gRPC clients do.
                if wait_or_stop(&shared, 200).await {
                    break;
                }
            }
            Err((_, s)) => out.rpc_failed(&shared, &s),
        }
        if wait_or_stop(&shared, 100).await {
            break;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// HAProxy

/// The page the browser run loads: 20 native `EventSource`s, spread over the browser
/// frontend's ports (Chromium opens at most 6 HTTP/1.1 connections per origin).
fn browser_page(ports: &[u16]) -> String {
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    format!(
        r#"<!doctype html><meta charset="utf-8"><title>rolling deploy</title><script>
const ports = [{ports}];
window.sources = [];
for (let i = 0; i < 20; i++) {{
  const rec = {{ i, port: ports[i % ports.length], opens: 0, errors: 0, ticks: 0, shutdowns: 0,
                closed: false, lastTick: 0, maxGap: 0 }};
  const es = new EventSource(`http://127.0.0.1:${{rec.port}}/events`);
  es.onopen = () => {{ rec.opens++; }};
  es.onerror = () => {{ rec.errors++; if (es.readyState === EventSource.CLOSED) rec.closed = true; }};
  es.addEventListener("tick", () => {{
    const now = performance.now();
    if (rec.lastTick) rec.maxGap = Math.max(rec.maxGap, now - rec.lastTick);
    rec.lastTick = now; rec.ticks++;
  }});
  es.addEventListener("shutdown", () => {{ rec.shutdowns++; }});
  window.sources.push(rec);
}}
</script>"#
    )
}

/// The gRPC message `HealthCheckResponse { status: SERVING }` as it appears in an HTTP/2
/// DATA frame: not compressed, length 2, field 1 = 1.
const GRPC_SERVING_HEX: &str = "00000000020801";

/// One gRPC health `Check` for the whole server (service `""`) over cleartext HTTP/2, as the
/// hex string HAProxy's `tcp-check send-binary` takes: the connection preface, an empty
/// SETTINGS frame, a HEADERS frame (HPACK literals, no Huffman coding) and a DATA frame that
/// ends the stream and carries the empty request message.
fn grpc_health_check_hex() -> String {
    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let stream: u32 = if kind == 4 { 0 } else { 1 };
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }
    // A literal header field without indexing: a static-table name index (4-bit prefix, so
    // 15 and above take a second byte), or a new name (index 0), then the value.
    fn literal(out: &mut Vec<u8>, index: u8, name: &[u8], value: &[u8]) {
        if index < 15 {
            out.push(index);
        } else {
            out.extend([15, index - 15]);
        }
        if index == 0 {
            out.push(name.len() as u8);
            out.extend(name);
        }
        out.push(value.len() as u8);
        out.extend(value);
    }
    // :method POST (static 3), :scheme http (static 6).
    let mut headers = vec![0x83, 0x86];
    literal(&mut headers, 4, b"", b"/grpc.health.v1.Health/Check");
    literal(&mut headers, 1, b"", b"127.0.0.1");
    literal(&mut headers, 31, b"", b"application/grpc");
    literal(&mut headers, 0, b"te", b"trailers");
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(4, 0, &[]));
    bytes.extend(frame(1, 0x4, &headers)); // END_HEADERS
    bytes.extend(frame(0, 0x1, &[0; 5])); // END_STREAM; flag 0, length 0
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The HAProxy configuration the run uses; the README shows the part a user copies.
///
/// * `option httpchk GET /readyz` + `http-check expect status 200`, `inter`, `fall 1`,
///   `rise 1`: an active readiness check; one failed check takes a draining replica out,
///   one good one puts a new replica in.
/// * `retries 3`, `retry-on conn-failure empty-response 503`, `option redispatch 1`: a request
///   that hits a replica which has stopped listening, closed without an answer, or answered
///   `503` (draining) is sent again, to another server, before the client sees anything.
/// * `balance leastconn`: long-lived streams are spread by count, so a new replica takes
///   the reconnecting clients.
/// * `timeout server/client 60s`, `timeout tunnel 1h`: longer than the tick interval, so
///   idle-looking streams are not cut; WebSockets live in `tunnel`.
/// * `http-response set-header x-served-by %s`: lets clients tell which replica served them
///   (for the timeline only).
/// * gRPC (`--grpc`): `proto h2` on the `bind` and `server` lines, and the readiness check is
///   gRPC health checking (`grpc.health.v1.Health/Check`, which reports `NOT_SERVING` from
///   `Draining` on), sent as raw HTTP/2 from a `tcp-check` (see [`grpc_health_check_hex`]).
/// * `--browser`: a second frontend on 4 more ports serves the page (`http-request return`)
///   and adds `access-control-allow-origin: *`, because Chromium opens at most 6 HTTP/1.1
///   connections per origin and the page's 20 `EventSource`s are spread over 4 origins.
fn haproxy_config(
    kind: Kind,
    args: &Args,
    maxconn: u64,
    port: u16,
    slots: &[u16],
    socket: &Path,
    browser: Option<(&[u16], &Path)>,
) -> String {
    let (h2_backend, check_ms) = (args.h2_backend, args.check_ms);
    let mut c = String::new();
    let grpc = kind == Kind::Grpc;
    // ROLLING_DEPLOY_LOG=1: one log line per request in the run's haproxy.log, and the run's
    // directory is kept.
    let level = if keep_logs() { "info" } else { "notice" };
    let _ = writeln!(
        c,
        "global\n  log stderr format raw local0 {level}\n  maxconn {maxconn}\n  stats socket {} mode 600 level admin\n  tune.h2.max-concurrent-streams 100\n",
        socket.display()
    );
    let _ = writeln!(
        c,
        "defaults\n  mode http\n  maxconn {maxconn}\n  timeout connect 1s\n  timeout client 60s\n  \
         timeout server 60s\n  timeout tunnel 1h\n  timeout check {check_ms}ms\n  retries 3\n  \
         option redispatch 1\n  retry-on conn-failure empty-response 503\n  log global\n  option httplog\n"
    );
    let bind = if grpc { " proto h2" } else { "" };
    let _ = writeln!(
        c,
        "frontend web\n  bind 127.0.0.1:{port}{bind}\n  default_backend replicas\n"
    );
    if let Some((ports, page)) = browser {
        let binds = ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let _ = writeln!(
            c,
            "frontend browser\n  bind {binds}\n  \
             http-request return status 200 content-type \"text/html; charset=utf-8\" file {} if {{ path /rolling.html }}\n  \
             http-response set-header access-control-allow-origin \"*\"\n  default_backend replicas\n",
            page.display()
        );
    }
    let _ = writeln!(c, "backend replicas\n  balance leastconn");
    if grpc {
        // gRPC health checking (`grpc.health.v1.Health/Check`, service ""): it reports
        // NOT_SERVING from `Draining` on, so HAProxy stops sending during the propagation
        // delay. HAProxy's http-check cannot send a body with NUL bytes (every gRPC message
        // starts with one), so the check speaks HTTP/2 itself in a tcp-check.
        let _ = writeln!(
            c,
            "  option tcp-check\n  tcp-check connect\n  tcp-check send-binary {}\n  \
             tcp-check expect binary {GRPC_SERVING_HEX}\n  \
             default-server check inter {check_ms}ms fall 1 rise 1 proto h2",
            grpc_health_check_hex()
        );
    } else {
        let _ = writeln!(
            c,
            "  option httpchk GET /readyz\n  http-check expect status 200\n  \
             default-server check inter {check_ms}ms fall 1 rise 1"
        );
    }
    if h2_backend && !grpc {
        // h2c to the replicas too: their GOAWAY then reaches HAProxy's server connections.
        let _ = writeln!(c, "  default-server proto h2");
    }
    let _ = writeln!(c, "  http-response set-header x-served-by %s");
    for (i, p) in slots.iter().enumerate() {
        let _ = writeln!(c, "  server s{i} 127.0.0.1:{p}");
    }
    c
}

#[derive(Debug)]
struct Haproxy {
    child: Child,
    socket: PathBuf,
}

impl Haproxy {
    async fn start(dir: &Path, config: &str, port: u16, socket: PathBuf) -> Result<Self, String> {
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("haproxy.log")).map_err(|e| e.to_string())?;
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run haproxy ({e}); on Debian: apt-get install haproxy"))?;
        let mut h = Haproxy { child, socket };
        for _ in 0..200 {
            if let Ok(Some(status)) = h.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("haproxy.log")).unwrap_or_default();
                return Err(format!("haproxy exited ({status}):\n{log}"));
            }
            if h.stat().await.is_ok()
                && tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            {
                return Ok(h);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err("haproxy did not come up within 5 s".into())
    }

    /// `show stat`: each backend server's status (`UP`, `DOWN`, ...).
    async fn stat(&self) -> Result<BTreeMap<String, String>, String> {
        let mut s = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(b"show stat\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut text = String::new();
        s.read_to_string(&mut text)
            .await
            .map_err(|e| e.to_string())?;
        let mut lines = text.lines();
        let header: Vec<&str> = lines
            .next()
            .and_then(|h| h.strip_prefix("# "))
            .ok_or("no stat header")?
            .split(',')
            .collect();
        let col = |n: &str| header.iter().position(|h| *h == n);
        let (px, sv, st) = (col("pxname"), col("svname"), col("status"));
        let (Some(px), Some(sv), Some(st)) = (px, sv, st) else {
            return Err("unexpected stat columns".into());
        };
        Ok(lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > st && f[px] == "replicas" && f[sv].starts_with('s'))
            .map(|f| (f[sv].to_owned(), f[st].to_owned()))
            .collect())
    }

    /// Waits until every slot's `UP`-ness is `want(slot)`.
    async fn wait_for(
        &self,
        want: impl Fn(usize) -> Option<bool>,
        limit: Duration,
    ) -> Result<(), String> {
        let end = Instant::now() + limit;
        let mut last = BTreeMap::new();
        while Instant::now() < end {
            if let Ok(st) = self.stat().await {
                let ok = st.iter().all(|(name, status)| {
                    let slot: usize = name[1..].parse().unwrap_or(usize::MAX);
                    want(slot).is_none_or(|up| status.starts_with("UP") == up)
                });
                if ok {
                    return Ok(());
                }
                last = st;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!(
            "haproxy did not reach the expected server states: {last:?}"
        ))
    }
}

// ---------------------------------------------------------------------------------------
// Replicas

#[derive(Debug)]
struct Replica {
    label: String,
    slot: usize,
    child: Child,
    rest: tokio::task::JoinHandle<Vec<String>>,
    started_ms: f64,
    ready_ms: Option<f64>,
}

/// What became of one replaced replica.
#[derive(Debug, Clone)]
struct Retired {
    label: String,
    slot: usize,
    started_ms: f64,
    ready_ms: Option<f64>,
    term_ms: f64,
    exit_ms: f64,
    killed: bool,
    code: Option<i32>,
    report: Value,
}

fn keep_logs() -> bool {
    std::env::var_os("ROLLING_DEPLOY_LOG").is_some_and(|v| v == "1")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// What every replica of a run is started with.
struct Launch<'a> {
    bin: &'a Path,
    kind: Kind,
    args: &'a Args,
    dir: &'a Path,
    clock: &'a Clock,
}

async fn start_replica(
    launch: &Launch<'_>,
    label: String,
    slot: usize,
    port: u16,
) -> Result<Replica, String> {
    let Launch {
        bin,
        kind,
        args,
        dir,
        clock,
    } = *launch;
    let log = std::fs::File::create(dir.join(format!("{label}.log"))).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.env("ADDR", format!("127.0.0.1:{port}"))
        .env("TICK_MS", args.tick_ms.to_string())
        .env("SHUTDOWN_GRACE_PERIOD", args.grace_s.to_string())
        .env("PROPAGATION_DELAY_MS", args.propagation_ms().to_string())
        .env("RECONNECT_DELAY", args.reconnect_s.to_string())
        .env("DRAIN_SPREAD_MS", args.spread_ms.to_string())
        .env("RUST_LOG", "warn")
        .env_remove("REDIS_URL")
        .env_remove("REDIS_CLUSTER_NODES")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true);
    let started_ms = clock.ms();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .map_err(|_| format!("{label} ({}) did not start", kind.binary()))?
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    if !first.starts_with("listening on http://") {
        return Err(format!("{label}: unexpected first line {first:?}"));
    }
    let rest = tokio::spawn(async move {
        let mut v = Vec::new();
        while let Ok(Some(l)) = lines.next_line().await {
            v.push(l);
        }
        v
    });
    Ok(Replica {
        label,
        slot,
        child,
        rest,
        started_ms,
        ready_ms: None,
    })
}

fn signal(pid: Option<u32>, sig: &str) {
    if let Some(pid) = pid {
        let _ = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status();
    }
}

/// `SIGTERM`, then wait for the exit: at most grace + 5 s for tower-drain (then `SIGKILL`),
/// exactly the grace period for the baseline (then `SIGKILL`, as Kubernetes does).
async fn retire(
    mut r: Replica,
    kind: Kind,
    grace: Duration,
    clock: &Clock,
    events: &Mutex<Vec<RollEvent>>,
) -> Retired {
    let term_ms = clock.ms();
    push_event(events, term_ms, "SIGTERM", &r.label);
    signal(r.child.id(), "-TERM");
    let limit = if kind == Kind::Baseline {
        grace
    } else {
        grace + Duration::from_secs(5)
    };
    let mut killed = false;
    let status = match tokio::time::timeout(limit, r.child.wait()).await {
        Ok(s) => s.ok(),
        Err(_) => {
            killed = true;
            push_event(events, clock.ms(), "SIGKILL", &r.label);
            let _ = r.child.start_kill();
            r.child.wait().await.ok()
        }
    };
    let exit_ms = clock.ms();
    push_event(events, exit_ms, "exit", &r.label);
    let lines = r.rest.await.unwrap_or_default();
    let report = lines
        .iter()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| v["shutdown_report"].clone())
        .unwrap_or(Value::Null);
    Retired {
        label: r.label,
        slot: r.slot,
        started_ms: r.started_ms,
        ready_ms: r.ready_ms,
        term_ms,
        exit_ms,
        killed,
        code: status.and_then(|s| s.code()),
        report,
    }
}

#[derive(Debug, Clone)]
struct RollEvent {
    ms: f64,
    what: &'static str,
    replica: String,
}

fn push_event(events: &Mutex<Vec<RollEvent>>, ms: f64, what: &'static str, replica: &str) {
    events.lock().unwrap().push(RollEvent {
        ms,
        what,
        replica: replica.to_owned(),
    });
}

// ---------------------------------------------------------------------------------------
// One run

/// Everything one run measured.
#[derive(Debug)]
struct RunResult {
    kind: Kind,
    outcome: Outcome,
    clients: BTreeMap<&'static str, usize>,
    retired: Vec<Retired>,
    events: Vec<RollEvent>,
    /// (ms, open streams per slot)
    samples: Vec<(f64, Vec<i64>)>,
    failures: Vec<(f64, &'static str)>,
    /// Which replica held which slot when: (slot, from ms, to ms, label).
    tenancy: Vec<(usize, f64, f64, String)>,
    duration_ms: f64,
    browser: Option<Value>,
    /// h2c mode: (pool size, connections opened over the run).
    h2_connections: Option<(usize, u64)>,
}

async fn run(kind: Kind, args: &Args, bins: &Path) -> Result<RunResult, String> {
    let dir = std::env::temp_dir().join(format!(
        "rolling-deploy-{}-{}",
        std::process::id(),
        kind.binary()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let bin = bins.join(kind.binary());
    let n = args.replicas;
    let slots: Vec<u16> = (0..2 * n).map(|_| free_port()).collect();
    let port = free_port();
    let socket = dir.join("admin.sock");
    let browser_ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let page = dir.join("rolling.html");
    let browser = args.browser && kind != Kind::Grpc;
    if browser {
        std::fs::write(&page, browser_page(&browser_ports)).map_err(|e| e.to_string())?;
    }
    // HAProxy needs two descriptors per connection (client and server side).
    let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(4096, |(soft, _)| soft);
    let maxconn = (nofile.saturating_sub(200) / 2).clamp(256, 100_000);
    let config = haproxy_config(
        kind,
        args,
        maxconn,
        port,
        &slots,
        &socket,
        browser.then_some((&browser_ports[..], page.as_path())),
    );
    let haproxy = Haproxy::start(&dir, &config, port, socket).await?;
    let clock = Clock(Instant::now());
    let events = Mutex::new(Vec::new());
    let mut tenancy = Vec::new();

    let launch = Launch {
        bin: &bin,
        kind,
        args,
        dir: &dir,
        clock: &clock,
    };
    // Replica i lives in slot 2i, its replacement in 2i+1, the next one in 2i again, ...
    let mut live: Vec<Replica> = Vec::new();
    let mut generation = 0;
    for i in 0..n {
        generation += 1;
        let label = format!("r{generation}");
        let r = start_replica(&launch, label.clone(), 2 * i, slots[2 * i]).await?;
        push_event(&events, r.started_ms, "start", &label);
        live.push(r);
    }
    let running: Vec<usize> = live.iter().map(|r| r.slot).collect();
    haproxy
        .wait_for(|s| Some(running.contains(&s)), Duration::from_secs(10))
        .await?;
    for r in &mut live {
        r.ready_ms = Some(clock.ms());
        push_event(&events, clock.ms(), "ready", &r.label);
    }

    let shared = Arc::new(Shared {
        clock: clock.clone(),
        open: (0..2 * n).map(|_| AtomicI64::new(0)).collect(),
        failures: Mutex::new(Vec::new()),
        stop: CancellationToken::new(),
    });

    // The sampler: open streams per slot every 100 ms.
    let sampler = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut v = Vec::new();
            let mut iv = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = iv.tick() => {}
                    _ = shared.stop.cancelled() => break,
                }
                let open = shared
                    .open
                    .iter()
                    .map(|a| a.load(Ordering::Relaxed))
                    .collect();
                v.push((shared.clock.ms(), open));
            }
            v
        })
    };

    // The clients.
    let mut clients = BTreeMap::new();
    let mut h2_pool = None;
    let mut tasks = tokio::task::JoinSet::new();
    if kind == Kind::Grpc {
        let callers = (args.clients / 10).max(1);
        // One HTTP/2 connection per channel. HAProxy allows 100 concurrent streams per
        // connection; a client that opens more before HAProxy's SETTINGS arrive gets some
        // refused, so stay well below.
        let channels = (args.clients + callers).div_ceil(80).max(1);
        let channels: Vec<_> = (0..channels)
            .map(|_| {
                tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
                    .unwrap()
                    .connect_lazy()
            })
            .collect();
        for i in 0..args.clients {
            tasks.spawn(grpc_watcher(
                shared.clone(),
                channels[i % channels.len()].clone(),
                args.tick_ms,
            ));
            // Arrive over ~1 s rather than in one burst: thousands of streams opened at once
            // on fresh HTTP/2 connections (before HAProxy and the replicas have announced
            // their stream limits) get some answered with HAProxy error pages.
            if i % 200 == 199 {
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        }
        for i in 0..callers {
            tasks.spawn(grpc_caller(
                shared.clone(),
                channels[i % channels.len()].clone(),
            ));
        }
        clients.insert("gRPC Watch", args.clients);
        clients.insert("gRPC short-call loops", callers);
    } else {
        let ws = (args.clients as f64 * args.ws_share).round() as usize;
        let sse = args.clients - ws;
        let pool = args
            .h2
            .then(|| Arc::new(H2Pool::new(port, sse.div_ceil(args.h2_streams))));
        for i in 0..sse {
            let h2 = pool.clone().map(|p| (p, i));
            tasks.spawn(sse_client(shared.clone(), port, h2, args.tick_ms));
            if i % 200 == 199 {
                tokio::task::yield_now().await;
            }
        }
        h2_pool = pool;
        for i in 0..ws {
            tasks.spawn(ws_client(shared.clone(), port, args.tick_ms, i as u64));
        }
        clients.insert(
            if args.h2 {
                "SSE (h2c)"
            } else {
                "SSE (HTTP/1.1)"
            },
            sse,
        );
        clients.insert("WebSocket", ws);
    }
    let browser_task = if browser {
        let url = format!("http://127.0.0.1:{}/rolling.html", browser_ports[0]);
        Some(tokio::spawn(browser::open(url)))
    } else {
        None
    };

    // Let the clients connect (at most 15 s), then a second of steady state.
    let want = args.clients as i64;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let open: i64 = shared.open.iter().map(|a| a.load(Ordering::Relaxed)).sum();
        if open >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let browser_session = match browser_task {
        Some(t) => Some(t.await.map_err(|e| e.to_string())??),
        None => None,
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The roll.
    let grace = Duration::from_secs(args.grace_s);
    let mut retired = Vec::new();
    for _round in 0..args.rounds {
        for i in 0..n {
            let old = live.remove(i);
            let slot = old.slot ^ 1;
            generation += 1;
            let label = format!("r{generation}");
            let mut new = start_replica(&launch, label.clone(), slot, slots[slot]).await?;
            push_event(&events, new.started_ms, "start", &label);
            haproxy
                .wait_for(|s| (s == slot).then_some(true), Duration::from_secs(10))
                .await?;
            new.ready_ms = Some(clock.ms());
            push_event(&events, clock.ms(), "ready", &label);
            live.insert(i, new);
            let r = retire(old, kind, grace, &clock, &events).await;
            tenancy.push((r.slot, r.started_ms, r.exit_ms, r.label.clone()));
            retired.push(r);
        }
    }
    // Let the last reconnects land: at least 2 s, until every client that has not given up
    // holds a stream again (at most 8 s; a cut stream waits the default 3 s retry).
    let settled = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    while settled.elapsed() < Duration::from_secs(8) {
        let open: i64 = shared.open.iter().map(|a| a.load(Ordering::Relaxed)).sum();
        let gave_up = shared
            .failures
            .lock()
            .unwrap()
            .iter()
            .filter(|f| f.1 == "gave up")
            .count();
        if open + gave_up as i64 >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let browser_result = match browser_session {
        Some(s) => Some(browser::finish(s).await?),
        None => None,
    };
    shared.stop.cancel();
    let mut outcome = Outcome::default();
    while let Some(o) = tasks.join_next().await {
        outcome.merge(o.map_err(|e| e.to_string())?);
    }
    let samples = sampler.await.map_err(|e| e.to_string())?;
    let duration_ms = clock.ms();
    for r in live {
        tenancy.push((r.slot, r.started_ms, duration_ms, r.label.clone()));
        signal(r.child.id(), "-KILL");
    }
    drop(haproxy);
    let failures = std::mem::take(&mut *shared.failures.lock().unwrap());
    let mut events = events.into_inner().unwrap();
    events.sort_by(|a, b| a.ms.total_cmp(&b.ms));
    if keep_logs() {
        eprintln!("logs kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(RunResult {
        kind,
        outcome,
        clients,
        retired,
        events,
        samples,
        failures,
        tenancy,
        duration_ms,
        browser: browser_result,
        h2_connections: h2_pool.map(|p| (p.conns.len(), p.opened.load(Ordering::Relaxed))),
    })
}

// ---------------------------------------------------------------------------------------
// The browser: headless Chromium with 20 native EventSources, through HAProxy.

mod browser {
    use std::path::PathBuf;
    use std::process::Stdio;
    use std::time::Duration;

    use serde_json::{json, Value};
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::process::{Child, Command};

    /// chromedriver (and the Chromium it starts) plus a WebDriver session.
    #[derive(Debug)]
    pub(crate) struct Session {
        driver: Child,
        client: fantoccini::Client,
        profile: PathBuf,
    }

    fn which(var: &str, names: &[&str]) -> Result<PathBuf, String> {
        if let Some(p) = std::env::var_os(var) {
            return Ok(p.into());
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .flat_map(|d| names.iter().map(move |n| d.join(n)))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                format!(
                    "--browser needs {} (Debian: apt-get install chromium chromium-driver)",
                    names.join(" or ")
                )
            })
    }

    /// Starts Chromium and loads `url`.
    pub(crate) async fn open(url: String) -> Result<Session, String> {
        let chromium = which("CHROMIUM", &["chromium", "chromium-browser"])?;
        let chromedriver = which("CHROMEDRIVER", &["chromedriver"])?;
        let port = super::free_port();
        let mut driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("chromedriver: {e}"))?;
        let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();
        let started = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(l)) = lines.next_line().await {
                if l.contains("started successfully") {
                    return true;
                }
            }
            false
        })
        .await;
        if !matches!(started, Ok(true)) {
            return Err("chromedriver did not start".into());
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let profile = std::env::temp_dir().join(format!("rolling-deploy-chromium-{port}"));
        let _ = std::fs::remove_dir_all(&profile);
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update",
                         format!("--user-data-dir={}", profile.display())],
            },
        });
        let caps = match caps {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let client = fantoccini::ClientBuilder::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
        )
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .map_err(|e| format!("WebDriver session: {e}"))?;
        client.goto(&url).await.map_err(|e| e.to_string())?;
        // Wait until every source has its first tick.
        for _ in 0..100 {
            let v = client
                .execute(
                    "return window.sources.filter((s) => s.ticks > 0).length;",
                    vec![],
                )
                .await
                .map_err(|e| e.to_string())?;
            if v.as_u64() == Some(20) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Session {
            driver,
            client,
            profile,
        })
    }

    /// Reads every source's record, then closes the browser. Per source: opens, reconnects
    /// (opens after the first), errors, ticks, shutdown frames seen, whether it reached
    /// `CLOSED`, ms since its last tick, and its longest gap between ticks.
    pub(crate) async fn finish(mut s: Session) -> Result<Value, String> {
        let v = s
            .client
            .execute(
                "const now = performance.now(); return window.sources.map((r) => ({ \
                 i: r.i, port: r.port, opens: r.opens, reconnects: Math.max(r.opens - 1, 0), \
                 errors: r.errors, ticks: r.ticks, shutdowns: r.shutdowns, closed: r.closed, \
                 since_last_tick_ms: Math.round(now - r.lastTick), max_gap_ms: Math.round(r.maxGap) }));",
                vec![],
            )
            .await
            .map_err(|e| e.to_string())?;
        let _ = s.client.close().await;
        let _ = s.driver.start_kill();
        let _ = s.driver.wait().await;
        let _ = std::fs::remove_dir_all(&s.profile);
        Ok(v)
    }
}

// ---------------------------------------------------------------------------------------
// Reporting

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

fn sum_report(r: &[Retired], field: &str) -> u64 {
    r.iter().filter_map(|r| r.report[field].as_u64()).sum()
}

fn run_json(r: &RunResult, args: &Args) -> Value {
    let o = &r.outcome;
    let mut rec = o.reconnect_ms.clone();
    let mut open = o.open_ms.clone();
    let term_exit: Vec<f64> = r.retired.iter().map(|x| x.exit_ms - x.term_ms).collect();
    json!({
        "server": r.kind.name(),
        "clients": r.clients,
        "streams_opened": o.streams,
        "reconnects": rec.len(),
        "streams_ended_with_final_frame": o.final_frames,
        "streams_cut": o.cut,
        "non_200": o.non_200,
        "connect_errors": o.connect_errors,
        "clients_gave_up": o.gave_up,
        "ws_closed_1001": o.ws_1001,
        "ws_closed_1006": o.ws_1006,
        "rpc_calls": o.rpc_calls,
        "rpc_failed": o.rpc_failed,
        "rpc_retried_after_drain_unavailable": o.rpc_retried,
        "rpc_rejected_unavailable": o.rpc_rejected,
        "rpc_errors": o.rpc_errors,
        "client_visible_failures": o.failures(),
        "reconnect_ms": {
            "p50": percentile(&mut rec, 0.5),
            "p99": percentile(&mut rec, 0.99),
            "max": percentile(&mut rec, 1.0),
        },
        "time_to_headers_ms": {
            "p50": percentile(&mut open, 0.5),
            "p99": percentile(&mut open, 0.99),
            "max": percentile(&mut open, 1.0),
        },
        "longest_gap_without_stream_ms": o.max_gap_ms,
        "retry_ms": args.reconnect_s * 1000,
        "longest_gap_between_ticks_ms": o.max_tick_gap_ms,
        "ticks": o.ticks,
        "ticks_missed_estimate": o.missed_ticks,
        "sigterm_to_exit_ms": {
            "max": term_exit.iter().copied().fold(0.0, f64::max),
            "min": term_exit.iter().copied().fold(f64::INFINITY, f64::min),
        },
        "replicas_killed": r.retired.iter().filter(|x| x.killed).count(),
        "replicas_nonzero_exit": r.retired.iter().filter(|x| x.code != Some(0)).count(),
        "replicas": r.retired.iter().map(|x| json!({
            "replica": x.label,
            "slot": format!("s{}", x.slot),
            "start_to_ready_ms": x.ready_ms.map(|t| t - x.started_ms),
            "sigterm_to_exit_ms": x.exit_ms - x.term_ms,
            "killed": x.killed,
            "exit_code": x.code,
            "shutdown_report": x.report,
        })).collect::<Vec<_>>(),
        "failures_before_the_roll": r.failures.iter().filter(|(t, _)| r.retired.first().is_none_or(|x| *t < x.term_ms)).count(),
        "first_failures": r.failures.iter().take(50).map(|(t, what)| json!({"ms": t.round(), "what": what})).collect::<Vec<_>>(),
        "roll_events": r.events.iter().map(|e| json!({"ms": e.ms.round(), "event": e.what, "replica": e.replica})).collect::<Vec<_>>(),
        "browser": r.browser,
        "h2c_connections": r.h2_connections.map(|(pool, opened)| json!({"pool": pool, "opened": opened})),
        "duration_ms": r.duration_ms.round(),
    })
}

fn table(runs: &[(RunResult, Value)]) -> String {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&Value, &RunResult) -> String| {
        rows.push((name.to_owned(), runs.iter().map(|(r, v)| f(v, r)).collect()));
    };
    let n = |k: &'static str| move |v: &Value, _: &RunResult| v[k].to_string();
    row("clients", &|_, r| {
        r.clients
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(" + ")
    });
    row("client-visible failures", &n("client_visible_failures"));
    row("  streams cut without a final frame", &n("streams_cut"));
    row("  non-200 answers", &n("non_200"));
    row("  clients that gave up", &n("clients_gave_up"));
    row("  connect errors", &n("connect_errors"));
    if runs
        .iter()
        .any(|(r, _)| r.clients.get("WebSocket").is_some_and(|n| *n > 0))
    {
        row("  WebSockets closed 1006", &n("ws_closed_1006"));
        row("WebSockets closed 1001 (drain)", &n("ws_closed_1001"));
    }
    if runs.iter().any(|(r, _)| r.kind == Kind::Grpc) {
        row(
            "  RPCs failed (not the drain's UNAVAILABLE)",
            &n("rpc_failed"),
        );
        row(
            "RPCs retried after the drain's UNAVAILABLE",
            &n("rpc_retried_after_drain_unavailable"),
        );
        row(
            "  of which new calls rejected while closing",
            &n("rpc_rejected_unavailable"),
        );
        row("RPCs", &n("rpc_calls"));
    }
    if runs.iter().any(|(r, _)| r.h2_connections.is_some()) {
        row("h2c connections to HAProxy: pool / opened", &|_, r| {
            r.h2_connections
                .map_or("-".into(), |(p, o)| format!("{p} / {o}"))
        });
    }
    row(
        "streams ended with a final frame",
        &n("streams_ended_with_final_frame"),
    );
    row("reconnects", &n("reconnects"));
    let ms = |a: &'static str, b: &'static str| {
        move |v: &Value, _: &RunResult| format!("{:.0}", v[a][b].as_f64().unwrap_or(0.0))
    };
    row(
        "reconnect latency p50 (ms, incl. retry wait)",
        &ms("reconnect_ms", "p50"),
    );
    row("reconnect latency p99 (ms)", &ms("reconnect_ms", "p99"));
    row("longest per-client gap without a stream (ms)", &|v, _| {
        format!(
            "{:.0}",
            v["longest_gap_without_stream_ms"].as_f64().unwrap_or(0.0)
        )
    });
    row("longest gap between ticks (ms)", &|v, _| {
        format!(
            "{:.0}",
            v["longest_gap_between_ticks_ms"].as_f64().unwrap_or(0.0)
        )
    });
    row(
        "ticks missed across reconnects (estimate)",
        &n("ticks_missed_estimate"),
    );
    row(
        "time to response headers p99 (ms)",
        &ms("time_to_headers_ms", "p99"),
    );
    row(
        "old replicas: SIGTERM to exit, max (ms)",
        &ms("sigterm_to_exit_ms", "max"),
    );
    row("old replicas: SIGKILLed / exit status != 0", &|v, _| {
        format!("{} / {}", v["replicas_killed"], v["replicas_nonzero_exit"])
    });
    row("shutdown reports: streams at drain", &|_, r| {
        sum_report(&r.retired, "streams_at_drain").to_string()
    });
    row("shutdown reports: notified / force-closed", &|_, r| {
        format!(
            "{} / {}",
            sum_report(&r.retired, "notified"),
            sum_report(&r.retired, "force_closed")
        )
    });
    row("shutdown reports: rejected (503)", &|_, r| {
        sum_report(&r.retired, "rejected").to_string()
    });
    if runs.iter().any(|(r, _)| r.browser.is_some()) {
        let b = |r: &RunResult| r.browser.as_ref().and_then(Value::as_array).cloned();
        row("Chromium, 20 EventSources: CLOSED", &|_, r| {
            b(r).map_or("-".into(), |v| {
                v.iter().filter(|x| x["closed"] == true).count().to_string()
            })
        });
        row("Chromium: reconnects (most for one source)", &|_, r| {
            b(r).map_or("-".into(), |v| {
                let n: Vec<u64> = v.iter().filter_map(|x| x["reconnects"].as_u64()).collect();
                format!(
                    "{} ({})",
                    n.iter().sum::<u64>(),
                    n.iter().max().unwrap_or(&0)
                )
            })
        });
        row("Chromium: longest gap between ticks (ms)", &|_, r| {
            b(r).map_or("-".into(), |v| {
                let m = v.iter().filter_map(|x| x["max_gap_ms"].as_u64()).max();
                m.unwrap_or(0).to_string()
            })
        });
    }
    row("run time (s)", &|_, r| {
        format!("{:.1}", r.duration_ms / 1000.0)
    });

    let w0 = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..runs.len())
        .map(|i| {
            rows.iter()
                .map(|(_, v)| v[i].len())
                .chain([runs[i].0.kind.name().len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    let _ = write!(s, "| {:w0$} |", "");
    for (i, (r, _)) in runs.iter().enumerate() {
        let _ = write!(s, " {:>w$} |", r.kind.name(), w = widths[i]);
    }
    let _ = write!(s, "\n|{}|", "-".repeat(w0 + 2));
    for w in &widths {
        let _ = write!(s, "{}:|", "-".repeat(w + 1));
    }
    s.push('\n');
    for (k, v) in &rows {
        let _ = write!(s, "| {k:w0$} |");
        for (i, x) in v.iter().enumerate() {
            let _ = write!(s, " {x:>w$} |", w = widths[i]);
        }
        s.push('\n');
    }
    s
}

fn replica_table(r: &RunResult) -> String {
    let mut s = format!("{}: replaced replicas\n", r.kind.name());
    for (e, n) in &r.outcome.rpc_errors {
        let _ = writeln!(s, "  failed RPCs: {n} x {e}");
    }
    for x in &r.retired {
        let rep = &x.report;
        let _ = writeln!(
            s,
            "  {:<4} s{}  ready {:>5.0} ms after start  SIGTERM->exit {:>6.0} ms  {}  {}",
            x.label,
            x.slot,
            x.ready_ms.map_or(f64::NAN, |t| t - x.started_ms),
            x.exit_ms - x.term_ms,
            if x.killed {
                "SIGKILLed".to_owned()
            } else {
                format!("exit {}", x.code.map_or("?".into(), |c| c.to_string()))
            },
            if rep.is_null() {
                "no shutdown_report".to_owned()
            } else {
                format!(
                    "at drain {} notified {} graceful {} forced {} rejected {} ({} ms)",
                    rep["streams_at_drain"],
                    rep["notified"],
                    rep["closed_gracefully"],
                    rep["force_closed"],
                    rep["rejected"],
                    rep["duration_ms"]
                )
            }
        );
    }
    if let Some(b) = r.browser.as_ref().and_then(Value::as_array) {
        let _ = writeln!(
            s,
            "{}: browser EventSources (reconnects each):",
            r.kind.name()
        );
        let closed = b.iter().filter(|x| x["closed"] == true).count();
        let _ = writeln!(
            s,
            "  reconnects {:?}; CLOSED: {closed}; min ticks {}; max ms since last tick {}",
            b.iter()
                .map(|x| x["reconnects"].as_u64().unwrap_or(0))
                .collect::<Vec<_>>(),
            b.iter()
                .filter_map(|x| x["ticks"].as_u64())
                .min()
                .unwrap_or(0),
            b.iter()
                .filter_map(|x| x["since_last_tick_ms"].as_u64())
                .max()
                .unwrap_or(0),
        );
    }
    s
}

// ---------------------------------------------------------------------------------------
// The SVG timeline

fn draw_svg(path: &Path, runs: &[(RunResult, Value)]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let height = 380 * runs.len() as u32;
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((runs.len(), 1));
    let x_max = runs
        .iter()
        .map(|(r, _)| r.duration_ms / 1000.0)
        .fold(1.0, f64::max);
    for ((r, v), area) in runs.iter().zip(panels.iter()) {
        let y_max = r
            .samples
            .iter()
            .flat_map(|(_, s)| s.iter().copied())
            .max()
            .unwrap_or(1)
            .max(1) as f64
            * 1.15;
        let caption = format!(
            "{}: open streams per replica; {} client-visible failures",
            r.kind.name(),
            v["client_visible_failures"]
        );
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            // A fifth more room on the right, where the legend goes.
            .build_cartesian_2d(0f64..x_max * 1.25, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("open streams")
            .light_line_style(WHITE.mix(0.0))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;

        // Roll events: SIGTERM (orange) and exit (grey) as vertical lines, ready (green).
        let mut terms = 0;
        for e in &r.events {
            let (color, dash) = match e.what {
                "SIGTERM" => (RGBColor(230, 120, 0), false),
                "SIGKILL" => (RED, false),
                "exit" => (RGBColor(120, 120, 120), true),
                "ready" => (RGBColor(0, 150, 0), true),
                _ => continue,
            };
            let x = e.ms / 1000.0;
            let style = color.mix(if dash { 0.5 } else { 0.9 }).stroke_width(1);
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, y_max)],
                style,
            )))?;
            if e.what == "SIGTERM" || e.what == "SIGKILL" {
                // Labels alternate between two heights so neighbours do not overlap.
                terms += 1;
                let y = if e.what == "SIGKILL" {
                    0.85
                } else if terms % 2 == 1 {
                    0.97
                } else {
                    0.91
                };
                chart.draw_series(std::iter::once(Text::new(
                    format!("{} {}", e.what, e.replica),
                    (x, y_max * y),
                    ("sans-serif", 11).into_font().color(&color),
                )))?;
            }
        }

        // One line per replica: its slot's count while it held the slot.
        for (i, (slot, from, to, label)) in r.tenancy.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let pts: Vec<(f64, f64)> = r
                .samples
                .iter()
                .filter(|(t, _)| t >= from && t <= to)
                .map(|(t, s)| (t / 1000.0, s[*slot] as f64))
                .collect();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }

        // Failures: one red cross per 250 ms bucket, at the height of its count.
        let mut buckets: BTreeMap<i64, usize> = BTreeMap::new();
        for (t, _) in &r.failures {
            *buckets.entry((t / 250.0) as i64).or_default() += 1;
        }
        if !buckets.is_empty() {
            chart
                .draw_series(buckets.iter().map(|(b, n)| {
                    Cross::new(
                        (*b as f64 * 0.25, (*n as f64).min(y_max)),
                        5,
                        RED.stroke_width(2),
                    )
                }))?
                .label("failures / 250 ms")
                .legend(|(x, y)| Cross::new((x + 8, y), 5, RED.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 11))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------

/// The directory holding the server binaries: the tool's own (`target/<profile>/examples`),
/// after `cargo build` of the ones this run needs, in the same profile.
fn binaries(args: &Args, kinds: &[Kind]) -> Result<PathBuf, String> {
    if let Some(d) = &args.bin_dir {
        return Ok(d.clone());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().ok_or("no directory for the tool")?.to_owned();
    if args.build {
        let release = dir
            .parent()
            .and_then(|p| p.file_name())
            .is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.arg("build").current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cmd.arg("--release");
        }
        for k in kinds {
            cmd.args(["--example", k.binary()]);
        }
        if kinds.contains(&Kind::Grpc) {
            // The readiness check is gRPC health checking.
            cmd.args(["--features", "tonic-health"]);
        }
        let ok = cmd.status().map_err(|e| e.to_string())?.success();
        if !ok {
            return Err("cargo build of the servers failed".into());
        }
    }
    Ok(dir)
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    // Thousands of sockets: ours, and the replicas' and HAProxy's (they inherit it).
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    if limit < (args.clients as u64) * 3 + 1000 {
        eprintln!(
            "warning: open-file limit {limit} may be too low for {} clients",
            args.clients
        );
    }
    let kinds: Vec<Kind> = if args.grpc {
        vec![Kind::Grpc]
    } else {
        match args.only.as_deref() {
            Some("drain") => vec![Kind::Drain],
            Some("baseline") => vec![Kind::Baseline],
            _ => vec![Kind::Drain, Kind::Baseline],
        }
    };
    let bins = match binaries(&args, &kinds) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let mut runs = Vec::new();
    for kind in kinds {
        eprintln!(
            "== {}: {} replicas, {} clients, {} round(s)",
            kind.name(),
            args.replicas,
            args.clients,
            args.rounds
        );
        match run(kind, &args, &bins).await {
            Ok(r) => {
                let v = run_json(&r, &args);
                eprint!("{}", replica_table(&r));
                runs.push((r, v));
            }
            Err(e) => {
                eprintln!("error: {}: {e}", kind.name());
                std::process::exit(1);
            }
        }
    }
    println!("{}", table(&runs));
    if let Some(p) = &args.json {
        let v = json!({
            "settings": {
                "replicas": args.replicas, "clients": args.clients, "rounds": args.rounds,
                "h2": args.h2, "h2_backend": args.h2_backend, "ws_share": args.ws_share, "tick_ms": args.tick_ms,
                "grace_s": args.grace_s, "check_ms": args.check_ms,
                "propagation_delay_ms": args.propagation_ms(), "reconnect_delay_s": args.reconnect_s,
                "drain_spread_ms": args.spread_ms,
            },
            "runs": runs.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
        });
        if let Err(e) = std::fs::write(p, serde_json::to_string_pretty(&v).unwrap()) {
            eprintln!("error: write {}: {e}", p.display());
            std::process::exit(1);
        }
    }
    if let Some(p) = &args.svg {
        if let Err(e) = draw_svg(p, &runs) {
            eprintln!("error: draw {}: {e}", p.display());
            std::process::exit(1);
        }
    }
}
