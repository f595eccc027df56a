//! A stream's "final frame already sent" flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// One stream's final-frame flag shared by two bodies (layers stacked by hand: the frame
/// layer's body inside a guard's), so a stream that is both expiring and being drained gets
/// exactly one final frame: whichever claims the gate first sends its frame, the other sends
/// none.
///
/// The frame layer's body leaves a clone in the response's extensions, where an outer
/// guard's picks it up. Hooks in one [`HookBody`](crate::hook::HookBody) share a flag kept in
/// the body instead; either way they reach it through a [`GateRef`].
#[derive(Clone, Debug, Default)]
pub(crate) struct FinalGate(Arc<AtomicBool>);

impl FinalGate {
    pub(crate) fn new() -> Self {
        Self::default()
    }
}

/// A stream's final-frame flag, wherever its owner keeps it (or none: the stream's final
/// frame is not shared with another hook).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GateRef<'a>(Option<&'a AtomicBool>);

impl<'a> GateRef<'a> {
    /// A flag kept by the caller.
    #[inline]
    pub(crate) fn local(flag: &'a AtomicBool) -> Self {
        Self(Some(flag))
    }

    /// The flag of `gate`.
    #[inline]
    pub(crate) fn of_gate(gate: &'a FinalGate) -> Self {
        Self(Some(&gate.0))
    }

    /// Claims the right to send the final frame: `true` for exactly one caller (always, with
    /// no flag to share).
    #[inline]
    pub(crate) fn claim(self) -> bool {
        self.0.is_none_or(|f| !f.swap(true, Ordering::AcqRel))
    }

    /// Whether a final frame has been claimed (never, with no flag).
    #[inline]
    pub(crate) fn is_claimed(self) -> bool {
        self.0.is_some_and(|f| f.load(Ordering::Acquire))
    }
}
