/// `get_ref` / `get_mut` / `into_inner` for a service wrapper with an `inner` field.
macro_rules! inner_service_accessors {
    ($ty:ident < S $(, $p:ident)* >) => {
        impl<S $(, $p)*> $ty<S $(, $p)*> {
            /// The inner service.
            pub fn get_ref(&self) -> &S {
                &self.inner
            }

            /// The inner service, mutably.
            pub fn get_mut(&mut self) -> &mut S {
                &mut self.inner
            }

            /// Consumes `self`, returning the inner service.
            pub fn into_inner(self) -> S {
                self.inner
            }
        }
    };
}

pub(crate) use inner_service_accessors;

/// A `Debug` that names the type and shows nothing of its (internal) state.
macro_rules! opaque_debug {
    ($($ty:ident $(<$($p:ident),*>)?),* $(,)?) => {$(
        impl$(<$($p),*>)? std::fmt::Debug for $ty$(<$($p),*>)? {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($ty)).finish_non_exhaustive()
            }
        }
    )*};
}

pub(crate) use opaque_debug;
