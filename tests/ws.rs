//! WebSockets across a drain, with tokio-tungstenite clients against a real axum server: close
//! code `1001` with its reason at each socket's share of the spread, the force-close of a peer
//! that never answers, the guard's lifetime, the per-key limit, the rejection while closing,
//! a tungstenite server socket, and HTTP/2 extended CONNECT.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ws::{Message as AxumMessage, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};
use tower_drain::ws::{self, WsHandle, DEFAULT_DRAIN_REASON, LIFETIME_REASON};
use tower_drain::{DrainController, DrainReason, DrainStack};

use support::{serve, WATCHDOG};

type Client = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// The socket loop of the example server: a text message every 50 ms until told to close.
async fn ticks(mut socket: WebSocket, mut handle: WsHandle) {
    let mut every = tokio::time::interval(Duration::from_millis(50));
    let mut n = 0u64;
    loop {
        tokio::select! {
            cause = handle.notified() => {
                ws::close(socket, handle, cause).await;
                return;
            }
            _ = every.tick() => {
                if socket.send(AxumMessage::text(format!("{{\"n\":{n}}}"))).await.is_err() {
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
}

async fn handler(upgrade: WebSocketUpgrade, handle: WsHandle) -> Response {
    upgrade.on_upgrade(move |socket| ticks(socket, handle))
}

fn app(stack: DrainStack) -> Router {
    Router::new().route("/ws", get(handler)).layer(stack)
}

async fn connect(addr: SocketAddr) -> Client {
    let (ws, res) = connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("upgrade");
    assert_eq!(res.status(), 101);
    ws
}

/// Waits (bounded) until the controller counts `n` open streams.
async fn until_active(drain: &DrainController, n: u64) {
    tokio::time::timeout(WATCHDOG, async {
        while drain.active_streams() != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("active_streams = {}, want {n}", drain.active_streams()));
}

/// Reads until the server's close frame: its code, reason and arrival; then until the end.
async fn read_close(ws: &mut Client) -> (u16, String, Instant) {
    let (code, reason, at) = tokio::time::timeout(WATCHDOG, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => {
                    return (
                        u16::from(f.code),
                        f.reason.as_str().to_owned(),
                        Instant::now(),
                    )
                }
                Some(Ok(Message::Text(t))) => assert!(t.as_str().starts_with("{\"n\":"), "{t}"),
                other => panic!("the connection ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame");
    // tungstenite answers the close itself; then the server ends the connection.
    let end = tokio::time::timeout(WATCHDOG, ws.next())
        .await
        .expect("the end");
    assert!(
        matches!(end, None | Some(Err(tungstenite::Error::ConnectionClosed))),
        "{end:?}"
    );
    (code, reason, at)
}

#[tokio::test]
async fn clients_get_1001_and_the_reason_at_their_share_of_the_spread() {
    let spread = Duration::from_millis(600);
    let drain = DrainController::builder()
        .propagation_delay(Duration::ZERO)
        .drain_spread(spread)
        .grace_period(Duration::from_secs(10))
        .build()
        .unwrap();
    let server = serve(app(DrainStack::new(drain.watch())), &drain).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(server.addr).await);
    }
    until_active(&drain, 3).await;

    let start = Instant::now();
    drain.drain(DrainReason::Manual);
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { read_close(&mut ws).await }))
        .collect();
    let mut arrivals = Vec::new();
    for r in readers {
        let (code, reason, at) = r.await.unwrap();
        assert_eq!(code, 1001);
        assert_eq!(reason, DEFAULT_DRAIN_REASON);
        arrivals.push(at - start);
    }
    arrivals.sort();
    // Slots at 0, 200 and 400 ms of the window: the last close comes at least 400 ms after
    // the drain began (an upper bound would be a wall-clock assertion).
    assert!(arrivals[2] >= Duration::from_millis(400), "{arrivals:?}");
    assert!(arrivals[1] >= Duration::from_millis(200), "{arrivals:?}");

    let report = tokio::time::timeout(WATCHDOG, drain.report())
        .await
        .unwrap();
    assert_eq!(report.streams_at_drain, 3);
    assert_eq!(report.notified, 3);
    assert_eq!(report.closed_gracefully, 3);
    assert_eq!(report.force_closed, 0);
    assert_eq!(drain.active_streams(), 0);
    tokio::time::timeout(WATCHDOG, server.task)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_client_that_never_answers_the_close_is_cut_at_the_deadline_and_counted() {
    let grace = Duration::from_millis(1500);
    let drain = DrainController::builder()
        .propagation_delay(Duration::ZERO)
        .grace_period(grace)
        .build()
        .unwrap();
    let server = serve(app(DrainStack::new(drain.watch())), &drain).await;
    let mut polite = connect(server.addr).await;
    // Never read until the deadline: tungstenite answers a close frame only when read.
    let mut deaf = connect(server.addr).await;
    until_active(&drain, 2).await;

    let start = Instant::now();
    drain.drain(DrainReason::Manual);
    let (code, _, _) = read_close(&mut polite).await;
    assert_eq!(code, 1001);
    let report = tokio::time::timeout(WATCHDOG, drain.report())
        .await
        .unwrap();
    assert!(start.elapsed() >= grace);
    assert_eq!(report.streams_at_drain, 2);
    assert_eq!(
        report.notified, 2,
        "the deaf client was handed the close frame too"
    );
    assert_eq!(report.closed_gracefully, 1);
    assert_eq!(report.force_closed, 1);
    assert_eq!(drain.active_streams(), 0);

    // What the deaf client finds when it reads at last: the close frame, then a connection
    // the server has already closed.
    let mut close = None;
    let end = tokio::time::timeout(WATCHDOG, async {
        loop {
            match deaf.next().await {
                Some(Ok(Message::Close(f))) => close = f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => return other,
            }
        }
    })
    .await
    .expect("the connection ends");
    assert_eq!(close, Some(1001));
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
}

#[tokio::test]
async fn the_guard_lifetime_closes_a_socket_with_1001_and_says_why() {
    let drain = DrainController::new();
    let stack = DrainStack::new(drain.watch())
        .guard(|g| g.max_lifetime(Duration::from_millis(300)))
        .unwrap();
    let server = serve(app(stack), &drain).await;
    let mut ws = connect(server.addr).await;
    until_active(&drain, 1).await;
    let (code, reason, _) = read_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1001, LIFETIME_REASON));
    until_active(&drain, 0).await;
    server.task.abort();
}

#[tokio::test]
async fn the_per_key_limit_counts_sockets() {
    let drain = DrainController::new();
    let stack = DrainStack::new(drain.watch()).track(|t| {
        t.max_per_key(1)
            .key_header(http::HeaderName::from_static("x-client-id"))
    });
    let server = serve(app(stack), &drain).await;
    let req = || {
        let mut req = tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/ws",
            server.addr
        ))
        .unwrap();
        req.headers_mut()
            .insert("x-client-id", http::HeaderValue::from_static("alice"));
        req
    };
    let (first, _) = connect_async(req()).await.expect("the first socket");
    until_active(&drain, 1).await;
    match connect_async(req()).await {
        Err(tungstenite::Error::Http(res)) => {
            assert_eq!(res.status(), 429);
            assert!(res.headers().contains_key("retry-after"));
        }
        other => panic!("want 429, got {:?}", other.map(|(_, r)| r.status())),
    }
    // The slot is the socket's until its task ends.
    drop(first);
    until_active(&drain, 0).await;
    let (_again, _) = connect_async(req()).await.expect("the slot is free again");
    server.task.abort();
}

#[tokio::test]
async fn an_upgrade_while_closing_gets_503_with_retry_after() {
    let drain = DrainController::builder()
        .propagation_delay(Duration::ZERO)
        .grace_period(Duration::from_secs(5))
        .build()
        .unwrap();
    let server = serve(app(DrainStack::new(drain.watch())), &drain).await;
    let mut open = connect(server.addr).await;
    until_active(&drain, 1).await;
    drain.drain(DrainReason::Manual);
    drain.closing().await;
    match connect_async(format!("ws://{}/ws", server.addr)).await {
        Err(tungstenite::Error::Http(res)) => {
            assert_eq!(res.status(), 503);
            assert!(res.headers().contains_key("retry-after"));
        }
        other => panic!("want 503, got {:?}", other.map(|(_, r)| r.status())),
    }
    let (code, _, _) = read_close(&mut open).await;
    assert_eq!(code, 1001);
    let report = tokio::time::timeout(WATCHDOG, drain.report())
        .await
        .unwrap();
    assert_eq!((report.rejected, report.closed_gracefully), (1, 1));
}

#[tokio::test]
async fn the_close_code_and_reason_are_configurable() {
    let drain = DrainController::builder()
        .propagation_delay(Duration::ZERO)
        .build()
        .unwrap();
    let app = Router::new()
        .route(
            "/ws",
            get(|upgrade: WebSocketUpgrade, handle: WsHandle| async move {
                let handle = handle.close_frame(1012, "restarting").unwrap();
                upgrade.on_upgrade(move |socket| ticks(socket, handle))
            }),
        )
        .layer(DrainStack::new(drain.watch()));
    let server = serve(app, &drain).await;
    let mut ws = connect(server.addr).await;
    until_active(&drain, 1).await;
    drain.drain(DrainReason::Manual);
    let (code, reason, _) = read_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1012, "restarting"));
}

/// tokio-tungstenite on the server side: a plain accept loop, no axum.
#[tokio::test]
#[allow(clippy::result_large_err)] // tungstenite's handshake callback type
async fn a_tungstenite_server_socket_drains_too() {
    use tower::ServiceExt;

    let drain = DrainController::builder()
        .propagation_delay(Duration::ZERO)
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The stack sees the handshake request through a service built per connection.
    let stack = DrainStack::new(drain.watch());
    let accept = {
        let drain = drain.clone();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let svc = tower::Layer::layer(
                &stack,
                tower::service_fn(move |mut req: http::Request<()>| {
                    let _ = tx.send(WsHandle::take(req.extensions_mut()));
                    async { Ok::<_, std::convert::Infallible>(http::Response::new(String::new())) }
                }),
            );
            let (mut handle, ws) = {
                let mut handled = None;
                let ws = tokio_tungstenite::accept_hdr_async(
                    tcp,
                    |req: &tungstenite::handshake::server::Request,
                     res: tungstenite::handshake::server::Response| {
                        let mut r = http::Request::builder().uri(req.uri().clone());
                        for (k, v) in req.headers() {
                            r = r.header(k, v);
                        }
                        handled = Some(r.body(()).unwrap());
                        Ok(res)
                    },
                )
                .await
                .unwrap();
                // Run the stack on the handshake's request, as a hyper service would.
                let _ = svc.oneshot(handled.unwrap()).await.unwrap();
                (rx.recv().await.unwrap().expect("a handle"), ws)
            };
            assert_eq!(drain.active_streams(), 1);
            let cause = handle.notified().await;
            ws::close(ws, handle, cause).await
        })
    };
    let mut client = connect_async(format!("ws://{addr}/")).await.unwrap().0;
    until_active(&drain, 1).await;
    drain.drain(DrainReason::Manual);
    let mut close = None;
    while let Some(Ok(msg)) = tokio::time::timeout(WATCHDOG, client.next()).await.unwrap() {
        if let Message::Close(f) = msg {
            close = f.map(|f| u16::from(f.code));
        }
    }
    assert_eq!(close, Some(1001));
    assert_eq!(accept.await.unwrap(), ws::Closed::Clean);
    let report = tokio::time::timeout(WATCHDOG, drain.report())
        .await
        .unwrap();
    assert_eq!((report.notified, report.closed_gracefully), (1, 1));
}

/// HTTP/2 extended CONNECT (RFC 8441): the same tracking and close, through hyper's h2 client
/// against a hyper-util server that enables the protocol.
#[tokio::test]
async fn an_http2_extended_connect_socket_drains_too() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio_tungstenite::tungstenite::protocol::Role;

    let drain = DrainController::builder()
        .propagation_delay(Duration::ZERO)
        .build()
        .unwrap();
    // `any`: over HTTP/2 the upgrade is a `CONNECT`, not a `GET`.
    let app = Router::new()
        .route("/ws", axum::routing::any(handler))
        .layer(DrainStack::new(drain.watch()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder.http2().enable_connect_protocol();
        let svc = hyper_util::service::TowerToHyperService::new(app);
        let _ = builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
            .await;
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let mut conn = Box::pin(conn);
    // The server's SETTINGS (with ENABLE_CONNECT_PROTOCOL) arrive as the connection runs.
    tokio::time::timeout(WATCHDOG, async {
        while !conn.is_extended_connect_protocol_enabled() {
            tokio::select! {
                r = conn.as_mut() => panic!("the connection ended: {r:?}"),
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    })
    .await
    .expect("the server enables extended CONNECT");
    tokio::spawn(conn);

    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://{addr}/ws"))
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let mut res = send.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let upgraded = hyper::upgrade::on(&mut res).await.unwrap();
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    until_active(&drain, 1).await;

    drain.drain(DrainReason::Manual);
    let mut close = None;
    while let Some(Ok(msg)) = tokio::time::timeout(WATCHDOG, ws.next()).await.unwrap() {
        if let Message::Close(f) = msg {
            close = f.map(|f| (u16::from(f.code), f.reason.as_str().to_owned()));
        }
    }
    assert_eq!(close, Some((1001, DEFAULT_DRAIN_REASON.to_owned())));
    let report = tokio::time::timeout(WATCHDOG, drain.report())
        .await
        .unwrap();
    assert_eq!(report.streams_at_drain, 1);
    assert_eq!((report.notified, report.closed_gracefully), (1, 1));
}
