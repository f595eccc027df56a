//! A real-socket load tool for tower-drain. Each subcommand prints one JSON line on stdout and
//! a human summary on stderr, and exits non-zero when its run was not clean.
//!
//! ```text
//! cargo run --release --example loadtest -- drain --streams 10000 --rounds 3
//! cargo run --release --example loadtest -- throughput --seconds 3 --connections 32
//! cargo run --release --example loadtest -- memory --streams 100000
//! cargo run --release --example loadtest -- frames --rounds 31
//! cargo run --release --example loadtest -- requests --rounds 31
//! ```
//!
//! - `drain`: a server process (this binary re-executed with a hidden subcommand) serves N SSE
//!   streams through the full `DrainStack` over TCP on 127.0.0.1; this process opens N client
//!   streams, waits until each has had its first event, triggers the drain (a line on the
//!   server's stdin) and measures, per client, the time from the trigger to the arrival of its
//!   shutdown frame. Then the same for the raw floor: a server process with one bare tokio task
//!   per socket writing the same frame bytes on the same trigger, no crate code; and for the
//!   hyper floor: the same hyper server with a hand-written draining body (`hyper_floor_ms`,
//!   `ratio_max_vs_hyper`). Every run uses separate server and client processes (the
//!   open-file limit is per process). `--rounds R` (default 3) repeats the three runs R times,
//!   in an order that rotates from round to round; each percentile printed is its median over
//!   the rounds, and `ratio_max` is the median of the rounds' own ratios (listed in
//!   `ratio_max_rounds`), since two maxima measured a few seconds apart on a shared machine
//!   move with it. Exits non-zero unless every stream of every run was notified and ended
//!   with the chunked body's last chunk. `--hyper-extra N` gives each of the hyper floor's
//!   bodies N heap objects of its own (128 bytes each), written at the trigger and freed with
//!   the final frame, as the crate's per-stream state is: what such objects cost a drain.
//!   Each server also reports the CPU time it used from the trigger until every client had
//!   its end (the scheduler's count over all its threads): `server_cpu_us_per_stream` per
//!   server and `cpu_vs_hyper`, the crate's over the hyper floor's (median of the rounds'
//!   ratios), a steadier figure than a maximum latency on a shared machine.
//! - `throughput`: hello-world over HTTP/1.1 keep-alive, bare axum vs the same app under the
//!   full `DrainStack`, alternating runs, same process. `--layer` puts one layer in place of
//!   the stack: an identity `MapResponseLayer` (`identity`, the floor of any layer), a
//!   pass-through body wrapper (`body`, the floor of any layer that follows the body), one of
//!   the crate's layers, or tower-http's `TimeoutLayer` (`timeout`).
//! - `frames`: per-frame cost of the full stack's body against the raw body (the workloads of
//!   `benches/frames.rs`), measured as paired rounds in one process: each round times both,
//!   in alternating order, and the figure is the median of the rounds' ratios, so a machine
//!   that speeds up or slows down between two criterion runs does not move it.
//! - `requests`: per-request cost (call, body to its end) of bare, `RejectLayer`, tower's
//!   `ConcurrencyLimitLayer`, tower-http `TimeoutLayer` + `ConcurrencyLimitLayer`, and the full
//!   stack (the workloads of `benches/layers.rs`), measured like `frames`: paired rounds in
//!   rotating order, medians of each round's differences to bare.
//! - `memory`: heap bytes per tracked open stream (counted by `allocation_counter`'s global
//!   allocator on this thread; streams held in-process without sockets) and the per-request cost with 1,000 vs 100,000 open streams.

use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, Write as _};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tower::{Layer, ServiceExt};
use tower_drain::frame::{FinalFrame, FrameContext, FrameKind, Sse};
use tower_drain::{DrainController, DrainReason, DrainStack};

// `allocation_counter` is this binary's global allocator: it counts each thread's
// allocations in thread-local cells, so the socket scenarios (two worker threads) pay no shared
// counter on every allocation, and `memory` measures what its own thread allocates.
use allocation_counter::measure;

#[path = "../benches/support/workloads.rs"]
mod workloads;

const FIRST_EVENT: &[u8] = b"data: hello\n\n";

fn usage() -> ! {
    eprintln!(
        "usage: loadtest drain [--streams N] [--rounds R] [--hyper-extra N] | throughput [--seconds S] [--connections C] [--rounds R] [--layer stack|identity|body|reject|track|guard|frame|timeout] [--only bare|stack] | memory [--streams N] | frames [--rounds R] | requests [--rounds R]"
    );
    std::process::exit(2)
}

/// `--name value` from the arguments, or `default`.
fn arg(args: &[String], name: &str, default: u64) -> u64 {
    match args.iter().position(|a| a == name) {
        None => default,
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| usage()),
    }
}

/// `--name value` as a string.
fn str_arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == name)?;
    Some(args.get(i + 1).unwrap_or_else(|| usage()).as_str())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else { usage() };
    let ok = match cmd.as_str() {
        "drain" => drain_cmd(
            arg(&args, "--streams", 10_000) as usize,
            arg(&args, "--rounds", 3) as usize,
            arg(&args, "--hyper-extra", 0) as usize,
        ),
        "throughput" => throughput_cmd(
            arg(&args, "--seconds", 3),
            arg(&args, "--connections", 32) as usize,
            arg(&args, "--rounds", 5) as usize,
            str_arg(&args, "--layer").unwrap_or("stack"),
            str_arg(&args, "--only"),
        ),
        "memory" => memory_cmd(arg(&args, "--streams", 100_000) as usize),
        "frames" => frames_cmd(arg(&args, "--rounds", 31) as usize),
        "requests" => requests_cmd(arg(&args, "--rounds", 31) as usize),
        "__serve" => {
            serve_cmd(
                args.get(1).map(String::as_str).unwrap_or("crate"),
                args.get(2).and_then(|n| n.parse().ok()).unwrap_or(0),
            );
            true
        }
        _ => usage(),
    };
    if !ok {
        std::process::exit(1);
    }
}

/// Raises the soft open-file limit to the hard one.
fn raise_nofile() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

// ---------------------------------------------------------------------------------------------
// drain
// ---------------------------------------------------------------------------------------------

/// An endless, quiet SSE body: one event, then pending (never woken by itself).
#[derive(Default)]
struct Quiet(Option<Bytes>);

impl Body for Quiet {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
            None => Poll::Pending,
        }
    }
}

fn sse_response<B>(body: B) -> Response<B> {
    let mut res = Response::new(body);
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    res
}

fn listener() -> TcpListener {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("reuseaddr");
    socket
        .bind("127.0.0.1:0".parse().unwrap())
        .expect("bind 127.0.0.1");
    socket.listen(4096).expect("listen")
}

/// The hidden server subcommand: prints `port N`, serves until a `drain` line arrives on
/// stdin, then drains; exits once every stream has ended (or stdin closes).
fn serve_cmd(mode: &str, hyper_extra: usize) {
    raise_nofile();
    let rt = multi_thread();
    let mode = mode.to_string();
    rt.block_on(async move {
        let listener = listener();
        let port = listener.local_addr().unwrap().port();
        println!("port {port}");
        std::io::stdout().flush().unwrap();

        let trigger = tokio_util::sync::CancellationToken::new();
        let stdin_trigger = trigger.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::stdin().lock().read_line(&mut line);
            let cpu_at_trigger = process_cpu_ns();
            stdin_trigger.cancel();
            // `cpu` once every client has its end: the CPU time this process used since the
            // trigger (the drain's, whatever thread spent it).
            line.clear();
            let _ = std::io::stdin().lock().read_line(&mut line);
            if line.trim() == "cpu" {
                let used = process_cpu_ns().saturating_sub(cpu_at_trigger);
                println!("cpu_ns {used}");
                std::io::stdout().flush().unwrap();
                // The next read ends when the parent closes stdin: time to exit.
                line.clear();
                let _ = std::io::stdin().lock().read_line(&mut line);
            }
            let _ = done_tx.send(());
        });

        match mode.as_str() {
            "raw" => serve_raw(listener, trigger, done_rx).await,
            "hyper" => serve_hyper(listener, trigger, done_rx, hyper_extra).await,
            _ => serve_crate(listener, trigger, done_rx).await,
        }
    });
}

/// CPU time this process's threads have used, in nanoseconds (the scheduler's own count,
/// `/proc/self/task/*/schedstat`, not 10-ms ticks).
fn process_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

async fn serve_crate(
    listener: TcpListener,
    trigger: tokio_util::sync::CancellationToken,
    done: tokio::sync::oneshot::Receiver<()>,
) {
    let drain = DrainController::new();
    let svc = DrainStack::new(drain.watch()).layer(tower::service_fn(
        |_req: Request<hyper::body::Incoming>| async {
            Ok::<_, Infallible>(sse_response(Quiet(Some(Bytes::from_static(FIRST_EVENT)))))
        },
    ));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let svc = hyper_util::service::TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    trigger.cancelled().await;
    drain.drain(DrainReason::Manual);
    let report = drain.report().await;
    println!(
        "{}",
        serde_json::json!({
            "notified": report.notified,
            "closed_gracefully": report.closed_gracefully,
            "force_closed": report.force_closed,
        })
    );
    std::io::stdout().flush().unwrap();
    let _ = done.await;
}

/// The shutdown frame the raw and hyper floors send (encoded once, before any stream exists).
fn floor_frame() -> Bytes {
    Sse::new()
        .encode(&FrameContext::new(FrameKind::Shutdown))
        .data_ref()
        .cloned()
        .expect("an SSE frame has data")
}

pin_project_lite::pin_project! {
    /// The hyper floor's body, written by hand: the first event, then on the trigger the
    /// shutdown frame and the end. No crate code.
    struct HandDrained {
        first: Option<Bytes>,
        last: Option<Bytes>,
        #[pin]
        signal: tokio_util::sync::WaitForCancellationFutureOwned,
        // `drain --hyper-extra N`: N heap objects of the stream's own, written at the trigger
        // and freed with the final frame, as the crate's per-stream state is.
        extra: Option<Box<Extra>>,
    }
}

/// One of the hyper floor's extra per-stream heap objects (128 bytes each).
struct Extra {
    bytes: [u8; 120],
    next: Option<Box<Extra>>,
}

impl Extra {
    fn chain(n: usize) -> Option<Box<Extra>> {
        (0..n).fold(None, |next, _| {
            Some(Box::new(Extra {
                bytes: [0; 120],
                next,
            }))
        })
    }

    /// Writes to every object of the chain (so each is touched at the drain, as the crate's
    /// per-stream state is).
    fn touch(mut e: Option<&mut Box<Extra>>) {
        while let Some(x) = e {
            x.bytes[0] = x.bytes[0].wrapping_add(1);
            e = x.next.as_mut();
        }
    }
}

impl Body for HandDrained {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.project();
        if let Some(b) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if this.last.is_none() {
            return Poll::Ready(None);
        }
        std::task::ready!(this.signal.poll(cx));
        Extra::touch(this.extra.as_mut());
        *this.extra = None;
        Poll::Ready(this.last.take().map(|b| Ok(Frame::data(b))))
    }
}

/// The same hyper server as the crate run, with a hand-written draining body instead of the
/// stack: separates hyper's share of the fan-out from the crate's.
async fn serve_hyper(
    listener: TcpListener,
    trigger: tokio_util::sync::CancellationToken,
    done: tokio::sync::oneshot::Receiver<()>,
    extra: usize,
) {
    let frame = floor_frame();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let (trigger, accepted) = (trigger.clone(), accepted.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                let (trigger, frame) = (trigger.clone(), frame.clone());
                let svc =
                    hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let body = HandDrained {
                            first: Some(Bytes::from_static(FIRST_EVENT)),
                            last: Some(frame.clone()),
                            signal: trigger.clone().cancelled_owned(),
                            extra: Extra::chain(extra),
                        };
                        std::future::ready(Ok::<_, Infallible>(sse_response(body)))
                    });
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        });
    }
    trigger.cancelled().await;
    let n = accepted.load(std::sync::atomic::Ordering::Relaxed);
    println!("{}", serde_json::json!({ "accepted": n }));
    std::io::stdout().flush().unwrap();
    let _ = done.await;
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut v = format!("{:x}\r\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(b"\r\n");
    v
}

async fn serve_raw(
    listener: TcpListener,
    trigger: tokio_util::sync::CancellationToken,
    done: tokio::sync::oneshot::Receiver<()>,
) {
    // The same bytes hyper writes for the crate's stream: headers with the first event, then
    // the shutdown event and the last chunk. Encoded once, before any stream exists.
    let frame = floor_frame();
    let mut head =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    head.extend_from_slice(&chunk(FIRST_EVENT));
    let head = Bytes::from(head);
    let mut last = chunk(&frame);
    last.extend_from_slice(b"0\r\n\r\n");
    let last = Bytes::from(last);
    let ended = Arc::new(tokio::sync::Semaphore::new(0));
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let (trigger, ended, accepted) = (trigger.clone(), ended.clone(), accepted.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                let (trigger, ended) = (trigger.clone(), ended.clone());
                let (head, last) = (head.clone(), last.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::with_capacity(1024);
                    let mut tmp = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                    if stream.write_all(&head).await.is_err() {
                        return;
                    }
                    trigger.cancelled().await;
                    if stream.write_all(&last).await.is_ok() {
                        ended.add_permits(1);
                    }
                    // Keep the socket until the client closes it, as hyper does.
                    let _ = stream.read(&mut tmp).await;
                });
            }
        });
    }
    trigger.cancelled().await;
    let n = accepted.load(std::sync::atomic::Ordering::Relaxed);
    let _ = ended.acquire_many(n as u32).await;
    println!("{}", serde_json::json!({ "notified": n }));
    std::io::stdout().flush().unwrap();
    let _ = done.await;
}

/// What one client saw.
#[derive(Clone, Copy, Debug, Default)]
struct ClientResult {
    /// When the shutdown event arrived.
    notified_at: Option<Instant>,
    /// The chunked body ended with its last chunk (not a reset or a cut).
    clean_end: bool,
}

/// Minimal HTTP/1.1 chunked SSE reader: reports the first event, then the shutdown event and
/// the body's end.
async fn client(
    port: u16,
    ready: tokio::sync::mpsc::UnboundedSender<bool>,
    permits: Arc<tokio::sync::Semaphore>,
) -> ClientResult {
    let mut out = ClientResult::default();
    let permit = permits.acquire_owned().await.unwrap();
    let mut stream = match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("connect: {e}");
            let _ = ready.send(false);
            return out;
        }
    };
    let _ = stream.set_nodelay(true);
    if stream
        .write_all(b"GET /events HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n")
        .await
        .is_err()
    {
        let _ = ready.send(false);
        return out;
    }
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    let mut pos = 0; // parse position in `buf`
    let mut headers_done = false;
    let mut events: Vec<u8> = Vec::new();
    let mut first = false;
    let mut permit = Some(permit);
    let mut tmp = [0u8; 4096];
    loop {
        // Parse what we have.
        loop {
            if !headers_done {
                let Some(end) = find(&buf[pos..], b"\r\n\r\n") else {
                    break;
                };
                let head = &buf[pos..pos + end];
                if !head.starts_with(b"HTTP/1.1 200") {
                    let _ = ready.send(false);
                    return out;
                }
                pos += end + 4;
                headers_done = true;
                continue;
            }
            let Some(line) = find(&buf[pos..], b"\r\n") else {
                break;
            };
            let size = std::str::from_utf8(&buf[pos..pos + line])
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
            let Some(size) = size else {
                return out;
            };
            if size == 0 {
                if buf.len() < pos + line + 4 {
                    break;
                }
                out.clean_end = &buf[pos + line + 2..pos + line + 4] == b"\r\n";
                return out;
            }
            if buf.len() < pos + line + 2 + size + 2 {
                break;
            }
            events.extend_from_slice(&buf[pos + line + 2..pos + line + 2 + size]);
            pos += line + 2 + size + 2;
            if !first && find(&events, b"\n\n").is_some() {
                first = true;
                drop(permit.take()); // let the next client connect
                let _ = ready.send(true);
            }
            if out.notified_at.is_none() && find(&events, b"event: shutdown\n").is_some() {
                out.notified_at = Some(Instant::now());
            }
        }
        match stream.read(&mut tmp).await {
            Ok(0) | Err(_) => {
                if !first {
                    let _ = ready.send(false);
                }
                return out;
            }
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Pct {
    p50: f64,
    p99: f64,
    max: f64,
}

fn pct(mut v: Vec<f64>) -> Pct {
    if v.is_empty() {
        return Pct {
            p50: f64::NAN,
            p99: f64::NAN,
            max: f64::NAN,
        };
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    Pct {
        p50: r(at(0.5)),
        p99: r(at(0.99)),
        max: r(*v.last().unwrap()),
    }
}

struct RunResult {
    notified: usize,
    clean_ends: usize,
    latencies_ms: Vec<f64>,
    server: String,
    /// The server's CPU time from the trigger until every client had its end.
    cpu_ms: f64,
}

/// One run against a fresh server process (`raw` or the crate's stack).
fn run_drain(
    rt: &tokio::runtime::Runtime,
    streams: usize,
    mode: &str,
    hyper_extra: usize,
) -> Result<RunResult, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["__serve", mode, &hyper_extra.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawning the server: {e}"))?;
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).map_err(|e| e.to_string())?;
    let port: u16 = line
        .trim()
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("server said {line:?}"))?;

    let result = rt.block_on(async {
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
        // Bounded connection ramp: at most 256 handshakes in flight.
        let permits = Arc::new(tokio::sync::Semaphore::new(256));
        let tasks: Vec<_> = (0..streams)
            .map(|_| tokio::spawn(client(port, ready_tx.clone(), permits.clone())))
            .collect();
        drop(ready_tx);
        let mut ready = 0;
        let all_ready = tokio::time::timeout(Duration::from_secs(120), async {
            while ready < streams {
                match ready_rx.recv().await {
                    Some(true) => ready += 1,
                    Some(false) | None => return false,
                }
            }
            true
        })
        .await;
        if all_ready != Ok(true) {
            return Err(format!(
                "only {ready}/{streams} streams got their first event"
            ));
        }
        // The trigger.
        let t0 = Instant::now();
        stdin.write_all(b"drain\n").map_err(|e| e.to_string())?;
        stdin.flush().map_err(|e| e.to_string())?;
        let mut results = Vec::with_capacity(streams);
        for t in tasks {
            match tokio::time::timeout(Duration::from_secs(60), t).await {
                Ok(Ok(r)) => results.push(r),
                _ => results.push(ClientResult::default()),
            }
        }
        let latencies_ms: Vec<f64> = results
            .iter()
            .filter_map(|r| r.notified_at)
            .map(|t| (t - t0).as_secs_f64() * 1e3)
            .collect();
        Ok((
            results.iter().filter(|r| r.notified_at.is_some()).count(),
            results.iter().filter(|r| r.clean_end).count(),
            latencies_ms,
        ))
    });
    let server = {
        let mut l = String::new();
        let _ = stdout.read_line(&mut l);
        l.trim().to_string()
    };
    // Every client has its end (or gave up): the server's CPU time since the trigger.
    let cpu_ms = {
        let _ = stdin.write_all(b"cpu\n").and_then(|()| stdin.flush());
        let mut l = String::new();
        let _ = stdout.read_line(&mut l);
        l.trim()
            .strip_prefix("cpu_ns ")
            .and_then(|n| n.parse::<f64>().ok())
            .map_or(f64::NAN, |ns| ns / 1e6)
    };
    drop(stdin); // the server exits
    let _ = child.wait();
    let (notified, clean_ends, latencies_ms) = result?;
    Ok(RunResult {
        notified,
        clean_ends,
        latencies_ms,
        server,
        cpu_ms,
    })
}

fn drain_cmd(streams: usize, rounds: usize, hyper_extra: usize) -> bool {
    let limit = raise_nofile();
    if (limit as usize) < streams + 64 {
        eprintln!("open-file limit {limit} is too low for {streams} streams");
        return false;
    }
    let rounds = rounds.max(1);
    let rt = multi_thread();
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    // Each round serves the three in turn, in an order that rotates from round to round, so
    // a machine that slows down or speeds up during the run weighs on all three alike.
    const MODES: [&str; 3] = ["crate", "raw", "hyper"];
    let mut runs: Vec<[Option<Pct>; 3]> = Vec::new();
    let mut cpu: [Vec<f64>; 3] = Default::default();
    let (mut notified, mut clean_ends, mut all_clean) = (streams, streams, true);
    for round in 0..rounds {
        let mut got: [Option<Pct>; 3] = [None; 3];
        for k in 0..3 {
            let m = (round + k) % 3;
            let r = match run_drain(&rt, streams, MODES[m], hyper_extra) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{} run failed: {e}", MODES[m]);
                    return false;
                }
            };
            all_clean &= r.notified == streams && r.clean_ends == streams;
            if m == 0 {
                // The crate's counts: the worst round's.
                notified = notified.min(r.notified);
                clean_ends = clean_ends.min(r.clean_ends);
            }
            let p = pct(r.latencies_ms);
            eprintln!(
                "drain round {round}, {}: {}/{streams} notified, {}/{streams} clean ends, p50 {} ms p99 {} ms max {} ms, server CPU {:.1} ms{}",
                MODES[m],
                r.notified,
                r.clean_ends,
                p.p50,
                p.p99,
                p.max,
                r.cpu_ms,
                if r.server.is_empty() { String::new() } else { format!(" (server: {})", r.server) },
            );
            cpu[m].push(r.cpu_ms);
            got[m] = Some(p);
        }
        runs.push(got);
    }
    let of = |m: usize| -> Vec<Pct> { runs.iter().map(|r| r[m].unwrap()).collect() };
    let (fanout, floor, hyper) = (of(0), of(1), of(2));
    let ratios: Vec<f64> = fanout
        .iter()
        .zip(&floor)
        .map(|(c, f)| c.max / f.max)
        .collect();
    let mut ratios_hyper: Vec<f64> = fanout
        .iter()
        .zip(&hyper)
        .map(|(c, h)| c.max / h.max)
        .collect();
    let ratio_max = r2(median(&mut ratios.clone()));
    let ratio_max_vs_hyper = r2(median(&mut ratios_hyper));
    // The server's CPU per stream for the drain, and the crate's over the hyper floor's (each
    // round's ratio, then the median).
    let cpu_us_per_stream = |m: usize| r2(median(&mut cpu[m].clone()) * 1e3 / streams as f64);
    let mut cpu_vs_hyper: Vec<f64> = cpu[0].iter().zip(&cpu[2]).map(|(c, h)| c / h).collect();
    let cpu_vs_hyper = r2(median(&mut cpu_vs_hyper));
    println!(
        "{}",
        serde_json::json!({
            "scenario": "drain",
            "streams": streams,
            "rounds": rounds,
            "notified": notified,
            "clean_ends": clean_ends,
            "fanout_ms": median_pct(&fanout),
            "raw_floor_ms": median_pct(&floor),
            "ratio_max": ratio_max,
            "ratio_max_rounds": ratios.iter().map(|r| r2(*r)).collect::<Vec<_>>(),
            "hyper_floor_ms": median_pct(&hyper),
            "ratio_max_vs_hyper": ratio_max_vs_hyper,
            "server_cpu_us_per_stream": {
                "crate": cpu_us_per_stream(0),
                "raw": cpu_us_per_stream(1),
                "hyper": cpu_us_per_stream(2),
            },
            "cpu_vs_hyper": cpu_vs_hyper,
        })
    );
    let (c, f, h) = (median_pct(&fanout), median_pct(&floor), median_pct(&hyper));
    eprintln!(
        "drain: {streams} streams, {rounds} rounds (medians over rounds); crate: {notified}/{streams} notified, {clean_ends}/{streams} clean ends (worst round), fan-out p50 {} ms p99 {} ms max {} ms; raw floor: p50 {} ms p99 {} ms max {} ms; hyper floor (hand-written body): p50 {} ms p99 {} ms max {} ms; ratio of maxima {ratio_max} (vs raw, median of the rounds' ratios), {ratio_max_vs_hyper} (vs hyper); server CPU per stream from the trigger to the last end: crate {} µs, raw {} µs, hyper {} µs ({cpu_vs_hyper} × hyper)",
        c.p50, c.p99, c.max, f.p50, f.p99, f.max, h.p50, h.p99, h.max,
        cpu_us_per_stream(0), cpu_us_per_stream(1), cpu_us_per_stream(2),
    );
    all_clean
}

/// The middle value (the upper one of an even count); sorts `v`.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Each percentile's median over the rounds.
fn median_pct(runs: &[Pct]) -> Pct {
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    let of = |f: fn(&Pct) -> f64| r(median(&mut runs.iter().map(f).collect::<Vec<_>>()));
    Pct {
        p50: of(|p| p.p50),
        p99: of(|p| p.p99),
        max: of(|p| p.max),
    }
}

// ---------------------------------------------------------------------------------------------
// throughput
// ---------------------------------------------------------------------------------------------

fn hello_app() -> axum::Router {
    axum::Router::new().route("/", axum::routing::get(|| async { "Hello, World!" }))
}

/// `connections` keep-alive clients hammering `port` for `secs`; returns requests per second.
async fn load(port: u16, secs: u64, connections: usize) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake::<
                _,
                http_body_util::Empty<Bytes>,
            >(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
            tokio::spawn(conn);
            let mut n = 0u64;
            while tokio::time::Instant::now() < deadline {
                let req = Request::get("/")
                    .header("host", "127.0.0.1")
                    .body(http_body_util::Empty::new())
                    .unwrap();
                if send.ready().await.is_err() {
                    break;
                }
                let Ok(res) = send.send_request(req).await else {
                    break;
                };
                let body = http_body_util::BodyExt::collect(res.into_body()).await;
                assert_eq!(body.unwrap().to_bytes(), "Hello, World!");
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / secs as f64
}

fn throughput_cmd(
    secs: u64,
    connections: usize,
    rounds: usize,
    layer: &str,
    only: Option<&str>,
) -> bool {
    raise_nofile();
    let rt = multi_thread();
    rt.block_on(async {
        let drain = DrainController::new();
        let serve = |app: axum::Router| async move {
            let l = listener();
            let port = l.local_addr().unwrap().port();
            tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
            port
        };
        let bare_port = serve(hello_app()).await;
        let w = drain.watch();
        // `--layer` swaps the stack for one layer or a peer (to see what each costs here).
        let stack_app = match layer {
            "reject" => hello_app().layer(tower_drain::reject::RejectLayer::new(w)),
            "track" => hello_app().layer(tower_drain::track::TrackLayer::new(w)),
            "guard" => hello_app().layer(tower_drain::guard::GuardLayer::new(w)),
            "frame" => hello_app().layer(tower_drain::frame::FrameLayer::new(w)),
            // The floor of any layer under `Router::layer`: one that does nothing.
            "identity" => hello_app().layer(tower::util::MapResponseLayer::new(
                |res: axum::response::Response| res,
            )),
            // The floor of any layer that follows the body to its end (as tracking must): a
            // pass-through wrapper, which `Router::layer` boxes again as it boxes the stack's.
            "body" => hello_app().layer(tower::util::MapResponseLayer::new(
                |res: axum::response::Response| {
                    res.map(|b| {
                        axum::body::Body::new(http_body_util::BodyExt::map_frame(b, std::convert::identity))
                    })
                },
            )),
            "timeout" => hello_app().layer(tower_http::timeout::TimeoutLayer::with_status_code(
                http::StatusCode::REQUEST_TIMEOUT,
                Duration::from_secs(30),
            )),
            _ => hello_app().layer(DrainStack::new(w)),
        };
        let stack_port = serve(stack_app).await;
        // Warm both up.
        load(bare_port, 1, connections).await;
        load(stack_port, 1, connections).await;
        if let Some(only) = only {
            // Profiling aid (`--only bare|stack`): load one of the two servers only.
            let port = if only == "stack" { stack_port } else { bare_port };
            let rps = load(port, secs, connections).await;
            eprintln!("{only}: {rps:.0} req/s");
            return rps > 0.0;
        }
        let (mut bare, mut stack) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Alternate which goes first.
            if round % 2 == 0 {
                bare.push(load(bare_port, secs, connections).await);
                stack.push(load(stack_port, secs, connections).await);
            } else {
                stack.push(load(stack_port, secs, connections).await);
                bare.push(load(bare_port, secs, connections).await);
            }
            eprintln!(
                "throughput round {round}: bare {:.0} req/s, stack {:.0} req/s",
                bare[round], stack[round]
            );
        }
        // Each round's pair ran back to back: the median of the paired ratios is steadier on a
        // shared machine than the ratio of the medians.
        let mut ratios: Vec<f64> = bare.iter().zip(&stack).map(|(b, s)| s / b).collect();
        let ratio = (median(&mut ratios) * 1000.0).round() / 1000.0;
        let (b, s) = (median(&mut bare), median(&mut stack));
        println!(
            "{}",
            serde_json::json!({
                "scenario": "throughput",
                "bare_rps": b.round(),
                "stack_rps": s.round(),
                "ratio": ratio,
            })
        );
        eprintln!(
            "throughput: {connections} connections, {rounds} × {secs} s each: bare {b:.0} req/s, stack {s:.0} req/s (medians), ratio {ratio}"
        );
        b > 0.0 && s > 0.0
    })
}

// ---------------------------------------------------------------------------------------------
// memory
// ---------------------------------------------------------------------------------------------

/// Runs `fut` to completion on `rt` (a current-thread runtime, so every allocation it makes is
/// this thread's); returns its output and the heap bytes it left allocated.
fn held<F: Future>(rt: &tokio::runtime::Runtime, fut: F) -> (F::Output, i64, u64) {
    let mut out = None;
    let info = measure(|| out = Some(rt.block_on(fut)));
    (out.expect("ran"), info.bytes_current, info.count_total)
}

/// Polls `body` with a no-op waker until it is pending (as a connection task would before
/// parking); returns the frames it gave.
fn pump<B: Body + Unpin>(body: &mut B) -> usize {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut n = 0;
    while let Poll::Ready(Some(_)) = Pin::new(&mut *body).poll_frame(&mut cx) {
        n += 1;
    }
    n
}

fn memory_cmd(streams: usize) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let inner = tower::service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(sse_response(Quiet(Some(Bytes::from_static(FIRST_EVENT)))))
    });
    // Built inside the runtime: the controller registers its metrics there.
    let drain = rt.block_on(async { DrainController::new() });
    let stack = DrainStack::new(drain.watch()).layer(inner);

    // Bare: the same responses without the crate. Bodies are kept (as hyper keeps them in the
    // connection task); the holding vectors are allocated before measuring.
    let mut bare_bodies = Vec::with_capacity(streams);
    let ((), bare_heap, _) = held(&rt, async {
        for _ in 0..streams {
            let res = inner.oneshot(request()).await.unwrap();
            bare_bodies.push(res.into_body());
        }
    });

    let mut stack_bodies = Vec::with_capacity(streams);
    let ((), stack_heap, _) = held(&rt, async {
        for _ in 0..streams {
            let res = stack.clone().oneshot(request()).await.unwrap();
            let mut body = Box::pin(res.into_body());
            // First event out, then pending, as on a real stream (the drain waker registers).
            assert_eq!(pump(&mut body), 1);
            stack_bodies.push(body);
        }
    });
    assert_eq!(drain.active_streams(), streams as u64);
    drop(bare_bodies);

    // The pinned box of each body is counted in `stack_heap`; the bare bodies are inline.
    let inline = -(std::mem::size_of::<Quiet>() as i64);
    let heap_per_stream = (stack_heap - bare_heap) as f64 / streams as f64;
    let bytes_per_stream = heap_per_stream + inline as f64;

    // Per-request cost (call, first frame, end) with few vs many streams open.
    let cost = |open: usize, bodies: &mut Vec<_>| {
        bodies.truncate(open);
        let rounds = 5;
        let per_round = 20_000;
        let mut samples = Vec::new();
        let mut allocs = 0.0;
        for _ in 0..rounds {
            let stack = stack.clone();
            let (elapsed, _, count) = held(&rt, async move {
                let start = Instant::now();
                for _ in 0..per_round {
                    let res = stack.clone().oneshot(request()).await.unwrap();
                    let mut body = Box::pin(res.into_body());
                    std::hint::black_box(pump(&mut body));
                }
                start.elapsed()
            });
            samples.push(elapsed.as_secs_f64() * 1e9 / per_round as f64);
            allocs = count as f64 / per_round as f64;
        }
        (median(&mut samples), allocs)
    };
    let (at_many, _) = cost(streams, &mut stack_bodies);
    let few = 1_000.min(streams);
    let (at_few, allocs) = cost(few, &mut stack_bodies);
    drop(stack_bodies);
    let ratio = (at_many / at_few * 100.0).round() / 100.0;
    println!(
        "{}",
        serde_json::json!({
            "scenario": "memory",
            "streams": streams,
            "bytes_per_stream": bytes_per_stream.round(),
            "overhead_ratio_100k_vs_1k": ratio,
        })
    );
    eprintln!(
        "memory: {streams} streams; crate heap {heap_per_stream:.0} B/stream + {inline} B inline in the body = {bytes_per_stream:.0} B/stream; per SSE request (call, first event, end) {at_few:.0} ns with {few} open, {at_many:.0} ns with {streams} open (ratio {ratio}), {allocs:.1} allocations each"
    );
    drain.active_streams() == 0
}

fn request() -> Request<()> {
    Request::get("/events").body(()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// frames
// ---------------------------------------------------------------------------------------------

/// Paired per-frame timing of the full stack's body against the raw body, for the static and
/// the axum `Sse` workload of `benches/frames.rs`.
fn frames_cmd(rounds: usize) -> bool {
    use workloads::{axum_events, Events, EVENTS};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _enter = rt.enter();
    let drain = rt.block_on(async { DrainController::new() });
    let stack = DrainStack::new(drain.watch());
    let static_svc = stack.layer(workloads::static_events_service());
    let axum_svc = stack.layer(workloads::axum_events_service());

    /// Nanoseconds per frame of polling `bodies` bodies made by `make` (untimed) to their end.
    fn per_frame<B: Body>(bodies: u32, make: impl FnMut() -> B) -> f64
    where
        B::Error: std::fmt::Debug,
    {
        let total = workloads::time_bodies(u64::from(bodies), make);
        total.as_secs_f64() * 1e9 / f64::from(bodies * EVENTS)
    }

    /// Median of each round's (raw, stack, stack / raw).
    fn paired(
        rounds: usize,
        mut raw: impl FnMut() -> f64,
        mut stack: impl FnMut() -> f64,
    ) -> (f64, f64, f64) {
        let (mut r, mut s, mut q) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..rounds {
            let (a, b) = if i % 2 == 0 {
                let a = raw();
                (a, stack())
            } else {
                let b = stack();
                (raw(), b)
            };
            r.push(a);
            s.push(b);
            q.push(b / a);
        }
        (median(&mut r), median(&mut s), median(&mut q))
    }

    /// One response's body from `svc` (made outside the timed section).
    fn body_of<S, B>(rt: &tokio::runtime::Runtime, svc: &S) -> B
    where
        S: tower::Service<Request<()>, Response = Response<B>> + Clone,
        S::Error: std::fmt::Debug,
    {
        rt.block_on(svc.clone().oneshot(Request::new(())))
            .unwrap()
            .into_body()
    }

    let rounds = rounds.max(1);
    // Warm-up: one round of each, not counted.
    paired(
        1,
        || per_frame(20, || axum_events().into_body()),
        || per_frame(20, || body_of(&rt, &axum_svc)),
    );
    let (axum_raw, axum_stack, axum_ratio) = paired(
        rounds,
        || per_frame(20, || axum_events().into_body()),
        || per_frame(20, || body_of(&rt, &axum_svc)),
    );
    let (static_raw, static_stack, static_ratio) = paired(
        rounds,
        || per_frame(200, || Events(EVENTS)),
        || per_frame(200, || body_of(&rt, &static_svc)),
    );
    let pct = |q: f64| (q - 1.0) * 100.0;
    eprintln!(
        "frames ({rounds} paired rounds, medians): axum Sse {axum_raw:.1} -> {axum_stack:.1} ns/frame \
         ({:+.1} %); static {static_raw:.2} -> {static_stack:.2} ns/frame ({:+.1} %)",
        pct(axum_ratio),
        pct(static_ratio)
    );
    println!(
        "{{\"scenario\":\"frames\",\"rounds\":{rounds},\
         \"axum_sse\":{{\"raw_ns\":{axum_raw:.2},\"stack_ns\":{axum_stack:.2},\"overhead_pct\":{:.2}}},\
         \"static\":{{\"raw_ns\":{static_raw:.3},\"stack_ns\":{static_stack:.3},\"overhead_pct\":{:.2}}}}}",
        pct(axum_ratio),
        pct(static_ratio)
    );
    true
}

// ---------------------------------------------------------------------------------------------
// requests
// ---------------------------------------------------------------------------------------------

/// Paired per-request timing of bare, `RejectLayer`, the peers and the full stack.
fn requests_cmd(rounds: usize) -> bool {
    use tower::limit::ConcurrencyLimitLayer;
    use tower::ServiceBuilder;
    use tower_http::timeout::TimeoutLayer;
    use workloads::{hello, one};

    const PER_ROUND: u32 = 5_000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let drain = rt.block_on(async { DrainController::new() });

    /// Nanoseconds per request of `PER_ROUND` requests, each through a clone of `svc`.
    fn timed<S, B>(rt: &tokio::runtime::Runtime, svc: &S) -> f64
    where
        S: tower::Service<Request<()>, Response = Response<B>> + Clone,
        S::Error: std::fmt::Debug,
        B: Body,
        B::Error: std::fmt::Debug,
    {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..PER_ROUND {
                one(svc.clone()).await;
            }
            start.elapsed().as_secs_f64() * 1e9 / f64::from(PER_ROUND)
        })
    }

    let bare = tower::service_fn(hello);
    let reject = tower_drain::reject::RejectLayer::new(drain.watch()).layer(bare);
    let climit = ConcurrencyLimitLayer::new(1024).layer(bare);
    // A layer that does nothing but wrap the future (tower's `MapResponse` with the identity):
    // what any layer with a future of its own costs here.
    let noop = tower::util::MapResponseLayer::new(|r: Response<_>| r).layer(bare);
    let peers = ServiceBuilder::new()
        .layer(TimeoutLayer::with_status_code(
            http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(30),
        ))
        .layer(ConcurrencyLimitLayer::new(1024))
        .service(bare);
    let stack = DrainStack::new(drain.watch()).layer(bare);
    let mut variants: Vec<Box<dyn FnMut() -> f64>> = vec![
        Box::new(|| timed(&rt, &bare)),
        Box::new(|| timed(&rt, &reject)),
        Box::new(|| timed(&rt, &climit)),
        Box::new(|| timed(&rt, &peers)),
        Box::new(|| timed(&rt, &stack)),
        Box::new(|| timed(&rt, &noop)),
    ];
    let n = variants.len();
    // Warm-up round, not counted.
    for v in variants.iter_mut() {
        v();
    }
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); n];
    let (mut reject_d, mut climit_d, mut noop_d, mut ratio) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds.max(1) {
        let mut t = vec![0.0; n];
        for k in 0..n {
            // Rotating order: each variant runs first, second, … equally often.
            let i = (r + k) % n;
            t[i] = variants[i]();
        }
        for (i, x) in t.iter().enumerate() {
            per[i].push(*x);
        }
        reject_d.push(t[1] - t[0]);
        climit_d.push(t[2] - t[0]);
        noop_d.push(t[5] - t[0]);
        ratio.push((t[4] - t[0]) / (t[3] - t[0]));
    }
    let med = |v: &mut Vec<f64>| median(v);
    let m: Vec<f64> = per.iter_mut().map(med).collect();
    let (reject_ns, climit_ns, noop_ns, stack_vs_peers) = (
        med(&mut reject_d),
        med(&mut climit_d),
        med(&mut noop_d),
        med(&mut ratio),
    );
    eprintln!(
        "requests ({rounds} paired rounds of {PER_ROUND}, medians): bare {:.1} ns, reject {:.1} \
         ({reject_ns:+.1}), concurrency limit {:.1} ({climit_ns:+.1}), identity map_response \
         {:.1} ({noop_ns:+.1}), peers {:.1}, stack {:.1}; stack / peers overhead \
         {stack_vs_peers:.2}",
        m[0], m[1], m[2], m[5], m[3], m[4]
    );
    println!(
        "{{\"scenario\":\"requests\",\"rounds\":{rounds},\"bare_ns\":{:.1},\"reject_ns\":{:.1},\
         \"climit_ns\":{:.1},\"map_response_ns\":{:.1},\"peers_ns\":{:.1},\"stack_ns\":{:.1},\
         \"reject_overhead_ns\":{reject_ns:.1},\"climit_overhead_ns\":{climit_ns:.1},\
         \"map_response_overhead_ns\":{noop_ns:.1},\"stack_vs_peers\":{stack_vs_peers:.2}}}",
        m[0], m[1], m[2], m[5], m[3], m[4]
    );
    true
}
