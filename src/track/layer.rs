use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::HeaderValue;
use tower_layer::Layer;

use super::call::{KeyFn, TrackCall};
use super::store::{ConnectionStore, MemoryStore, StoreFailure};
use super::stream::TrackHook;
use crate::controller::setters;
use crate::hook::{HookBody, HookService};
use crate::DrainWatch;

/// Tracks every request from `call` until its response body ends or is dropped, with an
/// optional per-key limit. Builds [`Track`].
///
/// See the [module docs](super) for an example.
#[must_use]
pub struct TrackLayer<St = MemoryStore> {
    pub(crate) watch: DrainWatch,
    pub(crate) store: St,
    pub(crate) limit: Option<u32>,
    pub(crate) key: Option<KeyFn>,
    pub(crate) retry_after: Duration,
    pub(crate) on_store_error: StoreFailure,
}

impl TrackLayer<MemoryStore> {
    /// Tracks requests in `watch`'s controller, with an in-memory store and no limit.
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::track::TrackLayer::new(drain.watch());
    /// # drop(layer);
    /// ```
    pub fn new(watch: DrainWatch) -> Self {
        Self::with_store(watch, MemoryStore::new())
    }
}

impl<St: ConnectionStore> TrackLayer<St> {
    /// Tracks requests with the given store for per-key limits. The store's
    /// [`shutdown`](ConnectionStore::shutdown) clean-up runs at the end of the controller's
    /// drain, once per store however many layers share it (see
    /// [`store_id`](ConnectionStore::store_id)), so building one layer per connection holds
    /// no state per connection.
    ///
    /// ```
    /// use tower_drain::track::{MemoryStore, TrackLayer};
    /// let drain = tower_drain::DrainController::new();
    /// let layer = TrackLayer::with_store(drain.watch(), MemoryStore::new()).max_per_key(3);
    /// # drop(layer);
    /// ```
    pub fn with_store(watch: DrainWatch, store: St) -> Self {
        // A `MemoryStore` keeps nothing outside the process: nothing to clean up.
        if std::any::TypeId::of::<St>() != std::any::TypeId::of::<MemoryStore>() {
            let s = store.clone();
            watch
                .shared
                .register_cleanup(store.store_id(), Box::new(move || s.shutdown()));
        }
        Self {
            watch,
            store,
            limit: None,
            key: None,
            retry_after: Duration::from_secs(1),
            on_store_error: StoreFailure::Open,
        }
    }
}

impl<St> TrackLayer<St> {
    /// Uses `store` for per-key limits (e.g. a `RedisStore`) instead of this layer's store;
    /// keeps the other settings. The store is registered for clean-up as by
    /// [`with_store`](TrackLayer::with_store).
    ///
    /// ```
    /// use tower_drain::track::{MemoryStore, TrackLayer};
    /// let drain = tower_drain::DrainController::new();
    /// let layer = TrackLayer::new(drain.watch()).max_per_key(3).store(MemoryStore::new());
    /// assert!(format!("{layer:?}").contains("limit: Some(3)"));
    /// ```
    pub fn store<St2: ConnectionStore>(self, store: St2) -> TrackLayer<St2> {
        TrackLayer {
            limit: self.limit,
            key: self.key,
            retry_after: self.retry_after,
            on_store_error: self.on_store_error,
            ..TrackLayer::with_store(self.watch, store)
        }
    }

    setters! {
        /// At most `n` concurrent streams per key (requests without a key are not limited).
        /// Over the limit: `429` + `retry-after`, and the inner service is not called.
        ///
        /// ```
        /// let drain = tower_drain::DrainController::new();
        /// let layer = tower_drain::track::TrackLayer::new(drain.watch()).max_per_key(3);
        /// assert!(format!("{layer:?}").contains("limit: Some(3)"));
        /// ```
        max_per_key(n: u32) => limit = Some(n);
    }

    /// How to find a request's key (for example a user id); `None` means "not limited".
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::track::TrackLayer::new(drain.watch())
    ///     .max_per_key(2)
    ///     .key_fn(|parts: &http::request::Parts| {
    ///         parts.headers.get("x-user").and_then(|v| v.to_str().ok()).map(String::from)
    ///     });
    /// # drop(layer);
    /// ```
    pub fn key_fn<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.key = Some(Arc::new(f));
        self
    }

    /// Shortcut for a key taken from a request header (non-UTF-8 or empty values count as no key).
    ///
    /// ```
    /// let drain = tower_drain::DrainController::new();
    /// let layer = tower_drain::track::TrackLayer::new(drain.watch())
    ///     .max_per_key(2)
    ///     .key_header(http::HeaderName::from_static("x-client-id"));
    /// # drop(layer);
    /// ```
    pub fn key_header(self, name: http::HeaderName) -> Self {
        self.key_fn(move |parts: &Parts| {
            parts
                .headers
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .filter(|s| !s.is_empty())
                .map(String::from)
        })
    }

    setters! {
        /// The `retry-after` of `429` answers (default 1 s; rounded up to whole seconds, at
        /// least 1).
        ///
        /// ```
        /// use std::time::Duration;
        /// let drain = tower_drain::DrainController::new();
        /// let layer = tower_drain::track::TrackLayer::new(drain.watch())
        ///     .max_per_key(1)
        ///     .retry_after(Duration::from_secs(5));
        /// assert!(format!("{layer:?}").contains("retry_after: 5s"));
        /// ```
        retry_after(d: Duration) => retry_after = d;

        /// What to do when the store fails (default [`StoreFailure::Open`]).
        ///
        /// ```
        /// use tower_drain::track::{StoreFailure, TrackLayer};
        /// let drain = tower_drain::DrainController::new();
        /// let layer = TrackLayer::new(drain.watch()).on_store_error(StoreFailure::Closed);
        /// assert!(format!("{layer:?}").contains("on_store_error: Closed"));
        /// ```
        on_store_error(f: StoreFailure) => on_store_error = f;
    }
}

impl<St: Clone> TrackLayer<St> {
    /// The call hook of this layer.
    pub(crate) fn call(&self) -> TrackCall<St> {
        let secs = self.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        TrackCall {
            shared: self.watch.shared.clone(),
            store: self.store.clone(),
            limit: self.limit,
            key: self.key.clone(),
            retry_after: HeaderValue::from(secs),
            pushback: Duration::from_secs(secs),
            on_store_error: self.on_store_error,
        }
    }
}

impl<S, St: Clone> Layer<S> for TrackLayer<St> {
    type Service = Track<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        HookService::new(inner, Arc::new(self.call()))
    }
}

/// The service built by [`TrackLayer`]: the inner service with the track layer's call hook.
/// It tracks every request until its response body ends or is dropped.
pub type Track<S, St = MemoryStore> = HookService<S, TrackCall<St>>;

/// The response body of [`Track`]: the inner body, its registration released when it ends
/// (or fails, or is dropped).
pub type TrackedBody<B> = HookBody<B, TrackHook>;

impl<St: Clone> Clone for TrackLayer<St> {
    fn clone(&self) -> Self {
        Self {
            watch: self.watch.clone(),
            store: self.store.clone(),
            limit: self.limit,
            key: self.key.clone(),
            retry_after: self.retry_after,
            on_store_error: self.on_store_error,
        }
    }
}

impl<St: fmt::Debug> fmt::Debug for TrackLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackLayer")
            .field("store", &self.store)
            .field("limit", &self.limit)
            .field("keyed", &self.key.is_some())
            .field("retry_after", &self.retry_after)
            .field("on_store_error", &self.on_store_error)
            .finish()
    }
}
