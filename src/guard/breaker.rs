use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::Metrics;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// Where a [`Breaker`] stands.
///
/// ```
/// use tower_drain::guard::{BreakerState, GuardLayer};
/// let layer = GuardLayer::builder(tower_drain::DrainController::new().watch())
///     .circuit_breaker(true)
///     .build()
///     .unwrap();
/// assert_eq!(layer.breaker().unwrap().state(), BreakerState::Closed);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BreakerState {
    /// Requests reach the service; consecutive failures are being counted.
    Closed,
    /// Requests are answered at once (`503` + `retry-after`) without calling the service. Once
    /// the cool-down is over, the next request becomes the half-open probe.
    Open,
    /// One probe request is in flight; every other request is answered `503` until the probe's
    /// outcome closes the circuit (success) or opens it again (failure).
    HalfOpen,
}

/// A handle on a guard layer's error circuit breaker: observe its state (cheap to clone; every
/// clone and every service built by the layer share one breaker).
///
/// Failures are: the inner service's `Err`, responses whose status counts as a failure
/// (default: `5xx`), response timeouts, bodies that end in an error, and failed revalidation
/// checks. `failure_threshold` consecutive failures open the circuit for the cool-down; any
/// success resets the count.
///
/// Once the cool-down is over, the next request is the half-open probe, and every other
/// request is answered at once until its outcome is known. A probe whose outcome has not
/// arrived within the probe timeout (default: the cool-down) counts as a failure: the circuit
/// opens for another cool-down, after which a new probe goes, and the late outcome of the
/// old one is ignored. So a probe whose handler hangs cannot hold the circuit half-open.
///
/// # Scope
///
/// One breaker per [`GuardLayer`](super::GuardLayer): every route under the layer shares it.
/// For a breaker per route, put a guard layer on each route (axum's `route_layer`), so that
/// one slow or failing route cannot turn away the others.
///
/// ```
/// use std::time::Duration;
/// use tower_drain::guard::{BreakerState, GuardLayer};
/// let layer = GuardLayer::builder(tower_drain::DrainController::new().watch())
///     .failure_threshold(3)
///     .cooldown(Duration::from_secs(10))
///     .build()
///     .unwrap();
/// let breaker = layer.breaker().unwrap(); // each `build` makes a new breaker
/// assert_eq!(breaker.state(), BreakerState::Closed);
/// assert_eq!(breaker.consecutive_failures(), 0);
/// assert_eq!(breaker.threshold(), 3);
/// assert_eq!(breaker.cooldown(), Duration::from_secs(10));
/// assert_eq!(breaker.probe_timeout(), Duration::from_secs(10));
/// ```
#[derive(Clone)]
pub struct Breaker {
    inner: Arc<Inner>,
}

struct Inner {
    threshold: u32,
    cooldown: Duration,
    probe_timeout: Duration,
    /// The state in the low two bits, and above them the number of the current half-open
    /// probe (every probe gets a new one), in one word: a verdict applies only to the probe
    /// it belongs to.
    state: AtomicU64,
    failures: AtomicU32,
    /// End of the cool-down (open) or of the probe's wait (half-open), in nanoseconds since
    /// `base`.
    until: AtomicU64,
    base: Instant,
    metrics: Metrics,
}

const STATE_BITS: u64 = 0b11;
const GEN_ONE: u64 = 0b100;

fn state_of(word: u64) -> u8 {
    (word & STATE_BITS) as u8
}

/// What the breaker says about a new request.
#[derive(Debug)]
pub(crate) enum Admit {
    /// Closed: call the service.
    Pass,
    /// The half-open probe: call the service and report its outcome through the token.
    Probe(Probe),
    /// Open (or a probe is in flight): answer at once; retry after this long.
    Reject(Duration),
}

impl Breaker {
    pub(crate) fn new(
        threshold: u32,
        cooldown: Duration,
        probe_timeout: Duration,
        metrics: Metrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                threshold,
                cooldown,
                probe_timeout,
                state: AtomicU64::new(u64::from(CLOSED)),
                failures: AtomicU32::new(0),
                until: AtomicU64::new(0),
                base: Instant::now(),
                metrics,
            }),
        }
    }

    /// The current state. `Open` stays `Open` after the cool-down until the next request
    /// arrives and becomes the probe.
    pub fn state(&self) -> BreakerState {
        match state_of(self.inner.state.load(Ordering::Acquire)) {
            CLOSED => BreakerState::Closed,
            OPEN => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    /// Failures counted since the last success (while closed).
    pub fn consecutive_failures(&self) -> u32 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// Consecutive failures that open the circuit.
    pub fn threshold(&self) -> u32 {
        self.inner.threshold
    }

    /// How long the circuit stays open before a probe is let through.
    pub fn cooldown(&self) -> Duration {
        self.inner.cooldown
    }

    /// How long the half-open probe's outcome is waited for before it counts as a failure.
    pub fn probe_timeout(&self) -> Duration {
        self.inner.probe_timeout
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.inner.base).as_nanos() as u64
    }

    /// Moves from `word` (as loaded) to `state`, keeping its probe number (or starting the
    /// next one, with `next_probe`); `false` if the word changed meanwhile.
    fn transition(&self, word: u64, state: u8, next_probe: bool) -> bool {
        let gen = (word & !STATE_BITS).wrapping_add(if next_probe { GEN_ONE } else { 0 });
        self.inner
            .state
            .compare_exchange(
                word,
                gen | u64::from(state),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Decides about a new request. Closed costs one atomic load.
    pub(crate) fn admit(&self) -> Admit {
        let i = &*self.inner;
        let word = i.state.load(Ordering::Acquire);
        match state_of(word) {
            CLOSED => Admit::Pass,
            OPEN => {
                let now = self.nanos(Instant::now());
                let until = i.until.load(Ordering::Acquire);
                if now < until {
                    return Admit::Reject(Duration::from_nanos(until - now));
                }
                // The probe's wait, set before the circuit can be seen half-open (a request
                // that loses the race below only sets about the same value).
                i.until.store(
                    self.nanos(Instant::now() + i.probe_timeout),
                    Ordering::Release,
                );
                if self.transition(word, HALF_OPEN, true) {
                    tracing::info!(
                        "tower-drain circuit breaker half-open: letting one probe through"
                    );
                    Admit::Probe(Probe {
                        breaker: Some(self.clone()),
                        word: (word & !STATE_BITS).wrapping_add(GEN_ONE) | u64::from(HALF_OPEN),
                    })
                } else {
                    // Another request just became the probe.
                    Admit::Reject(Duration::from_secs(1))
                }
            }
            _ => {
                let now = self.nanos(Instant::now());
                let until = i.until.load(Ordering::Acquire);
                if now < until {
                    return Admit::Reject(Duration::from_nanos(until - now));
                }
                // The probe's outcome is overdue: it failed.
                self.probe_failed(word, "probe timed out");
                Admit::Reject(i.cooldown)
            }
        }
    }

    /// A success outside the probe: resets the consecutive count (only while closed).
    #[inline]
    pub(crate) fn success(&self) {
        let f = &self.inner.failures;
        // Load first: no cache-line write on the common path.
        if f.load(Ordering::Relaxed) != 0
            && state_of(self.inner.state.load(Ordering::Acquire)) == CLOSED
        {
            f.store(0, Ordering::Relaxed);
        }
    }

    /// A failure outside the probe; opens the circuit at the threshold. Failures while open
    /// (requests that started before it opened) are ignored.
    pub(crate) fn failure(&self) {
        let i = &*self.inner;
        let word = i.state.load(Ordering::Acquire);
        if state_of(word) != CLOSED {
            return;
        }
        let n = i.failures.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        if n >= i.threshold {
            self.open(word, n);
        }
    }

    fn open(&self, word: u64, failures: u32) {
        let i = &*self.inner;
        let until = self.nanos(Instant::now() + i.cooldown);
        i.until.store(until, Ordering::Release);
        if self.transition(word, OPEN, false) {
            i.metrics.breaker_trips.increment(1);
            i.metrics.breaker_open.increment(1.0);
            tracing::warn!(
                failures,
                cooldown_ms = i.cooldown.as_millis() as u64,
                "tower-drain circuit breaker opened"
            );
        }
    }

    fn probe_succeeded(&self, word: u64) {
        let i = &*self.inner;
        if self.transition(word, CLOSED, false) {
            i.failures.store(0, Ordering::Relaxed);
            i.metrics.breaker_open.decrement(1.0);
            tracing::info!("tower-drain circuit breaker closed: probe succeeded");
        }
    }

    /// The probe of `word` failed (or timed out): open for another cool-down.
    fn probe_failed(&self, word: u64, why: &'static str) {
        let i = &*self.inner;
        let until = self.nanos(Instant::now() + i.cooldown);
        if self.transition(word, OPEN, false) {
            i.until.store(until, Ordering::Release);
            i.metrics.breaker_trips.increment(1);
            tracing::warn!(
                cooldown_ms = i.cooldown.as_millis() as u64,
                "tower-drain circuit breaker re-opened: {why}"
            );
        }
    }

    fn probe_abandoned(&self, word: u64) {
        // Back to open with the (already past) cool-down: the next request probes.
        if self.transition(word, OPEN, false) {
            self.inner.until.store(0, Ordering::Release);
        }
    }
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &self.state())
            .field("consecutive_failures", &self.consecutive_failures())
            .field("threshold", &self.inner.threshold)
            .field("cooldown", &self.inner.cooldown)
            .field("probe_timeout", &self.inner.probe_timeout)
            .finish()
    }
}

/// The half-open probe's ticket: its verdict closes or re-opens the circuit, if it is still
/// the current probe. Dropped without a verdict (the client went away before the response),
/// it hands the probe to the next request.
#[derive(Debug)]
pub(crate) struct Probe {
    breaker: Option<Breaker>,
    /// The breaker's word while this probe is the current one.
    word: u64,
}

impl Probe {
    pub(crate) fn verdict(mut self, ok: bool) {
        if let Some(b) = self.breaker.take() {
            if ok {
                b.probe_succeeded(self.word);
            } else {
                b.probe_failed(self.word, "probe failed");
            }
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Some(b) = self.breaker.take() {
            b.probe_abandoned(self.word);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe `b` admits next.
    fn next_probe(b: &Breaker) -> Probe {
        match b.admit() {
            Admit::Probe(probe) => probe,
            _ => panic!("expected the probe"),
        }
    }

    /// A breaker of threshold 1, tripped and with its cool-down over.
    async fn half_open() -> Breaker {
        let b = breaker(1);
        b.failure();
        tokio::time::advance(Duration::from_secs(30)).await;
        b
    }

    fn breaker(threshold: u32) -> Breaker {
        Breaker::new(
            threshold,
            Duration::from_secs(30),
            Duration::from_secs(30),
            Metrics::new(),
        )
    }

    fn is_pass(a: &Admit) -> bool {
        matches!(a, Admit::Pass)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_n_consecutive_failures_only() {
        let b = breaker(3);
        b.failure();
        b.failure();
        assert_eq!(b.state(), BreakerState::Closed);
        b.success(); // not consecutive any more
        b.failure();
        b.failure();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(is_pass(&b.admit()));
        b.failure();
        assert_eq!(b.state(), BreakerState::Open);
        match b.admit() {
            Admit::Reject(d) => assert_eq!(d, Duration::from_secs(30)),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_lets_exactly_one_probe_through() {
        let b = breaker(1);
        b.failure();
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(matches!(b.admit(), Admit::Reject(_)));
        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = next_probe(&b);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(matches!(b.admit(), Admit::Reject(_)));
        assert!(matches!(b.admit(), Admit::Reject(_)));
        probe.verdict(false);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(matches!(b.admit(), Admit::Reject(_)));

        tokio::time::advance(Duration::from_secs(30)).await;
        let probe = next_probe(&b);
        probe.verdict(true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.consecutive_failures(), 0);
        assert!(is_pass(&b.admit()));
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_hands_over_to_the_next_request() {
        let b = half_open().await;
        let probe = next_probe(&b);
        drop(probe);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(matches!(b.admit(), Admit::Probe(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_answers_counts_as_failed_after_the_probe_timeout() {
        let b = half_open().await;
        let hung = next_probe(&b);
        // Its handler hangs: within the probe timeout, everyone else is turned away...
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(matches!(b.admit(), Admit::Reject(d) if d == Duration::from_secs(1)));
        // ...and past it the probe counts as failed: open for another cool-down.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(b.admit(), Admit::Reject(_)));
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(30)).await;
        let Admit::Probe(next) = b.admit() else {
            panic!("a new probe goes after the cool-down")
        };
        // The hung probe's late verdict belongs to an old probe: ignored.
        hung.verdict(true);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        next.verdict(true);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_while_open_do_not_extend_the_cooldown() {
        let b = breaker(1);
        b.failure();
        tokio::time::advance(Duration::from_secs(20)).await;
        b.failure(); // a request that started before the circuit opened
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(matches!(b.admit(), Admit::Probe(_)));
    }
}
