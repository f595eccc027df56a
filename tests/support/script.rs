//! A response body that plays a script: one [`Step`] per poll, so a test decides where the
//! event boundaries fall, where a record is cut in two, when the body goes quiet (until the
//! test wakes it through its [`Remote`]), when it fails and how it ends.
//!
//! ```ignore
//! let script = Script::new([Step::Data("data: 1\n\n"), Step::Pending, Step::Data("data: 2\n\n")]);
//! let remote = script.remote();
//! // ... poll: "data: 1\n\n", then pending until `remote.wake()`, then "data: 2\n\n" ...
//! ```

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame};

/// One thing the body does when polled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A data frame with this text.
    Data(&'static str),
    /// `Poll::Pending` (the waker kept) until [`Remote::wake`]; then the next step.
    Pending,
    /// An error, `std::io::Error` with this message.
    Error(&'static str),
    /// A trailers frame with these fields.
    Trailers(&'static [(&'static str, &'static str)]),
    /// The end of the body; [`is_end_stream`](Body::is_end_stream) is `true` while it is next.
    End,
}

#[derive(Debug, Default)]
struct Parked {
    /// Wake-ups not yet used by a [`Step::Pending`].
    released: usize,
    waker: Option<Waker>,
}

/// Plays its steps in order; once they are over it stays pending (a quiet stream). `Default`
/// is the empty script.
#[derive(Debug, Default)]
pub struct Script {
    steps: VecDeque<Step>,
    parked: Arc<Mutex<Parked>>,
}

/// Wakes a [`Script`] waiting at a [`Step::Pending`]; cloneable, usable after the body moved
/// into a response.
#[derive(Clone, Debug)]
pub struct Remote(Arc<Mutex<Parked>>);

impl Script {
    pub fn new(steps: impl IntoIterator<Item = Step>) -> Self {
        Self {
            steps: steps.into_iter().collect(),
            parked: Arc::default(),
        }
    }

    /// The handle that ends this body's [`Step::Pending`] steps.
    pub fn remote(&self) -> Remote {
        Remote(self.parked.clone())
    }

    /// Steps not played yet.
    pub fn remaining(&self) -> usize {
        self.steps.len()
    }
}

impl Remote {
    /// Lets the body past its current (or next) [`Step::Pending`] and wakes its task.
    pub fn wake(&self) {
        let waker = {
            let mut p = self.0.lock().unwrap();
            p.released += 1;
            p.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Body for Script {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        loop {
            let Some(step) = self.steps.front().copied() else {
                // The script is over: quiet for ever.
                self.parked.lock().unwrap().waker = Some(cx.waker().clone());
                return Poll::Pending;
            };
            if step == Step::Pending {
                let mut p = self.parked.lock().unwrap();
                if p.released == 0 {
                    p.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                p.released -= 1;
                drop(p);
                self.steps.pop_front();
                continue;
            }
            self.steps.pop_front();
            return Poll::Ready(match step {
                Step::Data(s) => Some(Ok(Frame::data(Bytes::from_static(s.as_bytes())))),
                Step::Error(msg) => Some(Err(std::io::Error::other(msg))),
                Step::Trailers(fields) => {
                    let mut t = HeaderMap::new();
                    for (k, v) in fields {
                        t.append(HeaderName::from_static(k), HeaderValue::from_static(v));
                    }
                    Some(Ok(Frame::trailers(t)))
                }
                Step::End => None,
                Step::Pending => unreachable!(),
            });
        }
    }

    fn is_end_stream(&self) -> bool {
        self.steps.front() == Some(&Step::End)
    }
}
