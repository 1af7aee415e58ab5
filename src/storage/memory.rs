//! [`InMemoryStorage`]: the embedded storage backend.
//!
//! Pools live in a read-mostly map: a snapshot behind an `ArcSwap`, replaced whole (under a
//! writers' mutex) when a pool is created or forgotten, so finding a pool writes no memory
//! shared with other threads (no lock, no reference count). Each pool's state sits behind its
//! own mutex, held for one short, allocation-free critical section per operation and never
//! across an `.await`. Find and lease happen in that one critical section, which is what makes
//! acquire atomic. See `pool.rs` for the per-pool indexes that keep a choice O(log n).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use rustc_hash::{FxBuildHasher, FxHashMap};

use super::lock::{PoolGuard, PoolLock};
use super::names;
use super::pool::{Freed, Pick, PoolState};
use super::{
    AcquireRequest, Acquired, CapacitySignal, LeaseError, Released, Renewal, Storage, expiry,
};
use crate::model::{
    Consumer, DEFAULT_CONSUMER_NAME, HealthCheck, Lease, LeaseId, LeaseStatus, Pool, PoolStats,
    Proxy, ProxyId, ProxyInfo, ProxyProtocol, ProxyStatus, default_consumer, default_consumer_ref,
};

/// One pool: its state and its capacity signal. Aligned to 128 bytes (two cache lines: the
/// unit of the adjacent-line prefetcher), so that no other pool's lock or state, nor anything
/// else on the heap, shares a line with it.
#[repr(align(128))]
struct PoolEntry {
    state: PoolLock<PoolState>,
    signal: Arc<CapacitySignal>,
}

impl PoolEntry {
    fn lock(&self) -> PoolGuard<'_, PoolState> {
        // The state is only mutated through methods that do not panic midway: a panic
        // elsewhere while holding the lock (which unlocks it) leaves it consistent.
        self.state.lock()
    }
}

type PoolMap = FxHashMap<Arc<str>, Arc<PoolEntry>>;

/// The pools by name. Readers load the current snapshot (`ArcSwap::load` touches only the
/// reading thread's own slots); writers, serialised by `write`, publish a changed copy. Pools
/// change rarely and are few, so a copy per change is cheap.
#[derive(Default)]
struct Pools {
    map: ArcSwap<PoolMap>,
    write: Mutex<()>,
}

impl Pools {
    fn write(&self) -> MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry of `name`, created by `make` if there is none.
    fn get_or_insert(&self, name: &str, make: impl FnOnce() -> PoolEntry) -> Arc<PoolEntry> {
        if let Some(e) = self.map.load().get(name) {
            return e.clone();
        }
        let _w = self.write();
        let current = self.map.load();
        if let Some(e) = current.get(name) {
            return e.clone();
        }
        let entry = Arc::new(make());
        let mut next = PoolMap::clone(&current);
        next.insert(Arc::from(name), entry.clone());
        self.map.store(Arc::new(next));
        entry
    }

    /// Forgets `name` if it still maps to `entry`.
    fn remove_if_same(&self, name: &str, entry: &Arc<PoolEntry>) {
        let _w = self.write();
        let current = self.map.load();
        if current.get(name).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            let mut next = PoolMap::clone(&current);
            next.remove(name);
            self.map.store(Arc::new(next));
        }
    }
}

/// The in-memory storage. Cheap to clone: clones share the same state.
#[derive(Clone)]
pub struct InMemoryStorage {
    /// Unique per storage (clones share it): what per-thread caches are keyed by.
    id: u64,
    pools: Arc<Pools>,
    consumers: Arc<DashMap<Arc<str>, Consumer, FxBuildHasher>>,
}

impl Default for InMemoryStorage {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for InMemoryStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryStorage")
            .field("pools", &self.pools.map.load().len())
            .finish()
    }
}

impl InMemoryStorage {
    /// An empty storage with the default consumer.
    pub fn new() -> Self {
        let consumers = DashMap::default();
        let name = default_consumer();
        consumers.insert(name.clone(), Consumer { name });
        static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            id: IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            pools: Arc::default(),
            consumers: Arc::new(consumers),
        }
    }

    /// How many filter views a pool keeps (bounded; see the indexes in `pool.rs`), for
    /// diagnostics. `None` for an unknown pool.
    pub fn view_count(&self, pool: &str) -> Option<usize> {
        self.pool(pool).map(|e| e.lock().view_count())
    }

    fn pool(&self, name: &str) -> Option<Arc<PoolEntry>> {
        self.pools.map.load().get(name).cloned()
    }

    fn all_pools(&self) -> Vec<Arc<PoolEntry>> {
        self.pools.map.load().values().cloned().collect()
    }

    /// Forgets a removed pool once its last lease is gone. Called with the pool's lock held
    /// (lock order: a pool's state, then the map's writers' mutex; never the other way).
    fn forget_if_gone(&self, entry: &Arc<PoolEntry>, state: &PoolState) {
        if state.is_gone() {
            self.pools.remove_if_same(state.name(), entry);
        }
    }

    fn intern_consumer(&self, name: &Arc<str>) {
        if !self.consumers.contains_key(&**name) {
            self.consumers
                .entry(name.clone())
                .or_insert_with(|| Consumer { name: name.clone() });
        }
    }

    /// Releases one live lease of `entry`, the pool named `name`; its [`Released`] is made
    /// after the lock is let go, with this thread's copy of the name.
    fn release_in(
        &self,
        entry: &Arc<PoolEntry>,
        name: &Arc<str>,
        id: LeaseId,
        now: SystemTime,
    ) -> Option<Released> {
        let (taken, figures) = {
            let mut state = entry.lock();
            let taken = state.take(id);
            self.forget_if_gone(entry, &state);
            (taken?, state.figures())
        };
        entry.signal.notify();
        let pool_name = names::local(name);
        Some(Released {
            lease: taken.lease(id, pool_name.clone(), LeaseStatus::Released),
            released_at: now,
            stats: figures.stats(pool_name),
        })
    }

    /// Finds the pool holding a proxy id.
    fn pool_of(&self, id: &ProxyId) -> Option<Arc<PoolEntry>> {
        self.all_pools()
            .into_iter()
            .find(|e| e.lock().proxy(id).is_some())
    }
}

fn released(freed: Freed, now: SystemTime) -> Released {
    Released {
        lease: freed.lease,
        released_at: now,
        stats: freed.stats,
    }
}

/// Rejects records the engine cannot work with.
pub(crate) fn validate_proxy(p: &Proxy) -> Result<(), LeaseError> {
    let bad = |reason: &str| {
        Err(LeaseError::InvalidProxy {
            id: p.id.clone(),
            reason: reason.to_owned(),
        })
    };
    if p.id.as_str().is_empty() {
        return bad("empty id");
    }
    if p.max_concurrency == Some(0) {
        return bad("max_concurrency must be at least 1 (omit it for unlimited)");
    }
    if p.protocol != ProxyProtocol::Direct && (p.host.is_empty() || p.port == 0) {
        return bad("host and a non-zero port are required");
    }
    match (p.meta.latitude, p.meta.longitude) {
        (Some(lat), Some(lon))
            if (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon) => {}
        (None, None) => {}
        (Some(_), Some(_)) => return bad("coordinates out of range"),
        _ => return bad("latitude and longitude must be given together"),
    }
    if p.meta
        .strings()
        .iter()
        .any(|(_, v)| v.as_deref() == Some(""))
    {
        return bad("empty metadata value");
    }
    Ok(())
}

impl Storage for InMemoryStorage {
    async fn acquire(&self, req: &AcquireRequest, now: SystemTime) -> Result<Acquired, LeaseError> {
        let expires_at = expiry(now, req.duration)?;
        let pools = self.pools.map.load();
        let entry = pools
            .get(&*req.pool)
            .ok_or_else(|| LeaseError::UnknownPool(req.pool.to_string()))?;
        // This thread's copies of the names (see `names`), and the new lease's id, before the
        // lock is taken: the critical section stays short and writes no shared count.
        let pool_name = names::local(&req.pool);
        let consumer = match &req.consumer {
            Some(name) => names::local_consumer(name, self.id, || self.intern_consumer(name)),
            None => names::local(default_consumer_ref()),
        };
        let id = LeaseId::new();
        let pick = Pick {
            selector: req.selector,
            filter: req.filter.as_deref(),
            exclude: &req.exclude,
            only: req.only.as_deref(),
            consumer: &consumer,
            now,
            expires_at,
        };
        let mut expired = Vec::new();
        let (proxy, figures, rested) = {
            let mut state = entry.lock();
            if state.removed {
                return Err(LeaseError::UnknownPool(req.pool.to_string()));
            }
            let rested = state.sweep(now, &mut expired);
            let proxy = state.acquire(&pick, id);
            (proxy, state.figures(), rested)
        };
        if !expired.is_empty() || rested {
            entry.signal.notify();
        }
        let expired = expired.into_iter().map(|f| released(f, now)).collect();
        let lease = proxy.map(|proxy| Lease {
            id,
            pool_name: pool_name.clone(),
            consumer_name: consumer,
            acquired_at: now,
            expires_at,
            status: LeaseStatus::Active,
            proxy,
            holder: None,
        });
        Ok(Acquired {
            lease,
            stats: figures.stats(pool_name),
            expired,
        })
    }

    async fn release(
        &self,
        lease: &Lease,
        now: SystemTime,
    ) -> Result<Option<Released>, LeaseError> {
        let pools = self.pools.map.load();
        Ok(pools
            .get(&*lease.pool_name)
            .and_then(|entry| self.release_in(entry, &lease.pool_name, lease.id, now)))
    }

    async fn release_by_id(
        &self,
        id: LeaseId,
        now: SystemTime,
    ) -> Result<Option<Released>, LeaseError> {
        let entry = self
            .all_pools()
            .into_iter()
            .find(|e| e.lock().lease(id).is_some());
        Ok(entry.and_then(|entry| {
            let name = entry.lock().name().clone();
            self.release_in(&entry, &name, id, now)
        }))
    }

    async fn renew(
        &self,
        renewals: &[Renewal],
        now: SystemTime,
    ) -> Result<Vec<(LeaseId, SystemTime)>, LeaseError> {
        // Every duration is checked before any lease changes.
        let due = renewals
            .iter()
            .map(|r| Ok((r, expiry(now, r.duration)?)))
            .collect::<Result<Vec<_>, LeaseError>>()?;
        let mut renewed = Vec::with_capacity(due.len());
        for (r, expires_at) in due {
            if let Some(entry) = self.pool(&r.pool)
                && entry.lock().renew(r.id, now, expires_at)
            {
                renewed.push((r.id, expires_at));
            }
        }
        Ok(renewed)
    }

    async fn cleanup_expired(&self, now: SystemTime) -> Result<Vec<Released>, LeaseError> {
        let mut out = Vec::new();
        for entry in self.all_pools() {
            let mut freed = Vec::new();
            let rested = {
                let mut state = entry.lock();
                let rested = state.sweep(now, &mut freed);
                self.forget_if_gone(&entry, &state);
                rested
            };
            if !freed.is_empty() || rested {
                entry.signal.notify();
            }
            out.extend(freed.into_iter().map(|f| released(f, now)));
        }
        Ok(out)
    }

    async fn pool_stats(&self, pool: &str) -> Result<Option<PoolStats>, LeaseError> {
        // A removed pool still reports its draining leases until the last one is released.
        Ok(self.pool(pool).map(|e| e.lock().stats()))
    }

    async fn list_pools(&self) -> Result<Vec<(Pool, PoolStats)>, LeaseError> {
        let mut pools: Vec<(Pool, PoolStats)> = self
            .all_pools()
            .iter()
            .filter_map(|e| {
                let state = e.lock();
                let pool = Pool {
                    name: state.name().to_string(),
                    id: state.id,
                    owner: state.owner.clone(),
                    description: state.description().map(str::to_owned),
                    lease_slow: state.lease_slow(),
                };
                (!state.removed).then(|| (pool, state.stats()))
            })
            .collect();
        pools.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(pools)
    }

    async fn upsert_pool(&self, pool: Pool) -> Result<(), LeaseError> {
        loop {
            let entry = self.pools.get_or_insert(&pool.name, || PoolEntry {
                state: PoolLock::new(PoolState::new(pool.name.as_str().into(), pool.id, None)),
                signal: Arc::default(),
            });
            let mut state = entry.lock();
            // A removed pool whose last lease went between the look-up and the lock has been
            // forgotten meanwhile: look again (a new one is made). One still mapped now stays
            // mapped, since it is revived before the lock is released.
            let mapped = self.pools.map.load().get(&*pool.name).cloned();
            if mapped.is_some_and(|e| Arc::ptr_eq(&e, &entry)) {
                state.removed = false;
                state.set_description(pool.description);
                state.owner = pool.owner;
                state.set_lease_slow(pool.lease_slow);
                return Ok(());
            }
        }
    }

    async fn remove_pool(&self, name: &str) -> Result<bool, LeaseError> {
        let Some(entry) = self.pool(name) else {
            return Ok(false);
        };
        let mut state = entry.lock();
        if state.removed {
            return Ok(false);
        }
        state.drain_all();
        self.forget_if_gone(&entry, &state);
        Ok(true)
    }

    async fn upsert_proxy(&self, proxy: Proxy) -> Result<(), LeaseError> {
        validate_proxy(&proxy)?;
        let entry = self
            .pool(&proxy.pool)
            .ok_or_else(|| LeaseError::UnknownPool(proxy.pool.clone()))?;
        if let Some(other) = self.pool_of(&proxy.id)
            && !Arc::ptr_eq(&other, &entry)
        {
            let reason = format!("already belongs to pool `{}`", other.lock().name());
            return Err(LeaseError::InvalidProxy {
                id: proxy.id.clone(),
                reason,
            });
        }
        {
            let mut state = entry.lock();
            if state.removed {
                return Err(LeaseError::UnknownPool(proxy.pool.clone()));
            }
            state.upsert(proxy);
        }
        entry.signal.notify();
        Ok(())
    }

    async fn remove_proxy(&self, id: &ProxyId) -> Result<bool, LeaseError> {
        let Some(entry) = self.pool_of(id) else {
            return Ok(false);
        };
        let removed = entry.lock().remove(id);
        Ok(removed)
    }

    async fn apply_health(
        &self,
        id: &ProxyId,
        check: HealthCheck,
    ) -> Result<ProxyStatus, LeaseError> {
        let entry = self
            .pool_of(id)
            .ok_or_else(|| LeaseError::UnknownProxy(id.clone()))?;
        let status = check.status;
        let old = entry
            .lock()
            .apply_check(id, &check)
            .ok_or_else(|| LeaseError::UnknownProxy(id.clone()))?;
        if status == ProxyStatus::Active && old != status {
            entry.signal.notify();
        }
        Ok(old)
    }

    async fn rest(&self, id: &ProxyId, until: SystemTime) -> Result<bool, LeaseError> {
        let Some(entry) = self.pool_of(id) else {
            return Ok(false);
        };
        Ok(entry.lock().rest(id, until))
    }

    async fn get_proxy(&self, id: &ProxyId) -> Result<Option<ProxyInfo>, LeaseError> {
        Ok(self.all_pools().iter().find_map(|e| e.lock().proxy(id)))
    }

    async fn list_proxies(&self, pool: &str) -> Result<Vec<ProxyInfo>, LeaseError> {
        let entry = self
            .pool(pool)
            .ok_or_else(|| LeaseError::UnknownPool(pool.to_owned()))?;
        let proxies = entry.lock().proxies();
        Ok(proxies)
    }

    async fn get_lease(&self, id: LeaseId) -> Result<Option<Lease>, LeaseError> {
        Ok(self.all_pools().iter().find_map(|e| e.lock().lease(id)))
    }

    async fn list_leases(&self, pool: Option<&str>) -> Result<Vec<Lease>, LeaseError> {
        let entries = match pool {
            Some(name) => self.pool(name).into_iter().collect(),
            None => self.all_pools(),
        };
        let mut leases: Vec<Lease> = entries
            .iter()
            .flat_map(|e| e.lock().leases().collect::<Vec<_>>())
            .collect();
        leases.sort_by_key(|l| (l.acquired_at, l.id));
        Ok(leases)
    }

    async fn ensure_consumer(&self, name: &str) -> Result<Consumer, LeaseError> {
        let name = if name.is_empty() {
            DEFAULT_CONSUMER_NAME
        } else {
            name
        };
        let consumer = self
            .consumers
            .entry(Arc::from(name))
            .or_insert_with(|| Consumer { name: name.into() });
        Ok(consumer.value().clone())
    }

    fn capacity_signal(&self, pool: &str) -> Option<Arc<CapacitySignal>> {
        self.pool(pool).map(|e| e.signal.clone())
    }
}
