//! [`AnyStorage`]: the backend a daemon runs, chosen by its config (`[storage] kind`), as one
//! concrete type so that the daemon is not tied to one backend. Each call is passed to the
//! backend it wraps (enum dispatch: no boxing, and in-memory calls stay synchronous inside).

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

impl Storage for AnyStorage {
    async fn acquire(&self, req: &AcquireRequest, now: SystemTime) -> Result<Acquired, LeaseError> {
        each!(self, s => s.acquire(req, now).await)
    }

    async fn release(
        &self,
        lease: &Lease,
        now: SystemTime,
    ) -> Result<Option<Released>, LeaseError> {
        each!(self, s => s.release(lease, now).await)
    }

    async fn release_by_id(
        &self,
        id: LeaseId,
        now: SystemTime,
    ) -> Result<Option<Released>, LeaseError> {
        each!(self, s => s.release_by_id(id, now).await)
    }

    async fn renew(
        &self,
        renewals: &[Renewal],
        now: SystemTime,
    ) -> Result<Vec<(LeaseId, SystemTime)>, LeaseError> {
        each!(self, s => s.renew(renewals, now).await)
    }

    async fn cleanup_expired(&self, now: SystemTime) -> Result<Vec<Released>, LeaseError> {
        each!(self, s => s.cleanup_expired(now).await)
    }

    async fn pool_stats(&self, pool: &str) -> Result<Option<PoolStats>, LeaseError> {
        each!(self, s => s.pool_stats(pool).await)
    }

    async fn list_pools(&self) -> Result<Vec<(Pool, PoolStats)>, LeaseError> {
        each!(self, s => s.list_pools().await)
    }

    async fn upsert_pool(&self, pool: Pool) -> Result<(), LeaseError> {
        each!(self, s => s.upsert_pool(pool).await)
    }

    async fn remove_pool(&self, name: &str) -> Result<bool, LeaseError> {
        each!(self, s => s.remove_pool(name).await)
    }

    async fn upsert_proxy(&self, proxy: Proxy) -> Result<(), LeaseError> {
        each!(self, s => s.upsert_proxy(proxy).await)
    }

    async fn upsert_proxies(&self, proxies: Vec<Proxy>) -> Result<(), LeaseError> {
        each!(self, s => s.upsert_proxies(proxies).await)
    }

    async fn remove_proxy(&self, id: &ProxyId) -> Result<bool, LeaseError> {
        each!(self, s => s.remove_proxy(id).await)
    }

    async fn apply_health(
        &self,
        id: &ProxyId,
        check: HealthCheck,
    ) -> Result<ProxyStatus, LeaseError> {
        each!(self, s => s.apply_health(id, check).await)
    }

    async fn rest(&self, id: &ProxyId, until: SystemTime) -> Result<bool, LeaseError> {
        each!(self, s => s.rest(id, until).await)
    }

    async fn get_proxy(&self, id: &ProxyId) -> Result<Option<ProxyInfo>, LeaseError> {
        each!(self, s => s.get_proxy(id).await)
    }

    async fn list_proxies(&self, pool: &str) -> Result<Vec<ProxyInfo>, LeaseError> {
        each!(self, s => s.list_proxies(pool).await)
    }

    async fn get_lease(&self, id: LeaseId) -> Result<Option<Lease>, LeaseError> {
        each!(self, s => s.get_lease(id).await)
    }

    async fn list_leases(&self, pool: Option<&str>) -> Result<Vec<Lease>, LeaseError> {
        each!(self, s => s.list_leases(pool).await)
    }

    async fn ensure_consumer(&self, name: &str) -> Result<Consumer, LeaseError> {
        each!(self, s => s.ensure_consumer(name).await)
    }

    fn capacity_signal(&self, pool: &str) -> Option<Arc<CapacitySignal>> {
        each!(self, s => s.capacity_signal(pool))
    }
}
