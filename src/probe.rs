//! Kubernetes probes and the manual drain endpoint, as one tower service.
//!
//! | route | answer |
//! |---|---|
//! | `GET /healthz` | liveness: always `200 ok`, even while draining |
//! | `GET /readyz` | readiness: `200 ready` while serving, `503 draining` from the moment a drain starts (only the drain state; never the health of other components) |
//! | `GET /status` | `200` JSON `{"phase","draining","active_streams","reason"}` |
//! | `POST /drain` | with `Authorization: Bearer <key>` (scheme case-insensitive, key compared in constant time): `202` and a drain with reason `manual` (again `202` if one is under way); a missing header, another scheme or a wrong key: `401` and nothing changes; no key configured: `403` |
//!
//! Other paths get `404`, other methods `405`. Mount it on the probe paths, outside the
//! tower-drain layers, so probes are never rejected or tracked.
//!
//! # Example
//!
//! ```
//! # use http::{Request, StatusCode}; use tower::ServiceExt;
//! use tower_drain::{DrainController, probe::Probes};
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let drain = DrainController::new();
//! let probes = Probes::new(drain.clone()).drain_key("s3cret");
//!
//! let res = probes.clone().oneshot(Request::get("/readyz").body(()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//!
//! let wrong = Request::post("/drain").header("authorization", "Bearer nope").body(()).unwrap();
//! assert_eq!(probes.clone().oneshot(wrong).await.unwrap().status(), StatusCode::UNAUTHORIZED);
//! assert!(!drain.is_draining());
//!
//! let right = Request::post("/drain").header("authorization", "bearer s3cret").body(()).unwrap();
//! assert_eq!(probes.clone().oneshot(right).await.unwrap().status(), StatusCode::ACCEPTED);
//! assert!(drain.is_draining());
//!
//! let res = probes.oneshot(Request::get("/readyz").body(()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! # }
//! ```
//!
//! With axum, route each path to it: `Router::new().route_service("/healthz", probes.clone())`
//! (and likewise `/readyz`, `/status`, `/drain`).

use std::convert::Infallible;
use std::fmt;
use std::future::{ready, Ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use subtle::ConstantTimeEq;
use tower_service::Service;

use crate::{DrainController, DrainReason};

/// The probe and drain-endpoint service; see the [module docs](self).
#[derive(Clone)]
pub struct Probes {
    drain: DrainController,
    key: Option<Arc<[u8]>>,
}

impl Probes {
    /// Probes for `drain`, with the manual drain endpoint disabled (`403`).
    ///
    /// ```
    /// let probes = tower_drain::probe::Probes::new(tower_drain::DrainController::new());
    /// # drop(probes);
    /// ```
    pub fn new(drain: DrainController) -> Self {
        Self { drain, key: None }
    }

    /// Enables `POST /drain` for requests carrying `Authorization: Bearer <key>`. Leading and
    /// trailing white space of `key` is ignored (a key read from a file usually ends with a
    /// newline, which no bearer token can carry); an empty or blank key keeps it disabled.
    ///
    /// ```
    /// let probes = tower_drain::probe::Probes::new(tower_drain::DrainController::new())
    ///     .drain_key("from-a-secret");
    /// # drop(probes);
    /// ```
    pub fn drain_key(mut self, key: impl AsRef<str>) -> Self {
        let key = key.as_ref().trim().as_bytes();
        self.key = (!key.is_empty()).then(|| Arc::from(key));
        self
    }

    fn handle<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        let method = req.method();
        let get = method == Method::GET || method == Method::HEAD;
        match path {
            "/healthz" if get => text(StatusCode::OK, "ok"),
            "/readyz" if get => {
                if self.drain.is_draining() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining")
                } else {
                    text(StatusCode::OK, "ready")
                }
            }
            "/status" if get => {
                let body = serde_json::json!({
                    "phase": self.drain.phase().as_str(),
                    "draining": self.drain.is_draining(),
                    "active_streams": self.drain.active_streams(),
                    "reason": self.drain.reason().map(|r| r.as_str().to_owned()),
                });
                let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
                res.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                res
            }
            "/drain" if method == Method::POST => self.manual_drain(req),
            "/healthz" | "/readyz" | "/status" | "/drain" => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            }
            _ => text(StatusCode::NOT_FOUND, "not found"),
        }
    }

    fn manual_drain<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        let Some(key) = &self.key else {
            return text(StatusCode::FORBIDDEN, "manual drain is disabled");
        };
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim().as_bytes());
        let ok = presented.is_some_and(|p| bool::from(p.ct_eq(key)));
        if !ok {
            tracing::warn!("manual drain refused: missing or wrong key");
            let mut res = text(StatusCode::UNAUTHORIZED, "unauthorized");
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return res;
        }
        if self.drain.drain(DrainReason::Manual) {
            tracing::info!("manual drain accepted");
        }
        text(StatusCode::ACCEPTED, "draining")
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

impl<B> Service<Request<B>> for Probes {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        ready(Ok(self.handle(&req)))
    }
}

impl fmt::Debug for Probes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Probes")
            .field("drain", &self.drain)
            .field("drain_endpoint", &self.key.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn call(p: &Probes, req: Request<()>) -> (StatusCode, String) {
        let res = p.clone().call(req).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    fn post(auth: Option<&str>) -> Request<()> {
        let mut b = Request::post("/drain");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(()).unwrap()
    }

    #[tokio::test]
    async fn drain_endpoint_auth() {
        let drain = DrainController::new();
        let p = Probes::new(drain.clone()).drain_key("k3y");
        for bad in [
            None,
            Some("Bearer"),
            Some("Basic k3y"),
            Some("Bearer k3"),
            Some("Bearer k3yy"),
            Some("k3y"),
        ] {
            assert_eq!(
                call(&p, post(bad)).await.0,
                StatusCode::UNAUTHORIZED,
                "{bad:?}"
            );
        }
        assert!(!drain.is_draining(), "a refused call changes nothing");
        assert_eq!(
            call(&p, post(Some("BEARER k3y"))).await.0,
            StatusCode::ACCEPTED
        );
        assert_eq!(drain.reason(), Some(DrainReason::Manual));
        assert_eq!(
            call(&p, post(Some("Bearer k3y"))).await.0,
            StatusCode::ACCEPTED
        );
    }

    #[tokio::test]
    async fn a_key_read_from_a_file_matches_without_its_newline() {
        let drain = DrainController::new();
        let p = Probes::new(drain.clone()).drain_key("k3y\n");
        assert_eq!(
            call(&p, post(Some("Bearer k3y"))).await.0,
            StatusCode::ACCEPTED
        );
        // Blank keys stay disabled, whatever their white space.
        let drain = DrainController::new();
        let p = Probes::new(drain.clone()).drain_key(" \r\n");
        assert_eq!(
            call(&p, post(Some("Bearer "))).await.0,
            StatusCode::FORBIDDEN
        );
        assert!(!drain.is_draining());
    }

    #[tokio::test]
    async fn no_key_means_forbidden() {
        let drain = DrainController::new();
        for p in [
            Probes::new(drain.clone()),
            Probes::new(drain.clone()).drain_key(""),
        ] {
            assert_eq!(
                call(&p, post(Some("Bearer x"))).await.0,
                StatusCode::FORBIDDEN
            );
            assert_eq!(call(&p, post(None)).await.0, StatusCode::FORBIDDEN);
        }
        assert!(!drain.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn probes_follow_the_drain() {
        let drain =
            DrainController::configured(|b| b.propagation_delay(std::time::Duration::from_secs(1)));
        let p = Probes::new(drain.clone());
        let get = |path: &str| Request::get(path).body(()).unwrap();
        assert_eq!(
            call(&p, get("/healthz")).await,
            (StatusCode::OK, "ok".into())
        );
        assert_eq!(
            call(&p, get("/readyz")).await,
            (StatusCode::OK, "ready".into())
        );
        let (_, s) = call(&p, get("/status")).await;
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&s).unwrap(),
            serde_json::json!({"phase":"serving","draining":false,"active_streams":0,"reason":null})
        );
        drain.drain(DrainReason::Signal);
        assert_eq!(
            call(&p, get("/readyz")).await,
            (StatusCode::SERVICE_UNAVAILABLE, "draining".into())
        );
        assert_eq!(call(&p, get("/healthz")).await.0, StatusCode::OK);
        let (_, s) = call(&p, get("/status")).await;
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["phase"], "draining");
        assert_eq!(v["reason"], "signal");
        assert_eq!(call(&p, get("/nope")).await.0, StatusCode::NOT_FOUND);
        assert_eq!(
            call(&p, Request::post("/readyz").body(()).unwrap()).await.0,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
