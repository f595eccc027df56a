use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::request::Parts;
use http::{header, HeaderValue, Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::body::{GuardedBody, Stream};
use super::breaker::Probe;
use super::config::Config;
use crate::frame::{should_inject, FinalGate};
use crate::route::RoutePath;

/// What a call carries from `call` to the response body.
pub(crate) struct CallState {
    pub(crate) cfg: Arc<Config>,
    pub(crate) probe: Option<Probe>,
    /// When `call` ran; only taken when a setting needs it (response timeout, lifetime,
    /// revalidation), else the body's creation stands in for it.
    pub(crate) started: Option<Instant>,
    pub(crate) head: bool,
    /// A gRPC request: the guard's own answers are gRPC-native.
    pub(crate) grpc: bool,
    /// The response timeout of this call: the guard's, or the request's own `grpc-timeout`
    /// when shorter.
    pub(crate) timeout: Option<Duration>,
    pub(crate) uri: RoutePath,
    pub(crate) parts: Option<Box<Parts>>,
}

/// A request the circuit breaker turned away: the answer's status (HTTP) and retry delay.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rejection {
    pub(crate) status: StatusCode,
    pub(crate) retry_after: Duration,
    pub(crate) grpc: bool,
}

impl CallState {
    /// Reports the outcome to the breaker (the probe's verdict, or an ordinary one).
    fn outcome(&mut self, ok: bool) {
        if let Some(p) = self.probe.take() {
            p.verdict(ok);
        } else if let Some(b) = &self.cfg.breaker {
            if ok {
                b.success();
            } else {
                b.failure();
            }
        }
    }
}

pin_project! {
    /// Response future of [`Guard`](super::Guard).
    ///
    /// Polls the inner future first, then the response timeout: a response that is ready at
    /// the deadline wins.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Calling {
            #[pin]
            fut: F,
            // Boxed, and only when a response timeout is set: a `Sleep` is large, and the
            // future is moved through every layer.
            timeout: Option<Pin<Box<Sleep>>>,
            state: Option<CallState>,
        },
        Rejected {
            rejection: Rejection,
        },
        Done,
    }
}

impl<F> ResponseFuture<F> {
    #[inline]
    pub(crate) fn calling(fut: F, state: CallState) -> Self {
        Self {
            kind: Kind::Calling {
                fut,
                timeout: None,
                state: Some(state),
            },
        }
    }

    pub(crate) fn rejected(rejection: Rejection) -> Self {
        Self {
            kind: Kind::Rejected { rejection },
        }
    }
}

/// Whole seconds, rounded up, at least 1.
fn retry_after_secs(d: Duration) -> HeaderValue {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
{
    type Output = Result<Response<GuardedBody<B>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut kind = self.project().kind;
        let timed_out = match kind.as_mut().project() {
            KindProj::Calling {
                fut,
                timeout,
                state,
            } => {
                // The inner future first: a response ready at the deadline wins the tie.
                if let Poll::Ready(res) = fut.poll(cx) {
                    let st = state.take().expect("polled after completion");
                    kind.set(Kind::Done);
                    return Poll::Ready(finish(st, res));
                }
                let st = state.as_ref().expect("polled after completion");
                if poll_timeout(timeout, st, cx).is_pending() {
                    return Poll::Pending;
                }
                state.take().expect("polled after completion")
            }
            KindProj::Rejected { rejection: r } => {
                let res = Ok(rejection(*r));
                kind.set(Kind::Done);
                return Poll::Ready(res);
            }
            KindProj::Done => panic!("ResponseFuture polled after completion"),
        };
        // Drop the inner future now, then answer.
        kind.set(Kind::Done);
        Poll::Ready(Ok(timed_out_response(timed_out)))
    }
}

/// The answer to a request the circuit breaker turned away: the status with `retry-after`,
/// or for gRPC `UNAVAILABLE` with the rest of the cool-down as its pushback.
pub(crate) fn rejection<B>(r: Rejection) -> Response<GuardedBody<B>> {
    if r.grpc {
        return crate::grpc::trailers_only(
            crate::grpc::UNAVAILABLE,
            "circuit breaker open: the service is failing",
            Some(r.retry_after),
        )
        .map(|()| GuardedBody::empty());
    }
    let mut res = Response::new(GuardedBody::empty());
    *res.status_mut() = r.status;
    res.headers_mut()
        .insert(header::RETRY_AFTER, retry_after_secs(r.retry_after));
    res
}

/// Polls the response timeout of a call whose inner future is pending: `Ready` once it has
/// fired, `Pending` (forever) without one. The timer is created on the first poll, so `call`
/// works outside a runtime too.
#[inline]
pub(crate) fn poll_timeout(
    timeout: &mut Option<Pin<Box<Sleep>>>,
    st: &CallState,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let sleep = match timeout {
        Some(sleep) => sleep,
        None => {
            // The deadline counts from the call's start (taken whenever there is a timeout).
            let Some(deadline) = st.timeout.zip(st.started).map(|(d, s)| s + d) else {
                return Poll::Pending;
            };
            timeout.insert(Box::pin(tokio::time::sleep_until(deadline)))
        }
    };
    sleep.as_mut().poll(cx)
}

/// The answer once the response timeout has fired (the inner future already dropped):
/// counts it, logs it and reports the failure to the breaker.
#[cold]
pub(crate) fn timed_out_response<B>(mut st: CallState) -> Response<GuardedBody<B>> {
    st.cfg.frame.shared.metrics.timeouts_response.increment(1);
    tracing::warn!(
        path = st.uri.path(),
        timeout_ms = st.timeout.unwrap_or_default().as_millis() as u64,
        "response timeout: inner future dropped"
    );
    st.outcome(false);
    if st.grpc {
        return crate::grpc::trailers_only(
            crate::grpc::DEADLINE_EXCEEDED,
            "response timeout: no response in time",
            None,
        )
        .map(|()| GuardedBody::empty());
    }
    let mut res = Response::new(GuardedBody::empty());
    *res.status_mut() = st.cfg.timeout_status;
    res
}

/// Whether the guard treats `res` as a stream that gets a final frame: never the answer to a
/// `HEAD`, else the same decision as the frame layer's.
#[inline]
pub(crate) fn injects<B: http_body::Body>(st: &CallState, res: &Response<B>) -> bool {
    !st.head && should_inject(res, &*st.cfg.frame.encoder)
}

fn finish<B: http_body::Body, E>(
    st: CallState,
    res: Result<Response<B>, E>,
) -> Result<Response<GuardedBody<B>>, E> {
    match res {
        Ok(mut res) => {
            let inject = injects(&st, &res);
            Ok(match finish_ok(st, &res, inject) {
                Guarded::Stream(stream) => {
                    crate::frame::unfix_length(&mut res);
                    // An inner frame layer left the stream's final-frame gate in the
                    // extensions (looked up for streams only).
                    let gate = res.extensions().get::<FinalGate>().cloned();
                    res.map(|b| GuardedBody::stream(b, stream, gate))
                }
                Guarded::Watched(cfg, uri) => res.map(|b| GuardedBody::watched(b, cfg, uri)),
                Guarded::Plain => res.map(GuardedBody::passthrough),
            })
        }
        Err(e) => Err(finish_err(st, e)),
    }
}

/// An inner error: a failure for the breaker, passed on.
#[inline]
pub(crate) fn finish_err<E>(mut st: CallState, e: E) -> E {
    st.outcome(false);
    e
}

/// What the guard keeps of a response's call for its body (see [`finish_ok`]).
pub(crate) enum Guarded {
    /// A stream that gets a final frame: its state.
    Stream(Stream),
    /// A plain response whose errors count for the breaker.
    Watched(Arc<Config>, RoutePath),
    /// Nothing to watch.
    Plain,
}

/// A response: its status reported to the breaker, and what its body needs of the guard
/// (`inject` as decided by [`injects`]).
#[inline]
pub(crate) fn finish_ok<B>(mut st: CallState, res: &Response<B>, inject: bool) -> Guarded {
    let ok = !(st.cfg.is_failure)(res.status());
    st.outcome(ok);
    if inject {
        Guarded::Stream(Stream::new(st))
    } else if st.cfg.breaker.is_some() {
        Guarded::Watched(st.cfg, st.uri)
    } else {
        Guarded::Plain
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
