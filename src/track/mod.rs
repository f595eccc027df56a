//! Count and register every request from `call` until its response body ends or is dropped,
//! with an optional per-key concurrency limit.
//!
//! The registration is an RAII guard created in `call`, kept in the response future and moved
//! into the response body ([`TrackedBody`]); dropping it is the single clean-up path, so a
//! client that disconnects, a body that errors or panics, and a timeout all bring
//! [`active_streams`](crate::DrainController::active_streams) back down exactly once. The
//! controller waits for that count to reach zero during a drain without polling.
//!
//! With [`max_per_key`](TrackLayer::max_per_key) and a [`key_fn`](TrackLayer::key_fn), a
//! request whose key already holds the limit gets `429 Too Many Requests` with `retry-after`,
//! and the inner service is not called. The counts live in a [`ConnectionStore`]:
//! [`MemoryStore`] by default.
//!
//! Place this layer inside `reject` (rejected requests are not streams) and outside `frame`.
//!
//! # Example
//!
//! ```
//! # use http::{Request, Response, StatusCode}; use bytes::Bytes; use http_body_util::Full;
//! # use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_drain::{DrainController, track::TrackLayer};
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let drain = DrainController::new();
//! let mut svc = ServiceBuilder::new()
//!     .layer(TrackLayer::new(drain.watch()).max_per_key(1).key_header(http::HeaderName::from_static("x-client-id")))
//!     .service_fn(|_req: Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("data: hi\n\n"))))
//!     });
//! let req = || Request::builder().header("x-client-id", "alice").body(()).unwrap();
//!
//! let open = svc.ready().await.unwrap().call(req()).await.unwrap(); // body not finished yet
//! assert_eq!(drain.active_streams(), 1);
//! let second = svc.ready().await.unwrap().call(req()).await.unwrap();
//! assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
//!
//! drop(open); // the client went away
//! assert_eq!(drain.active_streams(), 0);
//! let third = svc.ready().await.unwrap().call(req()).await.unwrap();
//! assert_eq!(third.status(), StatusCode::OK);
//! # }
//! ```

mod call;
pub(crate) mod guard;
mod layer;
pub(crate) mod registry;
mod store;
mod stream;

pub(crate) use self::call::TrackCall;
pub(crate) use self::guard::StreamGuard;
pub use self::layer::{Track, TrackLayer, TrackedBody};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::store::{AcquireFuture, RedisStore, RedisStoreBuilder};
pub use self::store::{ConnectionStore, Lease, MemoryStore, StoreError, StoreFailure};
pub(crate) use self::stream::TrackHook;
