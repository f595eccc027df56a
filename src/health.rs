//! gRPC health checking (`grpc.health.v1.Health`) that follows the drain (feature
//! `tonic-health`).
//!
//! [`DrainHealth`] wraps [`tonic_health`]'s reporter: every service registered through it,
//! and the server as a whole (the service name `""`), reports `SERVING` until a drain starts
//! and `NOT_SERVING` from `Draining` on, so Kubernetes gRPC probes and client-side health
//! checking take the pod out of rotation during the propagation delay, before new calls
//! are rejected. `Watch` streams receive the change at once.
//!
//! The reject layer exempts `/grpc.health.v1.Health/` paths by default, so `Check` keeps
//! answering (`NOT_SERVING`) throughout the drain instead of being rejected with
//! `UNAVAILABLE`; [`DrainHealthServer`] marks `Check` answers
//! [`RunToCompletion`], so that under a
//! [`DrainStack`](crate::DrainStack) the frame layer does not replace them with the final
//! frame either. A `Watch` stream is a stream like any other: under the stack it is tracked
//! and ends at `Closing` with the final frame (with [`frame::Grpc`](crate::frame::Grpc),
//! `UNAVAILABLE` trailers), after it has seen `NOT_SERVING`.
//!
//! # Example
//!
//! ```no_run
//! use tower_drain::{health::DrainHealth, DrainController};
//!
//! # #[derive(Clone)] struct MyService;
//! # impl tonic::server::NamedService for MyService { const NAME: &'static str = "demo.My"; }
//! # #[tokio::main] async fn main() {
//! let drain = DrainController::new();
//! let (health, health_service) = DrainHealth::new(drain.watch());
//! health.set_serving::<MyService>().await;
//! // Serve `health_service` next to `MyService` (for instance in the same
//! // `tonic::service::Routes`, under the stack).
//! # drop(health_service);
//! # }
//! ```

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use crate::frame::RunToCompletion;
use crate::DrainWatch;

/// A [`HealthReporter`] whose services report `NOT_SERVING` from `Draining` on; see the
/// [module docs](self).
#[derive(Clone, Debug)]
pub struct DrainHealth {
    reporter: HealthReporter,
    watch: DrainWatch,
    names: Arc<Mutex<BTreeSet<String>>>,
    reported: CancellationToken,
}

impl DrainHealth {
    /// A reporter driven by `watch`'s drain, and the health service to serve. The server as
    /// a whole (`""`) is `SERVING` until the drain starts.
    ///
    /// # Panics
    ///
    /// If called outside a tokio runtime: it spawns the task that reports `NOT_SERVING` when
    /// the drain starts (it ends then).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tonic_health::ServingStatus;
    ///
    /// let drain = tower_drain::DrainController::new();
    /// let (health, server) = tower_drain::health::DrainHealth::new(drain.watch());
    /// health.set_service_status("demo.Ticker", ServingStatus::Serving).await;
    /// assert_eq!(health.status("demo.Ticker").await, Some(ServingStatus::Serving));
    ///
    /// drain.drain(tower_drain::DrainReason::Manual);
    /// health.not_serving().await;
    /// assert_eq!(health.status("demo.Ticker").await, Some(ServingStatus::NotServing));
    /// assert_eq!(health.status("").await, Some(ServingStatus::NotServing));
    /// # drop(server);
    /// # }
    /// ```
    pub fn new(watch: DrainWatch) -> (Self, DrainHealthServer) {
        let reporter = HealthReporter::new();
        let server = DrainHealthServer {
            inner: HealthServer::new(HealthService::from_health_reporter(reporter.clone())),
        };
        let mut names = BTreeSet::new();
        names.insert(String::new());
        let this = Self {
            reporter,
            watch,
            names: Arc::new(Mutex::new(names)),
            reported: CancellationToken::new(),
        };
        let task = this.clone();
        tokio::spawn(async move {
            task.watch.draining().await;
            let names: Vec<String> = task.lock().iter().cloned().collect();
            for name in &names {
                task.reporter
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            tracing::info!(
                services = names.len(),
                "tower-drain health: every service NOT_SERVING"
            );
            task.reported.cancel();
        });
        (this, server)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `S` as `SERVING` (`NOT_SERVING` once a drain has started).
    pub async fn set_serving<S: NamedService>(&self) {
        self.set_service_status(S::NAME, ServingStatus::Serving)
            .await;
    }

    /// Sets a service's status by name and registers it for the drain; `SERVING` becomes
    /// `NOT_SERVING` once a drain has started.
    pub async fn set_service_status(&self, name: &str, status: ServingStatus) {
        self.lock().insert(name.to_owned());
        let status = if self.watch.is_draining() {
            ServingStatus::NotServing
        } else {
            status
        };
        self.reporter.set_service_status(name, status).await;
        // A drain that started meanwhile may have been reported before this write.
        if self.watch.is_draining() && status == ServingStatus::Serving {
            self.reporter
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
    }

    /// The status currently reported for `name` (what `Check` answers), if it is
    /// registered.
    pub async fn status(&self, name: &str) -> Option<ServingStatus> {
        use tonic_health::pb::health_server::Health;
        let svc = HealthService::from_health_reporter(self.reporter.clone());
        let req = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
            service: name.to_owned(),
        });
        let res = svc.check(req).await.ok()?.into_inner();
        Some(match res.status() {
            tonic_health::pb::health_check_response::ServingStatus::Serving => {
                ServingStatus::Serving
            }
            _ => ServingStatus::NotServing,
        })
    }

    /// Resolves once a drain has started and every registered service has been reported
    /// `NOT_SERVING`.
    pub async fn not_serving(&self) {
        self.reported.cancelled().await;
    }

    /// The wrapped reporter, for anything else (`clear_service_status`, …). Statuses set
    /// through it directly are not registered for the drain.
    pub fn reporter(&self) -> &HealthReporter {
        &self.reporter
    }
}

/// The `grpc.health.v1.Health` service of a [`DrainHealth`]: tonic-health's server, with
/// every `Check` answer marked [`RunToCompletion`] (a unary answer is never replaced by the
/// final frame, even when the call arrives during `Closing`). Add it to a tonic `Routes` or
/// `Server` like any generated service.
#[derive(Clone, Debug)]
pub struct DrainHealthServer {
    inner: HealthServer<HealthService>,
}

impl NamedService for DrainHealthServer {
    const NAME: &'static str = <HealthServer<HealthService> as NamedService>::NAME;
}

impl<B> Service<Request<B>> for DrainHealthServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<crate::BoxError> + Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = DrainHealthFuture<<HealthServer<HealthService> as Service<Request<B>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<Request<B>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let check = req.uri().path().ends_with("/Check");
        DrainHealthFuture {
            inner: self.inner.call(req),
            check,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`DrainHealthServer`].
    pub struct DrainHealthFuture<F> {
        #[pin]
        inner: F,
        check: bool,
    }
}

impl<F> Future for DrainHealthFuture<F>
where
    F: Future<Output = Result<Response<tonic::body::Body>, Infallible>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.inner.poll(cx))?;
        if *this.check {
            res.extensions_mut().insert(RunToCompletion);
        }
        Poll::Ready(Ok(res))
    }
}

impl<F> std::fmt::Debug for DrainHealthFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrainHealthFuture").finish_non_exhaustive()
    }
}
