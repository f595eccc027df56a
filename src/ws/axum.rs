//! [`DrainSocket`] for axum's `WebSocket`, and `WsHandle` as an axum extractor.

use std::convert::Infallible;
use std::future::Future;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use http::request::Parts;
use http::StatusCode;

use super::{DrainSocket, WsHandle};

impl DrainSocket for WebSocket {
    fn send_close(&mut self, code: u16, reason: &str) -> impl Future<Output = bool> + Send {
        let frame = CloseFrame {
            code,
            reason: reason.to_owned().into(),
        };
        async move { self.send(Message::Close(Some(frame))).await.is_ok() }
    }

    async fn recv_close(&mut self) -> bool {
        loop {
            match self.recv().await {
                Some(Ok(Message::Close(_))) => return true,
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return false,
            }
        }
    }
}

/// Takes the request's [`WsHandle`]; `500` when there is none (no track layer in front of
/// the route, or the request is not an upgrade). Use `Option<WsHandle>` to serve without one.
impl<S: Send + Sync> FromRequestParts<S> for WsHandle {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        WsHandle::take(&mut parts.extensions).ok_or((
            StatusCode::INTERNAL_SERVER_ERROR,
            "no tower-drain tracking for this WebSocket request",
        ))
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for WsHandle {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(WsHandle::take(&mut parts.extensions))
    }
}
