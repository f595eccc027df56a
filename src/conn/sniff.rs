//! Tells HTTP/2 from HTTP/1 by the first bytes hyper reads, without reading anything itself.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection's protocol, as far as its first bytes tell.
#[derive(Debug)]
pub(super) struct Proto(AtomicU8, AtomicBool);

impl Default for Proto {
    fn default() -> Self {
        Self(AtomicU8::new(Self::UNKNOWN), AtomicBool::new(false))
    }
}

impl Proto {
    pub(super) const UNKNOWN: u8 = 0;
    pub(super) const H1: u8 = 1;
    pub(super) const H2: u8 = 2;

    pub(super) fn get(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, p: u8) {
        self.0.store(p, Ordering::Release);
    }

    /// Whether a request has arrived on the connection (set by `CloseOnDrain`).
    pub(super) fn saw_request(&self) -> bool {
        self.1.load(Ordering::Acquire)
    }

    pub(super) fn request(&self) {
        self.1.store(true, Ordering::Release);
    }
}

pin_project_lite::pin_project! {
    /// Passes every byte through; compares the first ones with the HTTP/2 preface.
    #[derive(Debug)]
    pub(super) struct Sniff<I> {
        #[pin]
        io: I,
        // Bytes of the preface matched so far; `DONE` once the protocol is known.
        matched: u8,
        proto: Arc<Proto>,
    }
}

const DONE: u8 = u8::MAX;

impl<I> Sniff<I> {
    pub(super) fn new(io: I, proto: Arc<Proto>) -> Self {
        Self {
            io,
            matched: 0,
            proto,
        }
    }
}

impl<I: AsyncRead> AsyncRead for Sniff<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        ready!(this.io.poll_read(cx, buf))?;
        if *this.matched != DONE {
            for &b in &buf.filled()[before..] {
                if b != PREFACE[usize::from(*this.matched)] {
                    this.proto.set(Proto::H1);
                    *this.matched = DONE;
                    break;
                }
                *this.matched += 1;
                if usize::from(*this.matched) == PREFACE.len() {
                    this.proto.set(Proto::H2);
                    *this.matched = DONE;
                    break;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite> AsyncWrite for Sniff<I> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    async fn sniff(chunks: &[&[u8]]) -> u8 {
        let mut b = tokio_test::io::Builder::new();
        for c in chunks {
            b.read(c);
        }
        let proto = Arc::new(Proto::default());
        let mut io = Sniff::new(b.build(), proto.clone());
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, chunks.concat(), "every byte passes through");
        proto.get()
    }

    #[tokio::test]
    async fn tells_the_protocol_from_the_first_bytes() {
        assert_eq!(sniff(&[PREFACE, b"\0\0\0\x04"]).await, Proto::H2);
        // The preface split over reads, as a slow client sends it.
        assert_eq!(
            sniff(&[b"PRI * HT", b"TP/2.0\r\n\r", b"\nSM\r\n\r\n"]).await,
            Proto::H2
        );
        assert_eq!(sniff(&[b"GET / HTTP/1.1\r\n\r\n"]).await, Proto::H1);
        // `P` as in `POST`/`PUT`: decided at the first byte that differs.
        assert_eq!(sniff(&[b"P", b"OST / HTTP/1.1\r\n\r\n"]).await, Proto::H1);
        assert_eq!(sniff(&[b"PRI * HTTP/1.1\r\n"]).await, Proto::H1);
        // Nothing (or only part of the preface) yet: unknown.
        assert_eq!(sniff(&[]).await, Proto::UNKNOWN);
        assert_eq!(sniff(&[b"PRI * HTTP/2.0"]).await, Proto::UNKNOWN);
    }
}
