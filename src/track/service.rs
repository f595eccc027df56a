use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::TrackedBody;
use super::guard::StreamGuard;
use super::layer::{KeyFn, TrackLayer};
use super::store::{ConnectionStore, Lease, MemoryStore, StoreError, StoreFailure};
use crate::controller::Shared;
use crate::route::RoutePath;

/// Tracks every request until its response body ends or is dropped; see [`TrackLayer`] and
/// the [module docs](super) for an example.
pub struct Track<S, St = MemoryStore> {
    inner: S,
    cfg: Arc<Config<St>>,
}

pub(crate) struct Config<St> {
    shared: Arc<Shared>,
    store: St,
    limit: Option<u32>,
    key: Option<KeyFn>,
    retry_after: HeaderValue,
    /// The same delay, as gRPC answers' pushback.
    pushback: Duration,
    on_store_error: StoreFailure,
}

impl<S, St: Clone> Track<S, St> {
    pub(crate) fn from_layer(inner: S, layer: &TrackLayer<St>) -> Self {
        let secs = layer.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        Self {
            inner,
            cfg: Arc::new(Config {
                shared: layer.watch.shared.clone(),
                store: layer.store.clone(),
                limit: layer.limit,
                key: layer.key.clone(),
                retry_after: HeaderValue::from(secs),
                pushback: Duration::from_secs(secs),
                on_store_error: layer.on_store_error,
            }),
        }
    }
}

crate::macros::inner_service_accessors!(Track<S, St>);

impl<S, St> Track<S, St> {
    /// The same layer around `inner`.
    pub(crate) fn with_inner<T>(&self, inner: T) -> Track<T, St> {
        Track {
            inner,
            cfg: self.cfg.clone(),
        }
    }

    /// Whether requests get a key (and so may wait for a lease) before the inner call.
    #[inline]
    pub(crate) fn is_keyed(&self) -> bool {
        self.cfg.key.is_some()
    }

    /// Registers an unkeyed request: the track layer's step before the inner call when
    /// [`is_keyed`](Self::is_keyed) is false.
    #[inline]
    pub(crate) fn register<ReqB>(&self, req: &Request<ReqB>) -> StreamGuard {
        StreamGuard::new(
            self.cfg.shared.clone(),
            RoutePath::new(req.uri()),
            None,
            None,
        )
    }
}

impl<S: Clone, St> Clone for Track<S, St> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            cfg: self.cfg.clone(),
        }
    }
}

impl<S: fmt::Debug, St: fmt::Debug> fmt::Debug for Track<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Track")
            .field("inner", &self.inner)
            .field("store", &self.cfg.store)
            .field("limit", &self.cfg.limit)
            .finish_non_exhaustive()
    }
}

impl<S, St, ReqB, ResB> Service<Request<ReqB>> for Track<S, St>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    St: ConnectionStore,
    ResB: Default,
{
    type Response = Response<TrackedBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB, St>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let cfg = &self.cfg;
        if cfg.key.is_none() {
            // No key, so no limit: register and call, moving the request only once.
            let guard = self.register(&req);
            // An upgrade's registration goes to the socket's handle, not the (101) body.
            let guard = crate::ws::hand_over(&mut req, guard);
            return ResponseFuture {
                state: State::Calling {
                    fut: self.inner.call(req),
                    guard,
                },
            };
        }
        let (req, key) = match &cfg.key {
            Some(f) => {
                let (parts, body) = req.into_parts();
                let key = f(&parts).map(Arc::<str>::from);
                (Request::from_parts(parts, body), key)
            }
            None => (req, None),
        };
        let route = RoutePath::new(req.uri());
        match (cfg.limit, key) {
            (Some(limit), Some(key)) => {
                let acquire = cfg.store.acquire(&key, limit);
                // Call the service that was polled ready; leave a fresh clone in its place.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                ResponseFuture {
                    state: State::Acquiring {
                        acquire,
                        call: Some(Box::new(Pending {
                            inner,
                            req,
                            route,
                            key,
                            cfg: cfg.clone(),
                        })),
                    },
                }
            }
            (_, key) => {
                let guard = StreamGuard::new(cfg.shared.clone(), route, key, None);
                let mut req = req;
                let guard = crate::ws::hand_over(&mut req, guard);
                ResponseFuture {
                    state: State::Calling {
                        fut: self.inner.call(req),
                        guard,
                    },
                }
            }
        }
    }
}

/// The gRPC-native form of a rejection (see `crate::grpc`).
#[derive(Clone, Copy, Debug)]
struct GrpcAnswer {
    code: u16,
    message: &'static str,
    pushback: Duration,
}

struct Pending<S, ReqB, St> {
    inner: S,
    req: Request<ReqB>,
    route: RoutePath,
    key: Arc<str>,
    cfg: Arc<Config<St>>,
}

pin_project! {
    /// Response future of [`Track`].
    pub struct ResponseFuture<S, ReqB, St>
    where
        S: Service<Request<ReqB>>,
        St: ConnectionStore,
    {
        #[pin]
        state: State<S, ReqB, St>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqB, St>
    where
        S: Service<Request<ReqB>>,
        St: ConnectionStore,
    {
        Acquiring {
            #[pin]
            acquire: St::Future,
            // Boxed: the request and a service clone are large, and only keyed requests
            // under a limit wait here; unlimited ones keep a small future.
            call: Option<Box<Pending<S, ReqB, St>>>,
        },
        Calling {
            #[pin]
            fut: S::Future,
            guard: Option<StreamGuard>,
        },
        Rejected {
            status: StatusCode,
            retry_after: HeaderValue,
            // A gRPC request: the gRPC-native answer instead (see `crate::grpc`).
            grpc: Option<GrpcAnswer>,
        },
    }
}

impl<S, ReqB, St, ResB> Future for ResponseFuture<S, ReqB, St>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    St: ConnectionStore,
    ResB: Default,
{
    type Output = Result<Response<TrackedBody<ResB>>, S::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Acquiring { acquire, call } => {
                    let res: Result<Option<Lease>, StoreError> = ready!(acquire.poll(cx));
                    let Pending {
                        mut inner,
                        mut req,
                        route,
                        key,
                        cfg,
                    } = *call.take().expect("polled after completion");
                    let lease = match res {
                        Ok(Some(lease)) => Some(lease),
                        Ok(None) => {
                            cfg.shared.metrics.rejected_limit.increment(1);
                            tracing::debug!(key = %key, "per-key stream limit reached: 429");
                            state.set(State::Rejected {
                                status: StatusCode::TOO_MANY_REQUESTS,
                                retry_after: cfg.retry_after.clone(),
                                grpc: crate::grpc::is_grpc(req.headers()).then_some(GrpcAnswer {
                                    code: crate::grpc::RESOURCE_EXHAUSTED,
                                    message: "too many concurrent streams for this key",
                                    pushback: cfg.pushback,
                                }),
                            });
                            continue;
                        }
                        Err(e) => {
                            cfg.shared.metrics.store_errors.increment(1);
                            match cfg.on_store_error {
                                StoreFailure::Closed => {
                                    tracing::warn!(error = %e, "connection store failed: 503 (fail closed)");
                                    state.set(State::Rejected {
                                        status: StatusCode::SERVICE_UNAVAILABLE,
                                        retry_after: cfg.retry_after.clone(),
                                        grpc: crate::grpc::is_grpc(req.headers()).then_some(
                                            GrpcAnswer {
                                                code: crate::grpc::UNAVAILABLE,
                                                message: "stream limits unavailable: the connection store failed",
                                                pushback: cfg.pushback,
                                            },
                                        ),
                                    });
                                    continue;
                                }
                                StoreFailure::Open => {
                                    tracing::debug!(error = %e, "connection store failed: serving without limit");
                                    None
                                }
                            }
                        }
                    };
                    let guard = StreamGuard::new(cfg.shared.clone(), route, Some(key), lease);
                    let guard = crate::ws::hand_over(&mut req, guard);
                    state.set(State::Calling {
                        fut: inner.call(req),
                        guard,
                    });
                }
                StateProj::Calling { fut, guard } => {
                    let res = ready!(fut.poll(cx));
                    let guard = guard.take();
                    return Poll::Ready(res.map(|r| r.map(|b| TrackedBody::new(b, guard))));
                }
                StateProj::Rejected { grpc: Some(g), .. } => {
                    let res = crate::grpc::trailers_only(g.code, g.message, Some(g.pushback));
                    return Poll::Ready(Ok(res.map(|()| TrackedBody::new(ResB::default(), None))));
                }
                StateProj::Rejected {
                    status,
                    retry_after,
                    grpc: None,
                } => {
                    let mut res = Response::new(TrackedBody::new(ResB::default(), None));
                    *res.status_mut() = *status;
                    res.headers_mut()
                        .insert(header::RETRY_AFTER, retry_after.clone());
                    return Poll::Ready(Ok(res));
                }
            }
        }
    }
}

impl<S, ReqB, St> fmt::Debug for ResponseFuture<S, ReqB, St>
where
    S: Service<Request<ReqB>>,
    St: ConnectionStore,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
