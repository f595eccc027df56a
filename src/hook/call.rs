//! [`CallHook`] and [`CallState`]: one concern's steps before and after the inner call, and
//! how they compose.

use std::fmt;
use std::sync::Arc;
use std::task::Context;

use http::request::Parts;
use http::{Extensions, Response};
use http_body::Body;
use tokio::time::Instant;

use super::stream::StreamHook;
use crate::frame::{should_inject, unfix_length, Boundary, FinalGate, FrameConfig};

/// What a concern does with a request before the inner service sees it.
pub enum Before<S, W> {
    /// Call the inner service; `S` goes on to the response.
    Call(S),
    /// Answer at once, without calling the inner service. `Some`: the states of the hooks
    /// outside the one that answered (a pair's), which see the answer as a response.
    ///
    /// Boxed: answers are rare, and every call moves this value.
    Answer(Option<S>, Box<Response<()>>),
    /// Wait for `W` first (a per-key lease), then decide.
    Wait(W),
}

/// What a call hook decided.
pub(crate) type Decided<H> = Before<<H as CallHook>::State, <H as CallHook>::Wait>;

/// One concern's steps before the inner call. Its configuration, shared by every call.
pub trait CallHook: Send + Sync + 'static {
    /// What a call carries from [`before`](Self::before) to the response.
    type State: CallState;
    /// What a call that has to wait is waiting for.
    type Wait: Send + Unpin;

    /// The step before the inner call, with the request's parts.
    fn before(&self, parts: &mut Parts) -> Before<Self::State, Self::Wait>;

    /// Polls what [`Before::Wait`] waits for. `Before::Wait` again only while it is
    /// pending (this task's waker registered). Hooks that never wait have `Wait =
    /// Infallible` and keep this default, which is never called.
    fn poll_wait(&self, wait: Self::Wait, _: &mut Parts, _: &mut Context<'_>) -> Decided<Self> {
        Before::Wait(wait)
    }
}

/// One concern's state of one call, from its step before the inner call to the response.
pub trait CallState: Send + Unpin + Sized + 'static {
    /// The concern's per-stream logic for the response body.
    type Hook: StreamHook;

    /// When the inner call must have answered, if this concern bounds it.
    #[inline]
    fn deadline(&self) -> Option<Instant> {
        None
    }

    /// The [`deadline`](Self::deadline) passed (the inner future is dropped): the answer, and
    /// the state of the hooks outside the one whose deadline it was.
    fn timed_out(self) -> (Option<Self>, Response<()>) {
        (Some(self), Response::new(()))
    }

    /// The response (or an answer of an inner concern): what the concern's hook for its body
    /// is.
    fn after<B: Body>(self, res: &mut Response<B>, acx: &mut AfterCx) -> Self::Hook;

    /// The inner service failed (`Err`).
    #[inline]
    fn failed(self) {}
}

/// The hook of a response's body, for call hooks `C`.
pub(super) type HookOf<C> = <<C as CallHook>::State as CallState>::Hook;

/// What the concerns' `after` steps decide together for one body: whether it tracks event
/// boundaries, and where its final-frame gate lives.
#[derive(Debug, Default)]
pub struct AfterCx {
    boundary: Option<Boundary>,
    gate: Gate,
    /// The stream decision already taken for this response, with the (address of the) frame
    /// configuration it was taken for: the frame layer's hook and the guard's share one in a
    /// `DrainStack`, so the second asks nothing of the response again.
    decided: Option<(usize, bool)>,
}

#[derive(Debug, Default)]
enum Gate {
    #[default]
    None,
    /// A hook of this body may send a final frame, and shares it with hooks outside.
    Offered,
    /// Offered, and a hook outside in the same body shares it: the body keeps the flag.
    Joined,
    /// A flag shared with a body inside this one (hand-stacked layers).
    Shared(FinalGate),
}

impl AfterCx {
    /// Whether `res` is a stream that gets frames of `cfg`'s encoder (see
    /// [`should_inject`]); if so, its length is unfixed and the body tracks its boundaries.
    /// Decided once per response and configuration.
    #[inline]
    pub(crate) fn stream<B: Body>(
        &mut self,
        cfg: &Arc<FrameConfig>,
        res: &mut Response<B>,
    ) -> bool {
        let key = Arc::as_ptr(cfg) as usize;
        if let Some((k, stream)) = self.decided {
            if k == key {
                return stream;
            }
        }
        let stream = should_inject(res, &*cfg.encoder);
        if stream {
            unfix_length(res);
            self.boundary = Some(cfg.encoder.boundary());
        }
        self.decided = Some((key, stream));
        stream
    }

    /// A hook that sends a stream's final frame offers to share that right with hooks
    /// outside it.
    #[inline]
    pub(crate) fn offer_gate(&mut self) {
        self.gate = Gate::Offered;
    }

    /// A hook outside a final-frame sender joins its gate: one of this body's, or one an
    /// inner body left in the response's extensions.
    #[inline]
    pub(crate) fn join_gate(&mut self, ext: &mut Extensions) {
        self.gate = match std::mem::take(&mut self.gate) {
            Gate::Offered | Gate::Joined => Gate::Joined,
            other => match ext.remove::<FinalGate>() {
                Some(g) => Gate::Shared(g),
                None => other,
            },
        };
    }

    /// The body's boundary kind and gate. A gate offered and not joined inside this body is
    /// left in `ext` for a body outside it.
    pub(super) fn finish(self, ext: &mut Extensions) -> (Option<Boundary>, super::body::Gate) {
        use super::body::Gate as G;
        let gate = match self.gate {
            Gate::None => G::None,
            Gate::Joined => G::Local(Default::default()),
            Gate::Shared(g) => G::Shared(g),
            Gate::Offered => {
                let g = FinalGate::new();
                ext.insert(g.clone());
                G::Shared(g)
            }
        };
        (self.boundary, gate)
    }
}

/// A pair's wait: the outer hook's, or the inner one's once the outer one is decided.
pub enum PairWait<A: CallHook, Z: CallHook> {
    /// The outer hook waits.
    Outer(A::Wait),
    /// The inner hook waits, with the outer one's state.
    Inner(A::State, Z::Wait),
}

/// `(outer, inner)`: the outer hook's step first, as two layers nest.
impl<A: CallHook, Z: CallHook> CallHook for (A, Z) {
    type State = (A::State, Option<Z::State>);
    type Wait = PairWait<A, Z>;

    #[inline(always)]
    fn before(&self, parts: &mut Parts) -> Before<Self::State, Self::Wait> {
        match self.0.before(parts) {
            Before::Call(a) => match self.1.before(parts) {
                Before::Call(z) => Before::Call((a, Some(z))),
                Before::Answer(z, res) => Before::Answer(Some((a, z)), res),
                Before::Wait(w) => Before::Wait(PairWait::Inner(a, w)),
            },
            Before::Answer(a, res) => Before::Answer(a.map(|a| (a, None)), res),
            Before::Wait(w) => Before::Wait(PairWait::Outer(w)),
        }
    }

    fn poll_wait(
        &self,
        wait: Self::Wait,
        parts: &mut Parts,
        cx: &mut Context<'_>,
    ) -> Decided<Self> {
        match wait {
            PairWait::Outer(w) => match self.0.poll_wait(w, parts, cx) {
                Before::Call(a) => match self.1.before(parts) {
                    Before::Call(z) => Before::Call((a, Some(z))),
                    Before::Answer(z, res) => Before::Answer(Some((a, z)), res),
                    // Polled at once, so that it registers this task's waker.
                    Before::Wait(w) => self.poll_wait(PairWait::Inner(a, w), parts, cx),
                },
                Before::Answer(a, res) => Before::Answer(a.map(|a| (a, None)), res),
                Before::Wait(w) => Before::Wait(PairWait::Outer(w)),
            },
            PairWait::Inner(a, w) => match self.1.poll_wait(w, parts, cx) {
                Before::Call(z) => Before::Call((a, Some(z))),
                Before::Answer(z, res) => Before::Answer(Some((a, z)), res),
                Before::Wait(w) => Before::Wait(PairWait::Inner(a, w)),
            },
        }
    }
}

impl<A: CallState, Z: CallState> CallState for (A, Option<Z>) {
    type Hook = (A::Hook, Z::Hook);

    #[inline]
    fn deadline(&self) -> Option<Instant> {
        let inner = self.1.as_ref().and_then(|z| z.deadline());
        match (self.0.deadline(), inner) {
            (Some(a), Some(z)) => Some(a.min(z)),
            (a, z) => a.or(z),
        }
    }

    fn timed_out(self) -> (Option<Self>, Response<()>) {
        let (a, z) = self;
        let outer = a.deadline();
        match z {
            // The inner deadline is the earlier one (or the only one).
            Some(z) if z.deadline().is_some_and(|d| outer.is_none_or(|o| d <= o)) => {
                let (z, res) = z.timed_out();
                (Some((a, z)), res)
            }
            _ => {
                let (a, res) = a.timed_out();
                (a.map(|a| (a, None)), res)
            }
        }
    }

    #[inline(always)]
    fn after<B: Body>(self, res: &mut Response<B>, acx: &mut AfterCx) -> Self::Hook {
        // Inner first, as nested layers see the response.
        let z = match self.1 {
            Some(z) => z.after(res, acx),
            None => Default::default(),
        };
        (self.0.after(res, acx), z)
    }

    #[inline]
    fn failed(self) {
        if let Some(z) = self.1 {
            z.failed();
        }
        self.0.failed();
    }
}

impl<S, W> fmt::Debug for Before<S, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Before").finish_non_exhaustive()
    }
}

impl<A: CallHook, Z: CallHook> fmt::Debug for PairWait<A, Z> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PairWait").finish_non_exhaustive()
    }
}
