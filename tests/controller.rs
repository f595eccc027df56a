//! The controller's robustness: a drain started from any thread, store clean-ups that panic,
//! layers built per connection, and absurd durations.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower_drain::track::{ConnectionStore, Lease, StoreError, TrackLayer};
use tower_drain::{CleanupSummary, DrainController, DrainReason, Phase};

/// A store that counts its clean-ups, optionally panicking in them.
#[derive(Clone, Debug, Default)]
struct CountingStore {
    cleanups: Arc<AtomicUsize>,
    panics: bool,
    with_id: bool,
}

impl ConnectionStore for CountingStore {
    type Future = Ready<Result<Option<Lease>, StoreError>>;

    fn acquire(&self, _key: &str, _limit: u32) -> Self::Future {
        ready(Ok(Some(Lease::new(()))))
    }

    fn shutdown(
        &self,
    ) -> Pin<Box<dyn std::future::Future<Output = Option<CleanupSummary>> + Send>> {
        let n = self.cleanups.clone();
        let panics = self.panics;
        Box::pin(async move {
            n.fetch_add(1, Ordering::SeqCst);
            if panics {
                panic!("a store's clean-up panicked");
            }
            None
        })
    }

    fn store_id(&self) -> Option<usize> {
        self.with_id.then_some(Arc::as_ptr(&self.cleanups) as usize)
    }
}

#[test]
fn drain_from_a_thread_without_a_runtime_completes() {
    // Built and drained outside any runtime (an admin or signal thread).
    let drain = DrainController::builder()
        .grace_period(Duration::from_secs(5))
        .build()
        .unwrap();
    let d = drain.clone();
    let started = std::thread::spawn(move || d.drain(DrainReason::Manual))
        .join()
        .expect("drain() must not panic outside a runtime");
    assert!(started);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), drain.report())
            .await
            .expect("the drain reaches Stopped")
    });
    assert_eq!(report.reason, DrainReason::Manual);
    assert_eq!(drain.phase(), Phase::Stopped);
}

#[test]
fn drain_from_another_thread_uses_the_runtime_the_controller_was_built_on() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let drain = rt.block_on(async { DrainController::new() });
    let d = drain.clone();
    assert!(std::thread::spawn(move || d.drain(DrainReason::Manual))
        .join()
        .unwrap());
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), drain.stopped())
            .await
            .expect("the drain reaches Stopped");
    });
}

#[tokio::test]
async fn a_panicking_store_cleanup_does_not_hang_the_drain() {
    let drain = DrainController::new();
    let store = CountingStore {
        panics: true,
        with_id: true,
        ..Default::default()
    };
    let _layer = TrackLayer::with_store(drain.watch(), store.clone());
    drain.drain(DrainReason::Manual);
    let report = tokio::time::timeout(Duration::from_secs(10), drain.report())
        .await
        .expect("the drain reaches Stopped despite the panic");
    assert_eq!(store.cleanups.load(Ordering::SeqCst), 1);
    assert!(report.store_cleanup.is_none());
}

#[tokio::test]
async fn a_stack_built_per_connection_registers_one_cleanup_per_store() {
    let drain = DrainController::new();
    let store = CountingStore {
        with_id: true,
        ..Default::default()
    };
    // One layer (and stack) per accepted connection, over clones of one store.
    for _ in 0..1_000 {
        drop(TrackLayer::with_store(drain.watch(), store.clone()));
    }
    drain.drain(DrainReason::Manual);
    drain.report().await;
    assert_eq!(
        store.cleanups.load(Ordering::SeqCst),
        1,
        "one clean-up per store, not per layer"
    );
}

#[tokio::test]
async fn distinct_stores_each_get_their_cleanup() {
    let drain = DrainController::new();
    let a = CountingStore {
        with_id: true,
        ..Default::default()
    };
    let b = CountingStore {
        with_id: true,
        ..Default::default()
    };
    let anonymous = CountingStore::default();
    let _la = TrackLayer::with_store(drain.watch(), a.clone());
    let _lb = TrackLayer::with_store(drain.watch(), b.clone());
    let _lc = TrackLayer::with_store(drain.watch(), anonymous.clone());
    let _ld = TrackLayer::with_store(drain.watch(), anonymous.clone());
    drain.drain(DrainReason::Manual);
    drain.report().await;
    assert_eq!(a.cleanups.load(Ordering::SeqCst), 1);
    assert_eq!(b.cleanups.load(Ordering::SeqCst), 1);
    // Without a store id, each layer keeps its own (documented).
    assert_eq!(anonymous.cleanups.load(Ordering::SeqCst), 2);
}

/// The report adds up while streams keep opening (an exempt route) and ending during
/// `Closing`, and some are still open at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_adds_up_under_concurrent_registration_during_closing() {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicBool;
    use tower::{Layer, ServiceExt};
    use tower_drain::frame::RunToCompletion;
    use tower_drain::DrainStack;

    let drain = DrainController::builder()
        .propagation_delay(Duration::from_millis(50))
        .drain_spread(Duration::from_millis(100))
        .grace_period(Duration::from_millis(400))
        .force_linger(Duration::from_millis(50))
        .build()
        .unwrap();
    // Every third stream runs to completion (so the deadline finds it open); the others
    // take their shutdown frame.
    let n = Arc::new(AtomicUsize::new(0));
    let inner = tower::service_fn(move |_req: http::Request<()>| {
        let i = n.fetch_add(1, Ordering::Relaxed);
        async move {
            let ticks = futures_util::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Some((
                    Ok::<_, Infallible>(http_body::Frame::data(Bytes::from("data: t\n\n"))),
                    (),
                ))
            });
            let mut res = http::Response::new(http_body_util::StreamBody::new(Box::pin(ticks)));
            res.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            if i.is_multiple_of(3) {
                res.extensions_mut().insert(RunToCompletion);
            }
            Ok::<_, Infallible>(res)
        }
    });
    // Everything is exempt, so streams keep opening while closing.
    let svc = DrainStack::new(drain.watch())
        .reject(|r| r.exempt(|_| true))
        .layer(inner);
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (svc, stop) = (svc.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            for round in 0..200 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let res = svc.clone().oneshot(http::Request::new(())).await.unwrap();
                let mut body = res.into_body();
                // Read a few frames, or to the end; every other stream is left early.
                for _ in 0..(round % 2 + 1) * 3 {
                    match body.frame().await {
                        Some(Ok(_)) => {}
                        _ => break,
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    drain.drain(DrainReason::Manual);
    let report = tokio::time::timeout(Duration::from_secs(10), drain.report())
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert!(report.streams_at_drain > 0, "{report:?}");
    assert!(report.opened_while_closing > 0, "{report:?}");
    assert_eq!(
        report.streams_at_drain + report.opened_while_closing,
        report.closed_gracefully + report.force_closed,
        "{report:?}"
    );
    assert!(
        report.notified <= report.streams_at_drain + report.opened_while_closing,
        "{report:?}"
    );
}
