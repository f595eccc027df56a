//! Shared helpers for the integration tests: a real axum server on 127.0.0.1:0 and a minimal
//! HTTP/1.1 SSE client built on hyper (here), and in submodules: headless Chromium
//! ([`browser`]), the compiled examples as child processes ([`example`]), a frame-level
//! HTTP/2 client ([`h2`]), Redis servers and clusters ([`redis`], feature `redis`), and a
//! scripted response body ([`script`]).
//!
//! Every test binary declares `mod support;` and uses what it needs (`use support::h2::H2`).
//! Each binary compiles all of it, so nothing here may warn when unused: dead code and
//! `unreachable_pub` are allowed for this module and every submodule below.
#![allow(dead_code, unreachable_pub)]

pub mod browser;
pub mod example;
pub mod h2;
#[cfg(feature = "redis")]
pub mod redis;
pub mod script;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tower_drain::DrainController;

/// Fails the test instead of hanging it.
pub const WATCHDOG: Duration = Duration::from_secs(20);

pub struct Server {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Serves `app` until `drain` reaches `Stopped`.
pub async fn serve(app: Router, drain: &DrainController) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stopped = drain.stopped();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
    });
    Server { addr, task }
}

/// Serves `app` over HTTP/1.1 and h2c (prior knowledge) on one port, on 127.0.0.1, until the
/// test ends.
pub async fn serve_h1_h2(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let svc = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    addr
}

/// Sends one request on a fresh connection and returns the response with a streaming body.
pub async fn request(addr: SocketAddr, req: Request<Empty<Bytes>>) -> Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender.send_request(req).await.unwrap()
}

pub async fn fetch(addr: SocketAddr, path: &str) -> Response<Incoming> {
    fetch_with(addr, path, &[]).await
}

pub async fn fetch_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Response<Incoming> {
    let mut b = Request::get(path).header("host", "localhost");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    request(addr, b.body(Empty::new()).unwrap()).await
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: Vec<String>,
    pub retry: Option<u64>,
    pub id: Option<String>,
}

impl SseEvent {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data.join("\n")).unwrap()
    }
}

/// Reads a `text/event-stream` body event by event, keeping the raw text.
pub struct SseClient {
    body: Incoming,
    buf: String,
    pub raw: String,
    pub ended: Option<Result<(), String>>,
}

impl SseClient {
    pub fn new(res: Response<Incoming>) -> Self {
        Self {
            body: res.into_body(),
            buf: String::new(),
            raw: String::new(),
            ended: None,
        }
    }

    pub async fn open(addr: SocketAddr, path: &str) -> Self {
        let res = fetch(addr, path).await;
        assert_eq!(res.status(), 200);
        Self::new(res)
    }

    /// Reads one body frame; `false` once the body has ended.
    pub async fn read_chunk(&mut self) -> bool {
        if self.ended.is_some() {
            return false;
        }
        match self.body.frame().await {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    let s = std::str::from_utf8(&d).unwrap();
                    self.raw.push_str(s);
                    self.buf.push_str(s);
                }
                true
            }
            Some(Err(e)) => {
                self.ended = Some(Err(e.to_string()));
                false
            }
            None => {
                self.ended = Some(Ok(()));
                false
            }
        }
    }

    /// The next whole event, or `None` once the body has ended (see `ended`).
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..pos + 2).collect();
                return Some(parse(&block));
            }
            if !self.read_chunk().await {
                return None;
            }
        }
    }

    /// Every remaining event, then whether the body ended cleanly.
    pub async fn rest(&mut self) -> (Vec<SseEvent>, Result<(), String>) {
        let mut out = Vec::new();
        while let Some(e) = self.next_event().await {
            out.push(e);
        }
        (out, self.ended.clone().unwrap())
    }

    /// Bytes received after the last complete event.
    pub fn leftover(&self) -> &str {
        &self.buf
    }
}

pub fn parse(block: &str) -> SseEvent {
    let mut ev = SseEvent::default();
    for line in block.lines() {
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => ev.event = Some(value.to_string()),
            "data" => ev.data.push(value.to_string()),
            "retry" => ev.retry = value.parse().ok(),
            "id" => ev.id = Some(value.to_string()),
            _ => {}
        }
    }
    ev
}

/// Waits (bounded) until `f` holds; for conditions that have no signal of their own, such as
/// the server noticing a vanished client on its next write.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WATCHDOG;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Awaits `fut` or fails the test after the watchdog timeout.
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WATCHDOG, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Reads one HTTP/1.1 response with a `content-length` body from a raw connection; returns
/// its head, lowercased.
pub async fn read_http1_response(tcp: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tcp.read(&mut byte).await.unwrap();
        assert_eq!(
            n,
            1,
            "EOF inside a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap().to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("content-length")
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0; len];
    tcp.read_exact(&mut body).await.unwrap();
    head
}
