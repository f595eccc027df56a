use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The response body of [`Reject`](super::Reject): the inner service's body, unchanged,
    /// or the one final SSE frame of an [event-stream rejection](super::RejectLayer::sse_retry).
    ///
    /// For the inner body, `size_hint` and `is_end_stream` are the inner body's; for the frame,
    /// the size is exact.
    ///
    /// ```
    /// use http_body::Body;
    /// let body = tower_drain::reject::ResponseBody::new(http_body_util::Full::new(bytes::Bytes::from("hi")));
    /// assert_eq!(body.size_hint().exact(), Some(2));
    /// ```
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Frame { frame: Option<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    /// Wraps the inner service's body (or a [`RejectResponse`](super::RejectResponse)'s).
    pub fn new(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    /// A body made of one data frame.
    pub(crate) fn frame(frame: Bytes) -> Self {
        Self {
            kind: Kind::Frame { frame: Some(frame) },
        }
    }
}

impl<B: Default> Default for ResponseBody<B> {
    fn default() -> Self {
        Self::new(B::default())
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Data: From<Bytes>,
{
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Frame { frame } => {
                Poll::Ready(frame.take().map(|f| Ok(Frame::data(f.into()))))
            }
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Frame { frame } => frame.is_none(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Frame { frame } => {
                SizeHint::with_exact(frame.as_ref().map_or(0, |f| f.len() as u64))
            }
        }
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Inner { .. } => "inner",
            Kind::Frame { .. } => "frame",
        };
        f.debug_struct("ResponseBody")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Empty};

    use super::*;

    #[tokio::test]
    async fn frame_body_is_one_exact_frame_then_ends() {
        let mut body = ResponseBody::<Empty<Bytes>>::frame(Bytes::from_static(b"retry: 5\n\n"));
        assert!(!body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(10));
        let f = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(f, "retry: 5\n\n");
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn inner_body_passes_through() {
        let body = ResponseBody::new(http_body_util::Full::new(Bytes::from("abc")));
        assert_eq!(body.size_hint().exact(), Some(3));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abc");
        let empty = ResponseBody::<Empty<Bytes>>::default();
        assert!(empty.is_end_stream());
    }

    #[test]
    fn auto_traits() {
        fn assert<T: Send + Sync + Unpin>() {}
        assert::<ResponseBody<Empty<Bytes>>>();
    }
}
