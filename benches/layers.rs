//! Per-request overhead of each tower-drain layer, of the full `DrainStack`, and of the
//! tower / tower-http peers, against the same trivial inner service.
//!
//! Every iteration clones the service, drives `ready().call()` and polls the response body to
//! its end (the layers' wrappers live in the body). Requests carry an `x-client-id` header in
//! every variant, so only the keyed variant uses it but all pay the same request cost.
//!
//! ```text
//! cargo bench --bench layers
//! ```
//!
//! Overhead = time(variant) − time(bare); `BENCHMARKS.md` compares those differences.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use http::{Request, Response, StatusCode};
use http_body::Body;
use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service, ServiceBuilder};
use tower_drain::frame::FrameLayer;
use tower_drain::guard::GuardLayer;
use tower_drain::reject::RejectLayer;
use tower_drain::track::TrackLayer;
use tower_drain::{DrainController, DrainStack};
use tower_http::timeout::TimeoutLayer;

#[path = "support/workloads.rs"]
mod workloads;

use workloads::{hello, one};

fn case<S, B>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    rt: &tokio::runtime::Runtime,
    name: &str,
    svc: S,
) where
    S: Service<Request<()>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    // Warm the path once outside the measurement (lazy statics, first allocations).
    rt.block_on(one(svc.clone()));
    g.bench_function(name, |b| b.to_async(rt).iter(|| one(svc.clone())));
}

fn layers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Built inside the runtime: the controller registers its metrics there.
    let drain = rt.block_on(async { DrainController::new() });
    let watch = drain.watch();
    let bare = tower::service_fn(hello);

    let mut g = c.benchmark_group("layers");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));

    case(&mut g, &rt, "bare", bare);
    case(
        &mut g,
        &rt,
        "reject",
        RejectLayer::new(watch.clone()).layer(bare),
    );
    case(
        &mut g,
        &rt,
        "track",
        TrackLayer::new(watch.clone()).layer(bare),
    );
    case(
        &mut g,
        &rt,
        "track_keyed_limit",
        TrackLayer::new(watch.clone())
            .max_per_key(1_000)
            .key_header(http::HeaderName::from_static("x-client-id"))
            .layer(bare),
    );
    case(
        &mut g,
        &rt,
        "guard",
        GuardLayer::new(watch.clone()).layer(bare),
    );
    case(
        &mut g,
        &rt,
        "frame",
        FrameLayer::new(watch.clone()).layer(bare),
    );
    case(
        &mut g,
        &rt,
        "drain_stack",
        DrainStack::new(watch.clone()).layer(bare),
    );
    case(
        &mut g,
        &rt,
        "drain_stack_response_timeout",
        DrainStack::new(watch.clone())
            .guard(|g| g.response_timeout(Duration::from_secs(30)))
            .unwrap()
            .layer(bare),
    );
    case(
        &mut g,
        &rt,
        "tower_http_timeout",
        TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, Duration::from_secs(30))
            .layer(bare),
    );
    case(
        &mut g,
        &rt,
        "tower_concurrency_limit",
        ConcurrencyLimitLayer::new(10_000).layer(bare),
    );
    case(
        &mut g,
        &rt,
        "timeout_plus_concurrency_limit",
        ServiceBuilder::new()
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                Duration::from_secs(30),
            ))
            .layer(ConcurrencyLimitLayer::new(10_000))
            .service(bare),
    );
    g.finish();
    assert_eq!(drain.active_streams(), 0, "every stream was released");
}

criterion_group!(benches, layers);
criterion_main!(benches);
