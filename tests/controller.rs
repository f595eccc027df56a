//! The controller's robustness: a drain started from any thread, store clean-ups that panic,
//! layers built per connection, and absurd durations.

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
