//! The storage contract of the lease engine, and its backends.
//!
//! A [`Storage`] owns pools, proxies, consumers and leases. Its one hard promise is that
//! [`Storage::acquire`] finds and leases a proxy in a single atomic step: two callers never
//! both get the last slot of a proxy, and losing such a race is a miss (`lease: None`), never
//! an error. Release is idempotent. The trait is async so that a database backend fits; the
//! in-memory backend ([`InMemoryStorage`]) completes every call without waiting.

mod any;
mod index;
mod lock;
mod memory;
mod names;
mod pool;
pub mod postgres;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use crate::filter::{Filter, FilterError};
use crate::model::{
    Consumer, HealthCheck, Lease, LeaseId, Pool, PoolStats, Proxy, ProxyId, ProxyInfo, ProxyStatus,
};
use crate::selector::Selector;

pub use any::AnyStorage;
pub use memory::InMemoryStorage;
pub(crate) use memory::validate_proxy;
pub use postgres::PostgresStorage;

/// Default lease duration when a request does not set one: 300 s.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(300);

/// Errors of the lease engine. A pool without a free proxy is not an error.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The pool does not exist (or is being removed).
    #[error("unknown pool `{0}`")]
    UnknownPool(String),
    /// The proxy does not exist.
    #[error("unknown proxy `{0}`")]
    UnknownProxy(ProxyId),
    /// A lease duration of zero, or one so long that its expiry is not representable.
    #[error("lease duration must be positive and at most {} s", MAX_LEASE_DURATION.as_secs())]
    InvalidDuration,
    /// The request uses something this backend cannot do (a predicate filter on a database
    /// backend).
    #[error("not supported by this storage backend: {0}")]
    Unsupported(&'static str),
    /// The filter is malformed.
    #[error("invalid filter: {0}")]
    InvalidFilter(#[from] FilterError),
    /// An inventory record was rejected.
    #[error("invalid proxy `{id}`: {reason}")]
    InvalidProxy {
        /// The proxy's id.
        id: ProxyId,
        /// What is wrong.
        reason: String,
    },
    /// The retry policy is malformed.
    #[error("invalid retry policy: {0}")]
    InvalidRetry(String),
    /// A backend failure (database down, slow, or refusing): nothing was changed that the
    /// caller can rely on.
    #[error("storage backend: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Longest lease (and renewal) a request may ask for: 30 days. Longer ones are refused with
/// [`LeaseError::InvalidDuration`] before anything changes.
pub const MAX_LEASE_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Checks a lease duration and returns `now + d`.
pub fn expiry(now: SystemTime, d: Duration) -> Result<SystemTime, LeaseError> {
    if d.is_zero() || d > MAX_LEASE_DURATION {
        return Err(LeaseError::InvalidDuration);
    }
    now.checked_add(d).ok_or(LeaseError::InvalidDuration)
}

/// What to lease: pool, consumer, duration, selector and filter.
#[derive(Clone, Debug)]
pub struct AcquireRequest {
    /// Pool to lease from.
    pub pool: Arc<str>,
    /// Consumer name; `None` means [`crate::DEFAULT_CONSUMER_NAME`].
    pub consumer: Option<Arc<str>>,
    /// How long the lease lives unless renewed. Default: 300 s.
    pub duration: Duration,
    /// Which eligible proxy to prefer. Default: `first_available`.
    pub selector: Selector,
    /// Which proxies are eligible at all. Default: all.
    pub filter: Option<Arc<Filter>>,
    /// Proxies never to lease (failover: the ones that already failed this request).
    pub exclude: Vec<ProxyId>,
    /// When set, only these proxies may be leased (probes, a lease on one given proxy).
    pub only: Option<Vec<ProxyId>>,
}

impl AcquireRequest {
    /// A request for `pool` with the defaults.
    pub fn new(pool: impl Into<Arc<str>>) -> Self {
        Self {
            pool: pool.into(),
            consumer: None,
            duration: DEFAULT_LEASE_DURATION,
            selector: Selector::default(),
            filter: None,
            exclude: Vec::new(),
            only: None,
        }
    }

    /// Sets the consumer.
    pub fn consumer(mut self, name: impl Into<Arc<str>>) -> Self {
        self.consumer = Some(name.into());
        self
    }

    /// Sets the lease duration.
    pub fn duration(mut self, d: Duration) -> Self {
        self.duration = d;
        self
    }

    /// Sets the selector.
    pub fn selector(mut self, s: Selector) -> Self {
        self.selector = s;
        self
    }

    /// Sets the filter.
    pub fn filter(mut self, f: Filter) -> Self {
        self.filter = Some(Arc::new(f));
        self
    }

    /// Never leases these proxies.
    pub fn exclude(mut self, ids: impl IntoIterator<Item = ProxyId>) -> Self {
        self.exclude = ids.into_iter().collect();
        self
    }

    /// Leases only among these proxies.
    pub fn only(mut self, ids: impl IntoIterator<Item = ProxyId>) -> Self {
        self.only = Some(ids.into_iter().collect());
        self
    }

    /// True when `id` may be leased as far as `exclude` and `only` go.
    pub fn allows(&self, id: &ProxyId) -> bool {
        !self.exclude.contains(id) && self.only.as_ref().is_none_or(|only| only.contains(id))
    }
}

/// Result of [`Storage::acquire`].
#[derive(Debug)]
pub struct Acquired {
    /// The lease, or `None` when no eligible proxy had a free slot.
    pub lease: Option<Lease>,
    /// The pool's figures right after the attempt.
    pub stats: PoolStats,
    /// Leases that expired and were released by the cleanup that ran before the attempt.
    pub expired: Vec<Released>,
}

/// A lease that was live and is now released (by its holder or by expiry).
#[derive(Debug, Clone)]
pub struct Released {
    /// The lease, with status `released` or `expired`.
    pub lease: Lease,
    /// When it was released.
    pub released_at: SystemTime,
    /// The pool's figures right after.
    pub stats: PoolStats,
}

/// One lease to renew: its id, its pool, and how long it should live from now.
#[derive(Debug, Clone)]
pub struct Renewal {
    /// The lease.
    pub id: LeaseId,
    /// Its pool.
    pub pool: Arc<str>,
    /// The new lifetime, from now.
    pub duration: Duration,
}

/// Wakes acquirers waiting for capacity in one pool.
#[derive(Debug, Default)]
pub struct CapacitySignal {
    notify: Arc<Notify>,
    waiters: AtomicUsize,
}

impl CapacitySignal {
    /// Tells every waiter that capacity may have been freed.
    pub fn notify(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// Registers interest. Check for capacity only *after* this, then await the returned
    /// future: a release in between is not lost.
    pub fn subscribe(self: &Arc<Self>) -> CapacityWait {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut notified = Box::pin(self.notify.clone().notified_owned());
        notified.as_mut().enable();
        CapacityWait {
            signal: self.clone(),
            notified,
        }
    }
}

/// A registered wait for capacity (see [`CapacitySignal::subscribe`]).
pub struct CapacityWait {
    signal: Arc<CapacitySignal>,
    notified: std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>,
}

impl CapacityWait {
    /// Resolves when capacity may have been freed since the subscription.
    pub async fn wait(&mut self) {
        self.notified.as_mut().await;
    }
}

impl Drop for CapacityWait {
    fn drop(&mut self) {
        self.signal.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The storage contract. All methods are async so that a database backend fits.
pub trait Storage: Send + Sync + 'static {
    /// Cleans up expired leases of the pool, then finds an eligible proxy and leases it, in
    /// one atomic step. `now` is the caller's clock; a backend with a clock of its own (a
    /// database) judges time by that one instead. The duration is checked
    /// ([`expiry`]) before anything changes.
    fn acquire(
        &self,
        req: &AcquireRequest,
        now: SystemTime,
    ) -> impl Future<Output = Result<Acquired, LeaseError>> + Send;

    /// Releases a live lease. Idempotent: `None` when the lease was not live (already
    /// released, expired, unknown), and nothing changes.
    fn release(
        &self,
        lease: &Lease,
        now: SystemTime,
    ) -> impl Future<Output = Result<Option<Released>, LeaseError>> + Send;

    /// Releases a live lease known only by id (operators). `None` if it is not live.
    fn release_by_id(
        &self,
        id: LeaseId,
        now: SystemTime,
    ) -> impl Future<Output = Result<Option<Released>, LeaseError>> + Send;

    /// Extends live leases, each to its duration from now, in one batch. Returns the leases
    /// that were renewed with their new expiry; an id missing from the answer is not live any
    /// more (expired, released by an operator): its holder has lost it.
    fn renew(
        &self,
        renewals: &[Renewal],
        now: SystemTime,
    ) -> impl Future<Output = Result<Vec<(LeaseId, SystemTime)>, LeaseError>> + Send;

    /// Releases every lease with `expires_at <= now`, in every pool.
    fn cleanup_expired(
        &self,
        now: SystemTime,
    ) -> impl Future<Output = Result<Vec<Released>, LeaseError>> + Send;

    /// A pool's figures, `None` for an unknown pool (a removed pool reports its draining
    /// leases until the last one is released).
    fn pool_stats(
        &self,
        pool: &str,
    ) -> impl Future<Output = Result<Option<PoolStats>, LeaseError>> + Send;

    /// Every pool with its figures, sorted by name.
    fn list_pools(&self)
    -> impl Future<Output = Result<Vec<(Pool, PoolStats)>, LeaseError>> + Send;

    /// Creates a pool, or updates its description. A pool being removed comes back.
    fn upsert_pool(&self, pool: Pool) -> impl Future<Output = Result<(), LeaseError>> + Send;

    /// Removes a pool: its proxies drain and it disappears with its last lease. Returns
    /// false for an unknown pool.
    fn remove_pool(&self, name: &str) -> impl Future<Output = Result<bool, LeaseError>> + Send;

    /// Inserts or updates a proxy (its pool must exist). Updating never touches the live
    /// lease count; a draining proxy comes back into rotation.
    fn upsert_proxy(&self, proxy: Proxy) -> impl Future<Output = Result<(), LeaseError>> + Send;

    /// Inserts or updates many proxies (each as [`Storage::upsert_proxy`]); a backend may do
    /// it in fewer round trips. Stops at the first error.
    fn upsert_proxies(
        &self,
        proxies: Vec<Proxy>,
    ) -> impl Future<Output = Result<(), LeaseError>> + Send {
        async move {
            for p in proxies {
                self.upsert_proxy(p).await?;
            }
            Ok(())
        }
    }

    /// Removes a proxy: no new leases; live ones release normally. False if unknown.
    fn remove_proxy(&self, id: &ProxyId) -> impl Future<Output = Result<bool, LeaseError>> + Send;

    /// Applies a status change or a health-check result; returns the previous status.
    fn apply_health(
        &self,
        id: &ProxyId,
        check: HealthCheck,
    ) -> impl Future<Output = Result<ProxyStatus, LeaseError>> + Send;

    /// Takes an `active` (or `slow`) proxy out of rotation until `until` (passive health): it
    /// is `inactive` meanwhile and `active` again from then on, judged by the storage's clock.
    /// False, and nothing changes, if the proxy is not active or slow (banned, inactive,
    /// unknown).
    fn rest(
        &self,
        id: &ProxyId,
        until: SystemTime,
    ) -> impl Future<Output = Result<bool, LeaseError>> + Send;

    /// Sets a proxy's status; returns the previous one.
    fn set_proxy_status(
        &self,
        id: &ProxyId,
        status: ProxyStatus,
    ) -> impl Future<Output = Result<ProxyStatus, LeaseError>> + Send {
        self.apply_health(id, HealthCheck::status(status))
    }

    /// A proxy with its live figures.
    fn get_proxy(
        &self,
        id: &ProxyId,
    ) -> impl Future<Output = Result<Option<ProxyInfo>, LeaseError>> + Send;

    /// A pool's proxies in inventory order (draining ones included).
    fn list_proxies(
        &self,
        pool: &str,
    ) -> impl Future<Output = Result<Vec<ProxyInfo>, LeaseError>> + Send;

    /// A live lease by id.
    fn get_lease(
        &self,
        id: LeaseId,
    ) -> impl Future<Output = Result<Option<Lease>, LeaseError>> + Send;

    /// Live leases, of one pool or of all.
    fn list_leases(
        &self,
        pool: Option<&str>,
    ) -> impl Future<Output = Result<Vec<Lease>, LeaseError>> + Send;

    /// Returns the consumer with this name, creating it if needed (idempotent).
    fn ensure_consumer(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Consumer, LeaseError>> + Send;

    /// The signal fired when capacity may have been freed in `pool`, if the backend has one.
    fn capacity_signal(&self, pool: &str) -> Option<Arc<CapacitySignal>> {
        let _ = pool;
        None
    }
}
