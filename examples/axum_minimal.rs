//! The smallest useful setup: an axum SSE route under the tower-drain stack, probes outside
//! it, and a server that stops once every stream has been drained. `cargo run --example
//! axum_minimal`, then `curl -N localhost:3000/events` and press Ctrl-C in the server.
use std::{convert::Infallible, time::Duration};

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::{routing::get, Router};
use futures_util::{stream, Stream, StreamExt};
use tower_drain::{probe::Probes, DrainController, DrainStack};

fn ticks() -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let every = tokio::time::interval(Duration::from_secs(1));
    let ticks = stream::unfold(every, |mut i| async {
        i.tick().await;
        Some(((), i))
    });
    Sse::new(ticks.map(|()| Ok(Event::default().event("tick").data("{}"))))
        .keep_alive(KeepAlive::default())
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let drain = DrainController::new(); // or DrainBuilder::from_env()?.build()?
    drain.listen_for_signals(); // SIGTERM / SIGINT start the drain

    let probes = Probes::new(drain.clone());
    let app = Router::new()
        .route("/events", get(|| async { ticks() }))
        .layer(DrainStack::new(drain.watch())) // Reject → Track → Guard → Frame
        .route_service("/healthz", probes.clone())
        .route_service("/readyz", probes);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(drain.stopped()) // once every stream has had its final frame
        .await?;
    println!("{}", serde_json::to_string(&drain.report().await).unwrap());
    Ok(())
}
