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

/// Builder setters that only record their argument. Each entry is a setter's doc comment
/// (with its example) and other attributes, its name and argument, and the assignments to
/// `self` it makes; the setter takes and returns the builder by value:
///
/// ```text
/// setters! {
///     /// How long … (default 5 s).
///     cooldown(d: Duration) => cooldown = d, breaker = true;
/// }
/// ```
///
/// is `pub fn cooldown(mut self, d: Duration) -> Self { self.cooldown = d; self.breaker = true; self }`.
/// Setters that check, convert with more than an expression, or are generic stay written out.
macro_rules! setters {
    ($(
        $(#[$attr:meta])*
        $name:ident($arg:ident: $ty:ty) => $($($field:ident).+ = $value:expr),+;
    )*) => {
        $(
            $(#[$attr])*
            pub fn $name(mut self, $arg: $ty) -> Self {
                $(self.$($field).+ = $value;)+
                self
            }
        )*
    };
}

pub(crate) use setters;
