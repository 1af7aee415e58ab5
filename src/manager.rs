//! [`ProxyManager`]: the lease engine's front door.
//!
//! It wraps a [`Storage`], stamps times from its [`Clock`], runs the retry loop with its
//! [`Sleeper`] (waking early when the pool frees capacity), fires callbacks, and hands out
//! [`LeaseGuard`]s that release on drop. It holds no lease state of its own.

use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::task::AbortHandle;

use crate::events::{AcquireEvent, Callbacks, ReleaseEvent};
use crate::model::{Lease, LeaseId, default_consumer};
use crate::retry::{Clock, RetryPolicy, Sleeper, TokioClock, TokioSleeper};
use crate::storage::{AcquireRequest, InMemoryStorage, LeaseError, Released, Renewal, Storage};

/// The lease engine. Cheap to clone: clones share storage, clock and callbacks.
pub struct ProxyManager<S: Storage = InMemoryStorage> {
    inner: Arc<Inner<S>>,
}

struct Inner<S> {
    storage: S,
    clock: Arc<dyn Clock>,
    sleeper: Arc<dyn Sleeper>,
    callbacks: Callbacks,
    /// Releases that guards dropped but that did not finish at once (a database backend),
    /// still running: [`ProxyManager::flush`] waits for them.
    releases: tokio_util::task::TaskTracker,
}

impl<S: Storage> Clone for ProxyManager<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S: Storage> std::fmt::Debug for ProxyManager<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyManager").finish_non_exhaustive()
    }
}

impl<S: Storage> ProxyManager<S> {
    /// A manager over `storage` with tokio's clock and sleep.
    pub fn new(storage: S) -> Self {
        Self::with_time(storage, Arc::new(TokioClock), Arc::new(TokioSleeper))
    }

    /// A manager with an injected clock and sleeper (tests).
    pub fn with_time(storage: S, clock: Arc<dyn Clock>, sleeper: Arc<dyn Sleeper>) -> Self {
        Self {
            inner: Arc::new(Inner {
                storage,
                clock,
                sleeper,
                callbacks: Callbacks::default(),
                releases: tokio_util::task::TaskTracker::new(),
            }),
        }
    }

    /// The storage, for inventory and inspection.
    pub fn storage(&self) -> &S {
        &self.inner.storage
    }

    /// Registers a callback for every acquire attempt (hits and misses).
    pub fn on_acquire(&self, f: impl Fn(&AcquireEvent) + Send + Sync + 'static) {
        self.inner.callbacks.add_acquire(Arc::new(f));
    }

    /// Registers a callback for every release (by holder, operator or expiry).
    pub fn on_release(&self, f: impl Fn(&ReleaseEvent) + Send + Sync + 'static) {
        self.inner.callbacks.add_release(Arc::new(f));
    }

    /// One attempt: a lease, or `None` when no eligible proxy has a free slot.
    pub async fn acquire_proxy(&self, req: &AcquireRequest) -> Result<Option<Lease>, LeaseError> {
        if let Some(f) = &req.filter {
            f.validate()?;
        }
        self.attempt(req).await
    }

    async fn attempt(&self, req: &AcquireRequest) -> Result<Option<Lease>, LeaseError> {
        let started_at = self.inner.clock.now();
        let acquired = self.inner.storage.acquire(req, started_at).await?;
        self.fire_released(&acquired.expired);
        let callbacks = &self.inner.callbacks;
        if callbacks.has_acquire() {
            let completed_at = self.inner.clock.now();
            callbacks.fire_acquire(&AcquireEvent {
                lease: acquired.lease.clone(),
                pool_name: req.pool.clone(),
                consumer_name: req.consumer.clone().unwrap_or_else(default_consumer),
                filter: req.filter.clone(),
                selector: req.selector,
                started_at,
                completed_at,
                duration: completed_at.duration_since(started_at).unwrap_or_default(),
                pool_stats: acquired.stats,
            });
        }
        Ok(acquired.lease)
    }

    /// Attempts up to `policy.max_attempts` times, sleeping the policy's schedule between
    /// misses. While it sleeps, a release in the pool wakes it for an extra attempt that
    /// does not count against the schedule.
    pub async fn acquire_proxy_with_retry(
        &self,
        req: &AcquireRequest,
        policy: &RetryPolicy,
    ) -> Result<Option<Lease>, LeaseError> {
        policy.validate()?;
        if let Some(f) = &req.filter {
            f.validate()?;
        }
        let signal = self.inner.storage.capacity_signal(&req.pool);
        for attempt in 1..=policy.max_attempts {
            let last = attempt == policy.max_attempts;
            // Subscribe before trying, so a release right after the miss is not lost.
            let mut wait = signal.as_ref().filter(|_| !last).map(|s| s.subscribe());
            if let Some(lease) = self.attempt(req).await? {
                return Ok(Some(lease));
            }
            if last {
                break;
            }
            let delay = policy.jittered_delay_after(attempt);
            if delay.is_zero() {
                continue;
            }
            let mut sleep = self.inner.sleeper.sleep(delay);
            loop {
                let Some(w) = wait.as_mut() else {
                    sleep.await;
                    break;
                };
                tokio::select! {
                    () = &mut sleep => break,
                    () = w.wait() => {
                        wait = signal.as_ref().map(|s| s.subscribe());
                        if let Some(lease) = self.attempt(req).await? {
                            return Ok(Some(lease));
                        }
                    }
                }
            }
        }
        Ok(None)
    }

    /// Releases a lease. True if it was live; a second release (or one after expiry) is a
    /// no-op that returns false and fires no event.
    pub async fn release_proxy(&self, lease: &Lease) -> Result<bool, LeaseError> {
        let released = self
            .inner
            .storage
            .release(lease, self.inner.clock.now())
            .await?;
        Ok(self.fire_released(released.as_slice()) > 0)
    }

    /// Releases a live lease known by id (operators). True if it was live.
    pub async fn release_by_id(&self, id: LeaseId) -> Result<bool, LeaseError> {
        let released = self
            .inner
            .storage
            .release_by_id(id, self.inner.clock.now())
            .await?;
        Ok(self.fire_released(released.as_slice()) > 0)
    }

    /// Extends a live lease to `duration` from now. `None` if it is no longer live (expired,
    /// or released by someone else): whoever holds it has lost it.
    pub async fn renew(
        &self,
        lease: &Lease,
        duration: Duration,
    ) -> Result<Option<Lease>, LeaseError> {
        let renewal = Renewal {
            id: lease.id,
            pool: lease.pool_name.clone(),
            duration,
        };
        let renewed = self.renew_many(std::slice::from_ref(&renewal)).await?;
        Ok(renewed.first().map(|&(_, expires_at)| Lease {
            expires_at,
            ..lease.clone()
        }))
    }

    /// Extends many live leases in one batch; returns those renewed with their new expiry
    /// (the others are lost). Every duration is checked before anything changes.
    pub async fn renew_many(
        &self,
        renewals: &[Renewal],
    ) -> Result<Vec<(LeaseId, std::time::SystemTime)>, LeaseError> {
        self.inner
            .storage
            .renew(renewals, self.inner.clock.now())
            .await
    }

    /// Releases every expired lease now; returns how many.
    pub async fn cleanup_expired_leases(&self) -> Result<usize, LeaseError> {
        let released = self
            .inner
            .storage
            .cleanup_expired(self.inner.clock.now())
            .await?;
        Ok(self.fire_released(&released))
    }

    /// One attempt, wrapped in a guard that releases on drop.
    pub async fn lease(&self, req: &AcquireRequest) -> Result<Option<LeaseGuard<S>>, LeaseError> {
        Ok(self.acquire_proxy(req).await?.map(|l| self.guard(l)))
    }

    /// [`Self::acquire_proxy_with_retry`], wrapped in a guard that releases on drop.
    pub async fn lease_with_retry(
        &self,
        req: &AcquireRequest,
        policy: &RetryPolicy,
    ) -> Result<Option<LeaseGuard<S>>, LeaseError> {
        Ok(self
            .acquire_proxy_with_retry(req, policy)
            .await?
            .map(|l| self.guard(l)))
    }

    /// Wraps a lease this manager gave out in a guard that releases it on drop.
    pub fn guard(&self, lease: Lease) -> LeaseGuard<S> {
        LeaseGuard {
            manager: self.clone(),
            lease: Some(lease),
        }
    }

    /// Starts a task that releases expired leases every `every`. It stops when the
    /// returned handle is dropped. Needs a tokio runtime.
    pub fn spawn_sweeper(&self, every: Duration) -> SweeperHandle {
        let manager = self.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = manager.cleanup_expired_leases().await {
                    tracing::warn!(error = %e, "lease sweep failed");
                }
            }
        });
        SweeperHandle(task.abort_handle())
    }

    /// Waits until every release that a dropped [`LeaseGuard`] started has finished (at most
    /// `limit`); true if none is left. Call it before the runtime goes away.
    pub async fn flush(&self, limit: Duration) -> bool {
        let releases = &self.inner.releases;
        releases.close();
        let done = tokio::time::timeout(limit, releases.wait()).await.is_ok();
        releases.reopen();
        done
    }

    fn fire_released(&self, released: &[Released]) -> usize {
        let callbacks = &self.inner.callbacks;
        if callbacks.has_release() {
            for r in released {
                callbacks.fire_release(&ReleaseEvent {
                    lease: r.lease.clone(),
                    pool_name: r.lease.pool_name.clone(),
                    released_at: r.released_at,
                    lease_duration: r
                        .released_at
                        .duration_since(r.lease.acquired_at)
                        .unwrap_or_default(),
                    pool_stats: r.stats.clone(),
                });
            }
        }
        released.len()
    }
}

/// Stops the background sweeper when dropped.
#[derive(Debug)]
pub struct SweeperHandle(AbortHandle);

impl Drop for SweeperHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A held lease that is released when the guard is dropped — also when the task holding it
/// panics or is cancelled. This is the Rust form of the seed's `with_lease`.
pub struct LeaseGuard<S: Storage = InMemoryStorage> {
    manager: ProxyManager<S>,
    lease: Option<Lease>,
}

impl<S: Storage> LeaseGuard<S> {
    /// Releases now. True if the lease was still live.
    pub async fn release(mut self) -> Result<bool, LeaseError> {
        match self.lease.take() {
            Some(lease) => self.manager.release_proxy(&lease).await,
            None => Ok(false),
        }
    }

    /// Extends the lease to `duration` from now. False if it is no longer live.
    pub async fn renew(&mut self, duration: Duration) -> Result<bool, LeaseError> {
        let Some(lease) = &self.lease else {
            return Ok(false);
        };
        match self.manager.renew(lease, duration).await? {
            Some(renewed) => {
                self.lease = Some(renewed);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Disarms the guard and returns the lease; the caller must release it.
    pub fn into_lease(mut self) -> Lease {
        self.lease
            .take()
            .expect("a guard holds its lease until dropped")
    }
}

impl<S: Storage> Deref for LeaseGuard<S> {
    type Target = Lease;

    fn deref(&self) -> &Lease {
        self.lease
            .as_ref()
            .expect("a guard holds its lease until dropped")
    }
}

impl<S: Storage> std::fmt::Debug for LeaseGuard<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LeaseGuard")
            .field(&self.lease.as_ref().map(|l| l.id))
            .finish()
    }
}

impl<S: Storage> Drop for LeaseGuard<S> {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let manager = self.manager.clone();
        let mut release = Box::pin(async move {
            if let Err(e) = manager.release_proxy(&lease).await {
                tracing::warn!(lease = %lease.id, error = %e, "release on drop failed");
            }
        });
        // Backends that answer at once (the in-memory one) release right here, in the
        // dropping thread; others finish on the runtime.
        if let Poll::Ready(()) = release
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let releases = self.manager.inner.releases.clone();
                releases.spawn_on(release, &rt);
            }
            Err(_) => tracing::warn!("lease dropped outside a runtime; it will expire instead"),
        }
    }
}
