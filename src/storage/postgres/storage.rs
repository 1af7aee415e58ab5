//! `impl Storage for PostgresStorage`: each call is one method of the shared core (see the
//! sibling files); `now` arguments are ignored, the database's clock judges.

use std::sync::Arc;
use std::time::SystemTime;

use super::PostgresStorage;
use crate::model::{
    Consumer, HealthCheck, Lease, LeaseId, Pool, PoolStats, Proxy, ProxyId, ProxyInfo, ProxyStatus,
};
use crate::storage::{
    AcquireRequest, Acquired, CapacitySignal, LeaseError, Released, Renewal, Storage,
};

impl Storage for PostgresStorage {
    async fn acquire(
        &self,
        req: &AcquireRequest,
        _now: SystemTime,
    ) -> Result<Acquired, LeaseError> {
        self.core().acquire(req).await
    }

    async fn release(
        &self,
        lease: &Lease,
        _now: SystemTime,
    ) -> Result<Option<Released>, LeaseError> {
        self.core().release(lease).await
    }

    async fn release_by_id(
        &self,
        id: LeaseId,
        _now: SystemTime,
    ) -> Result<Option<Released>, LeaseError> {
        self.core().release_by_id(id).await
    }

    async fn renew(
        &self,
        renewals: &[Renewal],
        _now: SystemTime,
    ) -> Result<Vec<(LeaseId, SystemTime)>, LeaseError> {
        self.core().renew(renewals).await
    }

    async fn cleanup_expired(&self, _now: SystemTime) -> Result<Vec<Released>, LeaseError> {
        self.core().cleanup().await
    }

    async fn pool_stats(&self, pool: &str) -> Result<Option<PoolStats>, LeaseError> {
        self.core().pool_stats(pool).await
    }

    async fn list_pools(&self) -> Result<Vec<(Pool, PoolStats)>, LeaseError> {
        self.core().list_pools().await
    }

    async fn upsert_pool(&self, pool: Pool) -> Result<(), LeaseError> {
        self.core().upsert_pool(pool).await
    }

    async fn remove_pool(&self, name: &str) -> Result<bool, LeaseError> {
        self.core().remove_pool(name).await
    }

    async fn upsert_proxy(&self, proxy: Proxy) -> Result<(), LeaseError> {
        self.core().upsert_proxies(vec![proxy]).await
    }

    async fn upsert_proxies(&self, proxies: Vec<Proxy>) -> Result<(), LeaseError> {
        self.core().upsert_proxies(proxies).await
    }

    async fn remove_proxy(&self, id: &ProxyId) -> Result<bool, LeaseError> {
        self.core().remove_proxy(id).await
    }

    async fn apply_health(
        &self,
        id: &ProxyId,
        check: HealthCheck,
    ) -> Result<ProxyStatus, LeaseError> {
        self.core().apply_health(id, check).await
    }

    async fn rest(&self, id: &ProxyId, until: SystemTime) -> Result<bool, LeaseError> {
        self.core().rest(id, until).await
    }

    async fn get_proxy(&self, id: &ProxyId) -> Result<Option<ProxyInfo>, LeaseError> {
        self.core().get_proxy(id).await
    }

    async fn list_proxies(&self, pool: &str) -> Result<Vec<ProxyInfo>, LeaseError> {
        self.core().list_proxies(pool).await
    }

    async fn get_lease(&self, id: LeaseId) -> Result<Option<Lease>, LeaseError> {
        self.core().get_lease(id).await
    }

    async fn list_leases(&self, pool: Option<&str>) -> Result<Vec<Lease>, LeaseError> {
        self.core().list_leases(pool).await
    }

    async fn ensure_consumer(&self, name: &str) -> Result<Consumer, LeaseError> {
        let name = if name.is_empty() {
            crate::DEFAULT_CONSUMER_NAME
        } else {
            name
        };
        self.core().consumer_id(name).await?;
        Ok(Consumer { name: name.into() })
    }

    fn capacity_signal(&self, pool: &str) -> Option<Arc<CapacitySignal>> {
        Some(self.core().signal(pool))
    }
}
