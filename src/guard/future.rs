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

use super::body::GuardedBody;
use super::breaker::Probe;
use super::layer::Config;
use crate::frame::{should_inject, FinalGate};
use crate::route::RoutePath;

/// What a call carries from `call` to the response body.
pub(crate) struct CallState {
    pub(crate) cfg: Arc<Config>,
    pub(crate) probe: Option<Probe>,
    /// When `call` ran; only taken when a setting needs it (response timeout, lifetime,
    /// revalidation), else the body's creation stands in for it.
    pub(crate) started: Option<Instant>,
    pub(crate) deadline: Option<Instant>,
    pub(crate) head: bool,
    pub(crate) uri: RoutePath,
    pub(crate) parts: Option<Box<Parts>>,
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
            status: StatusCode,
            retry_after: Duration,
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

    pub(crate) fn rejected(status: StatusCode, retry_after: Duration) -> Self {
        Self {
            kind: Kind::Rejected {
                status,
                retry_after,
            },
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
                let st = state.as_mut().expect("polled after completion");
                let Some(deadline) = st.deadline else {
                    return Poll::Pending;
                };
                // Created on first poll, so `call` works outside a runtime too.
                let sleep =
                    timeout.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                state.take().expect("polled after completion")
            }
            KindProj::Rejected {
                status,
                retry_after,
            } => {
                let mut res = Response::new(GuardedBody::empty());
                *res.status_mut() = *status;
                res.headers_mut()
                    .insert(header::RETRY_AFTER, retry_after_secs(*retry_after));
                let res = Ok(res);
                kind.set(Kind::Done);
                return Poll::Ready(res);
            }
            KindProj::Done => panic!("ResponseFuture polled after completion"),
        };
        // Drop the inner future now, then answer.
        kind.set(Kind::Done);
        let mut st = timed_out;
        st.cfg.frame.shared.metrics.timeouts_response.increment(1);
        tracing::warn!(
            path = st.uri.path(),
            timeout_ms = st.cfg.response_timeout.unwrap_or_default().as_millis() as u64,
            "response timeout: inner future dropped"
        );
        st.outcome(false);
        let mut res = Response::new(GuardedBody::empty());
        *res.status_mut() = st.cfg.timeout_status;
        Poll::Ready(Ok(res))
    }
}

fn finish<B, E>(
    mut st: CallState,
    res: Result<Response<B>, E>,
) -> Result<Response<GuardedBody<B>>, E> {
    let res = match res {
        Ok(res) => res,
        Err(e) => {
            st.outcome(false);
            return Err(e);
        }
    };
    let ok = !(st.cfg.is_failure)(res.status());
    st.outcome(ok);
    if !st.head && should_inject(&res, &*st.cfg.frame.encoder) {
        let gate = res.extensions().get::<FinalGate>().cloned();
        Ok(res.map(|b| GuardedBody::stream(b, st, gate)))
    } else if st.cfg.breaker.is_some() {
        Ok(res.map(|b| GuardedBody::watched(b, st.cfg, st.uri)))
    } else {
        Ok(res.map(GuardedBody::passthrough))
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
