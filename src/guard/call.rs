//! [`GuardCall`]: the guard's steps around the inner call: the circuit breaker, the response
//! timeout, and what a response's body needs from the guard.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{header, HeaderValue, Method, Response};
use http_body::Body;
use tokio::time::Instant;

use super::breaker::{Admit, Probe};
use super::config::Config;
use super::layer::GuardLayer;
use super::limits::Limits;
use super::stream::GuardHook;
use crate::hook::{AfterCx, Before, CallHook, CallState};
use crate::route::RoutePath;

/// What a call carries from the guard's step before it to the response.
pub struct GuardState {
    cfg: Arc<Config>,
    probe: Option<Probe>,
    /// When the call began; only taken when a setting needs it (response timeout, lifetime,
    /// revalidation), else the body's creation stands in for it.
    started: Option<Instant>,
    head: bool,
    /// A gRPC request: the guard's own answers are gRPC-native.
    grpc: bool,
    /// The response timeout of this call: the guard's, or the request's own `grpc-timeout`
    /// when shorter.
    timeout: Option<Duration>,
    uri: RoutePath,
    /// A copy of the request's parts, for revalidation.
    parts: Option<Box<Parts>>,
}

/// The guard's call hook.
impl CallHook for GuardLayer {
    type State = GuardState;
    type Wait = Infallible;

    #[inline]
    fn before(&self, parts: &mut Parts) -> Before<GuardState, Infallible> {
        let cfg = &self.cfg;
        if let Some(d) = cfg.max_lifetime {
            // A WebSocket tracked by an outer track hook lives no longer than a stream.
            crate::ws::set_lifetime(parts, d);
        }
        // Only a guard that may answer by itself needs to know the protocol.
        let grpc = (cfg.breaker.is_some() || cfg.response_timeout.is_some())
            && crate::grpc::is_grpc(&parts.headers);
        let probe = match cfg.breaker.as_ref().map(|b| b.admit()) {
            None | Some(Admit::Pass) => None,
            Some(Admit::Probe(p)) => Some(p),
            Some(Admit::Reject(retry)) => {
                cfg.frame.shared.metrics.rejected_breaker.increment(1);
                tracing::debug!(
                    method = %parts.method,
                    path = parts.uri.path(),
                    "circuit open: request rejected"
                );
                return Before::Answer(None, Box::new(rejection(cfg, retry, grpc)));
            }
        };
        // A gRPC call's own deadline applies when it is shorter than the guard's.
        let timeout = match (cfg.response_timeout, grpc) {
            (Some(d), true) => {
                Some(crate::grpc::timeout_of(&parts.headers).map_or(d, |t| t.min(d)))
            }
            (d, _) => d,
        };
        // The clock is read only when a setting needs the call's start.
        let started = (cfg.response_timeout.is_some()
            || cfg.max_lifetime.is_some()
            || cfg.first_frame_timeout.is_some()
            || cfg.revalidate.is_some())
        .then(Instant::now);
        Before::Call(GuardState {
            cfg: cfg.clone(),
            probe,
            started,
            head: parts.method == Method::HEAD,
            grpc,
            timeout,
            uri: RoutePath::new(&parts.uri),
            parts: cfg.revalidate.as_ref().map(|_| Box::new(copy(parts))),
        })
    }
}

/// A copy of a request's parts.
fn copy(parts: &Parts) -> Parts {
    let (mut copy, ()) = http::Request::new(()).into_parts();
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    copy.extensions = parts.extensions.clone();
    copy
}

impl GuardState {
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

impl CallState for GuardState {
    type Hook = GuardHook;

    #[inline]
    fn deadline(&self) -> Option<Instant> {
        // The deadline counts from the call's start (taken whenever there is a timeout).
        self.timeout.zip(self.started).map(|(d, s)| s + d)
    }

    /// Counts the timeout, logs it and reports the failure to the breaker.
    #[cold]
    fn timed_out(mut self) -> (Option<Self>, Response<()>) {
        self.cfg.frame.shared.metrics.timeouts_response.increment(1);
        tracing::warn!(
            path = self.uri.path(),
            timeout_ms = self.timeout.unwrap_or_default().as_millis() as u64,
            "response timeout: inner future dropped"
        );
        self.outcome(false);
        if self.grpc {
            let res = crate::grpc::trailers_only(
                crate::grpc::DEADLINE_EXCEEDED,
                "response timeout: no response in time",
                None,
            );
            return (None, res);
        }
        let mut res = Response::new(());
        *res.status_mut() = self.cfg.timeout_status;
        (None, res)
    }

    /// The response's status goes to the breaker; a stream of the guard's protocol (never
    /// the answer to a `HEAD`) gets the guard's stream hook.
    #[inline]
    fn after<B: Body>(mut self, res: &mut Response<B>, acx: &mut AfterCx) -> GuardHook {
        let ok = !(self.cfg.is_failure.0)(res.status());
        self.outcome(ok);
        if !self.head && acx.stream(&self.cfg.frame, res) {
            // A final-frame sender inside (the frame layer's hook) shares its gate.
            acx.join_gate(res.extensions_mut());
            let (started, parts) = (self.started, self.parts.take());
            GuardHook::stream(self.cfg, self.uri, move |cfg, jitter| {
                Limits::new(cfg, started, parts, jitter)
            })
        } else if self.cfg.breaker.is_some() {
            GuardHook::watched(self.cfg, self.uri)
        } else {
            GuardHook::default()
        }
    }

    /// An inner error is a failure for the breaker.
    #[inline]
    fn failed(mut self) {
        self.outcome(false);
    }
}

/// The answer to a request the circuit breaker turned away: the status with `retry-after`,
/// or for gRPC `UNAVAILABLE` with the rest of the cool-down as its pushback.
fn rejection(cfg: &Config, retry: Duration, grpc: bool) -> Response<()> {
    if grpc {
        return crate::grpc::trailers_only(
            crate::grpc::UNAVAILABLE,
            "circuit breaker open: the service is failing",
            Some(retry),
        );
    }
    let mut res = Response::new(());
    *res.status_mut() = cfg.breaker_status;
    res.headers_mut()
        .insert(header::RETRY_AFTER, retry_after_secs(retry));
    res
}

/// Whole seconds, rounded up, at least 1.
fn retry_after_secs(d: Duration) -> HeaderValue {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

crate::macros::opaque_debug!(GuardState);
