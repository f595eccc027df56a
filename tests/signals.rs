//! `listen_for_signals` with real signals sent to this test process: a second SIGTERM cuts
//! the drain short, unless `force_on_second_signal(false)`.

use std::time::Duration;

use tokio::time::Instant;
use tower_drain::{DrainController, Phase};

fn sigterm_self() {
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Both cases in one test: signals go to the whole process, so they must not overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_forces_the_drain_unless_opted_out() {
    const DELAY: Duration = Duration::from_millis(1500);

    // Opted out: the second signal changes nothing; `Closing` comes after the full delay.
    let drain = DrainController::builder()
        .grace_period(Duration::from_secs(10))
        .propagation_delay(DELAY)
        .force_on_second_signal(false)
        .build()
        .unwrap();
    let listener = drain.listen_for_signals();
    sigterm_self();
    within("drain", drain.draining()).await;
    let started = Instant::now();
    sigterm_self();
    within("closing", drain.closing()).await;
    assert!(
        started.elapsed() >= DELAY - Duration::from_millis(50),
        "closing {:?} after the drain started",
        started.elapsed()
    );
    within("report", drain.report()).await;
    // It returned after its one signal.
    assert!(listener.is_finished());

    // Default: the second signal skips the rest of the delay at once.
    let drain = DrainController::builder()
        .grace_period(Duration::from_secs(10))
        .propagation_delay(DELAY)
        .build()
        .unwrap();
    let listener = drain.listen_for_signals();
    sigterm_self();
    within("drain", drain.draining()).await;
    let started = Instant::now();
    assert_eq!(drain.phase(), Phase::Draining);
    sigterm_self();
    within("report", drain.report()).await;
    assert!(
        started.elapsed() < DELAY,
        "stopped {:?} after the second signal",
        started.elapsed()
    );
    // The listener ends at `Stopped`.
    within("listener end", listener).await.unwrap();
}
