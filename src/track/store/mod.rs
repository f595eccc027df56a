//! Where per-key stream counts live: [`MemoryStore`] (this process) or `RedisStore` (every
//! process sharing one Redis, feature `redis`).

mod memory;
#[cfg(feature = "redis")]
mod redis;

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

pub use self::memory::MemoryStore;
#[cfg(feature = "redis")]
pub use self::redis::{AcquireFuture, RedisStore, RedisStoreBuilder};

use crate::controller::{CleanupSummary, ConfigError};
use crate::BoxError;

/// A place that counts open streams per key and admits a new one only under a limit.
///
/// `acquire` is called once per limited request, from the response future (never from
/// `poll_ready` or synchronously in `call`). A granted [`Lease`] holds one slot until it is
/// dropped, which happens on every path a stream can end by. `Drop` cannot await, so a store
/// whose release needs I/O hands it to a background task.
///
/// # Example
///
/// A store that admits everything (for illustration):
///
/// ```
/// use std::future::{ready, Ready};
/// use tower_drain::track::{ConnectionStore, Lease, StoreError};
///
/// #[derive(Clone, Debug)]
/// struct Unlimited;
///
/// impl ConnectionStore for Unlimited {
///     type Future = Ready<Result<Option<Lease>, StoreError>>;
///     fn acquire(&self, _key: &str, _limit: u32) -> Self::Future {
///         ready(Ok(Some(Lease::new(()))))
///     }
/// }
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// assert!(Unlimited.acquire("alice", 1).await.unwrap().is_some());
/// # }
/// ```
pub trait ConnectionStore: Clone + Send + Sync + 'static {
    /// The future returned by [`acquire`](Self::acquire).
    type Future: Future<Output = Result<Option<Lease>, StoreError>> + Send + 'static;

    /// Takes a slot for `key` if fewer than `limit` are held: `Ok(Some(lease))` when granted,
    /// `Ok(None)` when the key is at its limit.
    fn acquire(&self, key: &str, limit: u32) -> Self::Future;

    /// Releases everything this process still holds, at the end of a drain. The controller
    /// awaits it (bounded by its clean-up timeout) before reaching `Stopped`, and puts the
    /// summary into the [`ShutdownReport`](crate::ShutdownReport). Stores that keep nothing
    /// outside the process return `None` (the default).
    fn shutdown(&self) -> Pin<Box<dyn Future<Output = Option<CleanupSummary>> + Send>> {
        Box::pin(std::future::ready(None))
    }

    /// Identifies the state this handle shares with its clones (for example the address of
    /// its inner `Arc`), so that a controller runs one [`shutdown`](Self::shutdown) per store
    /// however many layers are built with clones of it (one stack per connection, say).
    ///
    /// The default, `None`, makes each [`TrackLayer`](crate::track::TrackLayer) built with the
    /// store register a clean-up of its own, kept until the drain (a warning is logged once
    /// many pile up). Stores that clean up at shutdown should return `Some`.
    ///
    /// ```
    /// use std::sync::Arc;
    /// # use std::future::{ready, Ready};
    /// # use tower_drain::track::{ConnectionStore, Lease, StoreError};
    /// #[derive(Clone, Debug, Default)]
    /// struct MyStore(Arc<()>);
    /// impl ConnectionStore for MyStore {
    /// #   type Future = Ready<Result<Option<Lease>, StoreError>>;
    /// #   fn acquire(&self, _key: &str, _limit: u32) -> Self::Future { ready(Ok(None)) }
    ///     // ...
    ///     fn store_id(&self) -> Option<usize> {
    ///         Some(Arc::as_ptr(&self.0) as usize)
    ///     }
    /// }
    /// let a = MyStore::default();
    /// assert_eq!(a.store_id(), a.clone().store_id());
    /// ```
    fn store_id(&self) -> Option<usize> {
        None
    }
}

/// One slot held in a [`ConnectionStore`]; dropping it releases the slot.
///
/// ```
/// let lease = tower_drain::track::Lease::new("anything that releases the slot on drop");
/// drop(lease);
/// ```
pub struct Lease {
    inner: LeaseInner,
}

#[allow(dead_code)]
pub(crate) enum LeaseInner {
    Memory(memory::MemoryLease),
    #[cfg(feature = "redis")]
    Redis(redis::RedisLease),
    Custom(Box<dyn Any + Send + Sync>),
}

impl Lease {
    /// A lease for a custom store: `releaser` is dropped when the stream ends, so put the
    /// release in its `Drop`.
    pub fn new<T: Send + Sync + 'static>(releaser: T) -> Self {
        Self {
            inner: LeaseInner::Custom(Box::new(releaser)),
        }
    }

    pub(crate) fn from_inner(inner: LeaseInner) -> Self {
        Self { inner }
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.inner {
            LeaseInner::Memory(_) => "memory",
            #[cfg(feature = "redis")]
            LeaseInner::Redis(_) => "redis",
            LeaseInner::Custom(_) => "custom",
        };
        f.debug_struct("Lease").field("store", &kind).finish()
    }
}

/// A connection store could not answer, or could not be built: for an invalid setting,
/// [`config`](Self::config) names it.
///
/// ```
/// let e = tower_drain::track::StoreError::new("redis unreachable");
/// assert_eq!(e.to_string(), "connection store error: redis unreachable");
/// assert!(e.config().is_none());
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct StoreError {
    message: String,
    source: Option<BoxError>,
    config: Option<ConfigError>,
}

impl StoreError {
    /// An error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
            config: None,
        }
    }

    /// An error with a message and the underlying cause.
    ///
    /// ```
    /// use std::error::Error;
    /// let io = std::io::Error::other("refused");
    /// let e = tower_drain::track::StoreError::with_source("acquire failed", io);
    /// assert!(e.source().is_some());
    /// ```
    pub fn with_source(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self {
            message: message.into(),
            source: Some(source.into()),
            config: None,
        }
    }

    /// The invalid setting this error reports, when a store's builder rejected one (for
    /// example `RedisStoreBuilder::build`); `None` for other failures.
    ///
    /// ```
    /// # #[cfg(feature = "redis")] {
    /// // Settings are checked before anything else (no runtime or Redis needed).
    /// let err = tower_drain::track::RedisStore::builder("redis://127.0.0.1/")
    ///     .lease_ttl(std::time::Duration::from_millis(1))
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(err.config().unwrap().setting(), "lease_ttl");
    /// # }
    /// ```
    pub fn config(&self) -> Option<&ConfigError> {
        self.config.as_ref()
    }
}

/// The error of an invalid setting; its message is the setting's.
///
/// ```
/// # #[cfg(feature = "redis")] {
/// let err = tower_drain::track::RedisStore::builder("redis://127.0.0.1/")
///     .release_batch(0)
///     .build()
///     .unwrap_err();
/// assert_eq!(err.config().unwrap().setting(), "release_batch");
/// assert_eq!(
///     err.to_string(),
///     "connection store error: invalid release_batch: must be greater than zero"
/// );
/// # }
/// ```
impl From<ConfigError> for StoreError {
    fn from(config: ConfigError) -> Self {
        Self {
            message: config.to_string(),
            source: None,
            config: Some(config),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connection store error: {}", self.message)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

/// What to do with a request when the store fails.
///
/// ```
/// assert_eq!(tower_drain::track::StoreFailure::default(), tower_drain::track::StoreFailure::Open);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreFailure {
    /// Serve it without a limit (and count `tower_drain_store_errors_total`).
    #[default]
    Open,
    /// Answer `503` with `retry-after`.
    Closed,
}
