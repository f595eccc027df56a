//! How the layers are built: one implementation per concern, composed by the compiler.
//!
//! Each concern (tracking, guarding, final frames) is written once, as two small state
//! machines:
//!
//! - a **call hook** (`CallHook`): its step before the inner call (register the stream,
//!   ask the circuit breaker, note a `HEAD`), which may answer at once (`429`, `503`) or
//!   wait for something (a per-key lease in Redis), and its step after the call
//!   (`CallState::after`), which decides what the response's body needs from it: nothing,
//!   or a **stream hook**;
//! - a **stream hook** (`StreamHook`): its logic for one response body. It sees every frame
//!   on its way out, may add whole frames of its own at event boundaries (final frames,
//!   heartbeats), may end the body, and reports whether it ended it in the middle of a
//!   record.
//!
//! [`HookService`] and [`HookBody`] run any hooks: one hook for a layer used alone (`Guard<S>`
//! is `HookService<S, GuardCall>`), a tuple of hooks for [`DrainStack`](crate::DrainStack),
//! which the compiler turns into one service and one body with the concerns' steps in
//! order:
//!
//! ```text
//!                    DrainStack = RejectLayer → HookService<(Track, (Guard, Frame))>
//!
//! request ──► Reject ──► Track.before ──► Guard.before ──► Frame.before ──► your service
//!            (503 while  (register;       (breaker;        (HEAD gets
//!             closing)    lease per key)   timeout)         no frame)
//!
//! response ◄───────────── Track.after ◄── Guard.after ◄─── Frame.after ◄── response
//!                          HookBody<B, (TrackHook, (GuardHook, FrameHook))>:
//!
//! frame out ◄── TrackHook ◄── GuardHook ◄──────── FrameHook ◄────── tracker ◄── inner body
//!               (count,       (timeouts,           (final frame           (one per body:
//!                release      heartbeats,          at Closing, spread)     event
//!                at the end)  error frames)                                boundaries)
//! ```
//!
//! The body keeps one event-boundary tracker, fed by the inner body's data; hooks ask it
//! whether a frame of theirs may go out now (`StreamCx::at_boundary`). It also keeps the
//! stream's final-frame flag, so that of two hooks that may end the stream (the guard's
//! lifetime limit and the frame layer's drain), exactly one sends its frame. When layers are
//! stacked by hand, one body per layer, the flag is shared through the response's
//! extensions instead.
//!
//! A stream that nothing is about to happen to costs each hook its fast path only (`#[inline]`:
//! the frame hook's one phase check, the guard's nothing without limits, the track hook's
//! counts), and the compiler fuses them into one loop over the inner body: there is no
//! hand-written fused copy of the layers.
//!
//! # Adding a concern
//!
//! A fifth concern is a folder with a layer, a call hook and, if it acts on bodies, a stream
//! hook: implement `CallHook` (its `before`, and `poll_wait` if it waits), its
//! `CallState` (`after` returns the stream hook, `deadline`/`timed_out` if it bounds the
//! call), and `StreamHook` (start from the frame hook's fast path). Its layer builds
//! `HookService<S, YourCall>`; to have it in [`DrainStack`](crate::DrainStack), add it to the
//! stack's tuple where it belongs in the order. A limit inside an existing concern (a new
//! guard timer, say) touches that concern's folder only.

mod body;
mod call;
mod future;
mod service;
mod stream;

pub use self::body::HookBody;
pub(crate) use self::call::{AfterCx, Before, CallHook, CallState, Decided};
pub use self::future::ResponseFuture;
pub use self::service::HookService;
pub(crate) use self::stream::{take_once, Next, Polled, StreamCx, StreamHook};
