//! [`DrainSocket`] for tokio-tungstenite's `WebSocketStream`.

use std::future::Future;
use std::pin::Pin;

use futures_core::Stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::DrainSocket;

impl<S> DrainSocket for WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    fn send_close(&mut self, code: u16, reason: &str) -> impl Future<Output = bool> + Send {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_owned().into(),
        };
        async move { self.close(Some(frame)).await.is_ok() }
    }

    async fn recv_close(&mut self) -> bool {
        loop {
            let next = std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await;
            match next {
                Some(Ok(Message::Close(_))) => return true,
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return false,
            }
        }
    }
}
