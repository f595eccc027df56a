use std::sync::mpsc;
use std::time::Duration;

use http::{Request, Response, Version};
use tower::{Layer, ServiceExt};

use super::handle::validate;
use super::*;
use crate::track::TrackLayer;
use crate::{DrainController, DrainReason};

fn upgrade() -> Request<()> {
    Request::builder()
        .header("connection", "Upgrade")
        .header("upgrade", "WebSocket")
        .body(())
        .unwrap()
}

/// A service behind a track layer that hands each request's `WsHandle` out through `tx`.
async fn call(
    drain: &DrainController,
    req: Request<()>,
) -> (
    Response<crate::track::TrackedBody<String>>,
    Option<WsHandle>,
) {
    let (tx, rx) = mpsc::channel();
    let svc =
        TrackLayer::new(drain.watch()).layer(tower::service_fn(move |mut req: Request<()>| {
            tx.send(WsHandle::take(req.extensions_mut())).unwrap();
            async { Ok::<_, std::convert::Infallible>(Response::new(String::new())) }
        }));
    let res = svc.oneshot(req).await.unwrap();
    (res, rx.recv().unwrap())
}

fn parts<B>(req: Request<B>) -> http::request::Parts {
    req.into_parts().0
}

#[test]
fn upgrades_are_recognised() {
    assert!(is_upgrade(&parts(upgrade())));
    let both = Request::builder()
        .header("upgrade", "h2c, websocket")
        .body(())
        .unwrap();
    assert!(is_upgrade(&parts(both)));
    let h2c = Request::builder()
        .header("upgrade", "h2c")
        .body(())
        .unwrap();
    let h2c = parts(h2c);
    assert!(may_upgrade(&h2c) && !is_upgrade(&h2c));
    let connect = Request::builder()
        .method("CONNECT")
        .version(Version::HTTP_2)
        .body(())
        .unwrap();
    assert!(is_upgrade(&parts(connect)));
    assert!(!may_upgrade(&parts(Request::new(()))));
}

#[tokio::test]
async fn a_taken_handle_outlives_the_101_and_is_released_when_dropped() {
    let drain = DrainController::new();
    let (res, handle) = call(&drain, upgrade()).await;
    drop(res);
    assert_eq!(drain.active_streams(), 1);
    drop(handle.expect("a handle"));
    assert_eq!(drain.active_streams(), 0);
}

#[tokio::test]
async fn a_plain_request_gets_no_handle() {
    let drain = DrainController::new();
    let (res, handle) = call(&drain, Request::new(())).await;
    assert!(handle.is_none());
    assert_eq!(drain.active_streams(), 1, "the body holds the registration");
    drop(res);
    assert_eq!(drain.active_streams(), 0);
}

#[tokio::test]
async fn a_handle_nobody_takes_goes_with_the_request() {
    let drain = DrainController::new();
    let svc = TrackLayer::new(drain.watch()).layer(tower::service_fn(|req: Request<()>| {
        drop(req);
        async { Ok::<_, std::convert::Infallible>(Response::new(String::new())) }
    }));
    let res = svc.oneshot(upgrade()).await.unwrap();
    assert_eq!(drain.active_streams(), 0);
    drop(res);
}

#[tokio::test]
async fn a_socket_task_that_panics_releases_its_stream() {
    let drain = DrainController::new();
    let (_res, handle) = call(&drain, upgrade()).await;
    let handle = handle.unwrap();
    let task = tokio::spawn(async move {
        let _handle = handle;
        panic!("the socket's task failed");
    });
    assert!(task.await.unwrap_err().is_panic());
    assert_eq!(drain.active_streams(), 0);
}

#[tokio::test(start_paused = true)]
async fn notified_resolves_at_the_share_of_the_spread_and_stays_resolved() {
    let drain = DrainController::configured(|b| {
        b.propagation_delay(Duration::ZERO)
            .drain_spread(Duration::from_secs(2))
    });
    let mut handles = Vec::new();
    for _ in 0..2 {
        handles.push(call(&drain, upgrade()).await.1.unwrap());
    }
    drain.drain(DrainReason::Manual);
    drain.closing().await;
    let start = tokio::time::Instant::now();
    let mut second = handles.pop().unwrap();
    let mut first = handles.pop().unwrap();
    // Each turn of a loop makes a new `notified()`: nothing is lost in between.
    for _ in 0..3 {
        let r = tokio::time::timeout(Duration::from_millis(1), first.notified()).await;
        if let Ok(cause) = r {
            assert_eq!(cause, CloseCause::Drain);
            break;
        }
    }
    let a = start.elapsed();
    assert_eq!(second.notified().await, CloseCause::Drain);
    let b = start.elapsed();
    // Slots at 0 s and 1 s of the 2 s window, whichever handle polled first.
    assert!(a < Duration::from_millis(10), "{a:?}");
    assert_eq!(b, Duration::from_secs(1));
    assert_eq!(first.notified().await, CloseCause::Drain);
}

#[tokio::test(start_paused = true)]
async fn a_socket_still_open_at_the_deadline_hears_deadline_and_counts_as_forced() {
    let drain = DrainController::configured(|b| {
        b.propagation_delay(Duration::from_secs(5))
            .grace_period(Duration::from_secs(10))
    });
    let (_res, handle) = call(&drain, upgrade()).await;
    let mut handle = handle.unwrap();
    drain.drain(DrainReason::Manual);
    // The socket's loop was busy elsewhere until after the deadline.
    tokio::time::sleep(Duration::from_secs(10)).await;
    tokio::task::yield_now().await;
    assert_eq!(handle.notified().await, CloseCause::Deadline);
    drop(handle);
    let report = drain.report().await;
    assert_eq!(report.streams_at_drain, 1);
    assert_eq!((report.force_closed, report.closed_gracefully), (1, 0));
}

#[test]
fn close_codes_and_reasons_are_checked() {
    assert!(validate(1001, "bye").is_ok());
    assert!(validate(1012, "").is_ok());
    assert!(validate(4000, "app").is_ok());
    for bad in [0, 999, 1005, 1006, 1015, 2999, 5000] {
        assert_eq!(
            validate(bad, "").unwrap_err().setting(),
            "close_code",
            "{bad}"
        );
    }
    let long = "x".repeat(124);
    assert_eq!(validate(1001, &long).unwrap_err().setting(), "close_reason");
}

#[test]
fn handles_and_their_futures_can_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<WsHandle>();
    send_sync::<Notified<'static>>();
    send_sync::<Slot>();
}
