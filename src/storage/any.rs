//! [`AnyStorage`]: the backend a daemon runs, chosen by its config (`[storage] kind`), as one
//! concrete type so that the daemon is not tied to one backend. Each call is passed to the
//! backend it wraps (enum dispatch; in-memory calls stay synchronous inside, PostgreSQL's
//! futures are boxed).

use std::sync::Arc;
use std::time::SystemTime;

use super::{
    AcquireRequest, Acquired, CapacitySignal, InMemoryStorage, LeaseError, PostgresStorage,
    Released, Renewal, Storage,
};
use crate::model::{
    Consumer, HealthCheck, Lease, LeaseId, Pool, PoolStats, Proxy, ProxyId, ProxyInfo, ProxyStatus,
};

/// One of the storage backends.
#[derive(Clone, Debug)]
pub enum AnyStorage {
    /// The embedded in-memory storage.
    Memory(InMemoryStorage),
    /// Fleet mode: the lease state shared in PostgreSQL.
    Postgres(PostgresStorage),
}

impl AnyStorage {
    /// Whether the backend answers (the in-memory one always does).
    pub fn is_up(&self) -> bool {
        match self {
            AnyStorage::Memory(_) => true,
            AnyStorage::Postgres(pg) => pg.is_up(),
        }
    }

    /// The backend's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            AnyStorage::Memory(_) => "memory",
            AnyStorage::Postgres(_) => "postgres",
        }
    }
}

impl From<InMemoryStorage> for AnyStorage {
    fn from(s: InMemoryStorage) -> Self {
        AnyStorage::Memory(s)
    }
}

impl From<PostgresStorage> for AnyStorage {
    fn from(s: PostgresStorage) -> Self {
        AnyStorage::Postgres(s)
    }
}

/// Calls `$call` on the wrapped backend.
macro_rules! each {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStorage::Memory($s) => $call,
            AnyStorage::Postgres($s) => $call,
        }
    };
}

/// Awaits the future `$call` of the wrapped backend. PostgreSQL's futures are boxed: they
/// are several KiB (the pooled connection's query state), and unboxed they would size every
/// future that awaits a storage call, the daemon's per-connection tasks among them, even
/// with the in-memory backend. A database round trip dwarfs the allocation.
macro_rules! each_await {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStorage::Memory($s) => $call.await,
            AnyStorage::Postgres($s) => Box::pin($call).await,
        }
    };
}

impl Storage for AnyStorage {
    async fn acquire(&self, req: &AcquireRequest, now: SystemTime) -> Result<Acquired, LeaseError> {
        each_await!(self, s => s.acquire(req, now))
    }

    async fn release(
        &self,
        lease: &Lease,
        now: SystemTime,
    ) -> Result<Option<Released>, LeaseError> {
        each_await!(self, s => s.release(lease, now))
    }

    async fn release_by_id(
        &self,
        id: LeaseId,
        now: SystemTime,
    ) -> Result<Option<Released>, LeaseError> {
        each_await!(self, s => s.release_by_id(id, now))
    }

    async fn renew(
        &self,
        renewals: &[Renewal],
        now: SystemTime,
    ) -> Result<Vec<(LeaseId, SystemTime)>, LeaseError> {
        each_await!(self, s => s.renew(renewals, now))
    }

    async fn cleanup_expired(&self, now: SystemTime) -> Result<Vec<Released>, LeaseError> {
        each_await!(self, s => s.cleanup_expired(now))
    }

    async fn pool_stats(&self, pool: &str) -> Result<Option<PoolStats>, LeaseError> {
        each_await!(self, s => s.pool_stats(pool))
    }

    async fn list_pools(&self) -> Result<Vec<(Pool, PoolStats)>, LeaseError> {
        each_await!(self, s => s.list_pools())
    }

    async fn upsert_pool(&self, pool: Pool) -> Result<(), LeaseError> {
        each_await!(self, s => s.upsert_pool(pool))
    }

    async fn remove_pool(&self, name: &str) -> Result<bool, LeaseError> {
        each_await!(self, s => s.remove_pool(name))
    }

    async fn upsert_proxy(&self, proxy: Proxy) -> Result<(), LeaseError> {
        each_await!(self, s => s.upsert_proxy(proxy))
    }

    async fn upsert_proxies(&self, proxies: Vec<Proxy>) -> Result<(), LeaseError> {
        each_await!(self, s => s.upsert_proxies(proxies))
    }

    async fn remove_proxy(&self, id: &ProxyId) -> Result<bool, LeaseError> {
        each_await!(self, s => s.remove_proxy(id))
    }

    async fn apply_health(
        &self,
        id: &ProxyId,
        check: HealthCheck,
    ) -> Result<ProxyStatus, LeaseError> {
        each_await!(self, s => s.apply_health(id, check))
    }

    async fn rest(&self, id: &ProxyId, until: SystemTime) -> Result<bool, LeaseError> {
        each_await!(self, s => s.rest(id, until))
    }

    async fn get_proxy(&self, id: &ProxyId) -> Result<Option<ProxyInfo>, LeaseError> {
        each_await!(self, s => s.get_proxy(id))
    }

    async fn list_proxies(&self, pool: &str) -> Result<Vec<ProxyInfo>, LeaseError> {
        each_await!(self, s => s.list_proxies(pool))
    }

    async fn get_lease(&self, id: LeaseId) -> Result<Option<Lease>, LeaseError> {
        each_await!(self, s => s.get_lease(id))
    }

    async fn list_leases(&self, pool: Option<&str>) -> Result<Vec<Lease>, LeaseError> {
        each_await!(self, s => s.list_leases(pool))
    }

    async fn ensure_consumer(&self, name: &str) -> Result<Consumer, LeaseError> {
        each_await!(self, s => s.ensure_consumer(name))
    }

    fn capacity_signal(&self, pool: &str) -> Option<Arc<CapacitySignal>> {
        each!(self, s => s.capacity_signal(pool))
    }
}
