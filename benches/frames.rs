//! Per-frame cost of streaming 10,000 small SSE events through the full `DrainStack`'s body
//! body ([`DrainBody`](tower_drain::stack::DrainBody)) against the raw body.
//!
//! Two raw bodies: `static` hands out the same pre-built `Bytes` (the cheapest possible SSE
//! body, a floor), `axum_sse` is axum's `Sse` over a stream of `Event`s (what an application
//! actually serves). Only the polling is timed: the response is created outside the timed
//! section, and the body is polled with a no-op waker to its end.
//!
//! ```text
//! cargo bench --bench frames
//! ```

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::Request;
use http_body::Body;
use tower::{Layer, ServiceExt};
use tower_drain::{DrainController, DrainStack};

#[path = "support/workloads.rs"]
mod workloads;

use workloads::{axum_events, time_bodies, Events, EVENTS};

/// Times polling bodies made by `make` (untimed) to their end.
fn time<B: Body>(rt: &tokio::runtime::Runtime, iters: u64, make: impl FnMut() -> B) -> Duration
where
    B::Error: std::fmt::Debug,
{
    let _enter = rt.enter();
    time_bodies(iters, make)
}

fn frames(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let drain = rt.block_on(async { DrainController::new() });
    let stack = DrainStack::new(drain.watch());
    let static_svc = stack.layer(workloads::static_events_service());
    let axum_svc = stack.layer(workloads::axum_events_service());

    let mut g = c.benchmark_group("frames");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(u64::from(EVENTS)));

    g.bench_function("static_raw", |b| {
        b.iter_custom(|iters| time(&rt, iters, || Events(EVENTS)))
    });
    g.bench_function("static_stack", |b| {
        b.iter_custom(|iters| {
            time(&rt, iters, || {
                let res = rt.block_on(static_svc.clone().oneshot(Request::new(())));
                res.unwrap().into_body()
            })
        })
    });
    g.bench_function("axum_sse_raw", |b| {
        b.iter_custom(|iters| time(&rt, iters, || axum_events().into_body()))
    });
    g.bench_function("axum_sse_stack", |b| {
        b.iter_custom(|iters| {
            time(&rt, iters, || {
                let res = rt.block_on(axum_svc.clone().oneshot(Request::new(())));
                res.unwrap().into_body()
            })
        })
    });
    g.finish();
    assert_eq!(drain.active_streams(), 0);
}

criterion_group!(benches, frames);
criterion_main!(benches);
