//! `connection: close` on HTTP/1.x responses from `Closing` on.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{header, HeaderValue, Request, Response, StatusCode, Version};

use super::sniff::Proto;
use crate::{DrainWatch, Phase};

const CLOSE: HeaderValue = HeaderValue::from_static("close");

/// A hyper service wrapper that adds `connection: close` to every HTTP/1.x response produced
/// from `Closing` on, so hyper closes the connection after that response, while an idle
/// keep-alive connection is left open (closing it could race a request already on its way,
/// RFC 9112 §9.3). `101 Switching Protocols` responses and HTTP/2 are left as they are
/// (HTTP/2 forbids connection-specific headers; it gets GOAWAY instead).
///
/// [`Connections`](super::Connections) puts it around every service; use it directly in a
/// hyper accept loop of your own.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use hyper::service::Service as _;
/// use tower_drain::{conn::CloseOnDrain, DrainController, DrainReason};
///
/// let drain = DrainController::new();
/// let svc = CloseOnDrain::new(
///     hyper::service::service_fn(|_req: Request<String>| async {
///         Ok::<_, Infallible>(Response::new(String::from("ok")))
///     }),
///     drain.watch(),
/// );
/// let res = svc.call(Request::new(String::new())).await.unwrap();
/// assert!(res.headers().get("connection").is_none());
///
/// drain.drain(DrainReason::Manual);
/// drain.closing().await;
/// let res = svc.call(Request::new(String::new())).await.unwrap();
/// assert_eq!(res.headers()["connection"], "close");
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct CloseOnDrain<S> {
    inner: S,
    watch: DrainWatch,
    // The connection's state in `Connections` (told when a request arrives).
    conn: Option<Arc<Proto>>,
}

impl<S> CloseOnDrain<S> {
    /// Wraps the hyper service `inner`.
    pub fn new(inner: S, watch: DrainWatch) -> Self {
        Self {
            inner,
            watch,
            conn: None,
        }
    }

    pub(super) fn for_connection(inner: S, watch: DrainWatch, conn: Arc<Proto>) -> Self {
        Self {
            inner,
            watch,
            conn: Some(conn),
        }
    }
}

impl<S, ReqB, ResB> hyper::service::Service<Request<ReqB>> for CloseOnDrain<S>
where
    S: hyper::service::Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = CloseOnDrainFuture<S::Future>;

    fn call(&self, req: Request<ReqB>) -> Self::Future {
        if let Some(conn) = &self.conn {
            conn.request();
        }
        let http1 = req.version() <= Version::HTTP_11;
        CloseOnDrainFuture {
            inner: self.inner.call(req),
            watch: http1.then(|| self.watch.clone()),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`CloseOnDrain`].
    pub struct CloseOnDrainFuture<F> {
        #[pin]
        inner: F,
        // Only for HTTP/1.x requests.
        watch: Option<DrainWatch>,
    }
}

impl<F, B, E> Future for CloseOnDrainFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.inner.poll(cx))?;
        // Decided when the response is ready, not when the request came: a request that
        // arrived just before `Closing` is answered after it.
        if let Some(watch) = this.watch {
            if watch.phase() >= Phase::Closing && res.status() != StatusCode::SWITCHING_PROTOCOLS {
                res.headers_mut().insert(header::CONNECTION, CLOSE);
            }
        }
        Poll::Ready(Ok(res))
    }
}

impl<F> std::fmt::Debug for CloseOnDrainFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloseOnDrainFuture").finish_non_exhaustive()
    }
}
