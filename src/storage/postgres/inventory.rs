//! Inventory and health: pools and proxies upserted from the config (owner = this node),
//! their removal, reading proxies back, and the shared health state.
//!
//! Removal never deletes a row (lease history references it; other daemons and Python may
//! use it):
//! - `remove_proxy` on a proxy this node owns sets `removed_at` and status `inactive` for the
//!   whole fleet (the lab's `proxy_remove`); its live leases finish normally. On a proxy this
//!   node upserted but another owns, it withdraws the proxy for this node only (no new
//!   leases here); on any other proxy it does nothing and returns false.
//! - `remove_pool` removes the pool's proxies this node owns and, if this node upserted the
//!   pool, withdraws it for this node (acquire answers `UnknownPool` here); the pool row
//!   stays. A pool that was never this node's (Python's, another daemon's) is left alone.
//!
//! Health (`apply_health`, `rest`) is written for everyone: status, `checked_at`,
//! `latency_us`, `rest_until` and a `proxy_health_record` row Python can read.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use uuid::Uuid;

use super::rows::{self, UpsertBatch};
use super::{Core, Op, PgError, sql};
use crate::model::{HealthCheck, Pool, Proxy, ProxyId, ProxyInfo, ProxyProtocol, ProxyStatus};
use crate::storage::LeaseError;

/// Proxies per `proxy_upsert_batch` statement.
const UPSERT_CHUNK: usize = 1000;

/// Rejects what cannot be stored in the shared tables (or would crash Python pharox 0.11,
/// which reads the same rows), on top of the engine's own rules.
fn validate(p: &Proxy) -> Result<(), LeaseError> {
    crate::storage::validate_proxy(p)?;
    let bad = |reason: &str| {
        Err(LeaseError::InvalidProxy {
            id: p.id.clone(),
            reason: reason.to_owned(),
        })
    };
    if p.protocol == ProxyProtocol::Direct {
        return bad("direct upstreams cannot be stored in a shared database");
    }
    if let Some(c) = &p.credentials
        && (c.username.trim().is_empty() || c.password.expose().trim().is_empty())
    {
        return bad(
            "shared upstreams need a non-blank user and password (Python pharox rejects others)",
        );
    }
    let m = &p.meta;
    let too_long =
        |v: &Option<String>, max: usize| v.as_ref().is_some_and(|s| s.chars().count() > max);
    if p.host.chars().count() > 255
        || too_long(&m.country, 8)
        || too_long(&m.city, 128)
        || too_long(&m.source, 255)
        || too_long(&m.isp, 255)
    {
        return bad("too long for the shared schema (host/source/isp 255, city 128, country 8)");
    }
    if m.asn.is_some_and(|a| a > i32::MAX as u32)
        || p.max_concurrency.is_some_and(|c| c > i32::MAX as u32)
    {
        return bad("asn and max_concurrency must fit a 32-bit signed integer");
    }
    Ok(())
}

impl Core {
    /// [`Storage::upsert_pool`](crate::storage::Storage::upsert_pool): matched by name (a pool
    /// Python made keeps its id); a pool this node withdrew comes back.
    pub(crate) async fn upsert_pool(&self, pool: Pool) -> Result<(), LeaseError> {
        let text = sql::stmt("pool_upsert");
        for _ in 0..3 {
            let rows = self
                .query(
                    "inventory",
                    text,
                    &[&pool.id, &pool.name, &pool.description, &pool.lease_slow],
                )
                .await?;
            if let Some(row) = rows.first() {
                let id: Uuid = row.try_get("id").op(self, "inventory")?;
                self.learn_pool(&pool.name, id);
                self.own_pools.insert(pool.name.as_str().into());
                self.withdrawn_pools.remove(pool.name.as_str());
                self.wake_local(&pool.name);
                return Ok(());
            }
        }
        Err(PgError::Statement {
            op: "inventory",
            reason: format!(
                "pool `{}` could not be created (concurrent creation)",
                pool.name
            ),
        }
        .into())
    }

    /// A pool's id by name (`None`: unknown).
    pub(crate) async fn pool_id(&self, name: &str) -> Result<Option<Uuid>, PgError> {
        if let Some(id) = self.pool_ids.get(name) {
            return Ok(Some(*id));
        }
        let rows = self
            .query("inventory", sql::stmt("pool_lookup"), &[&name])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let id: Uuid = row.try_get("id").op(self, "inventory")?;
        self.learn_pool(name, id);
        Ok(Some(id))
    }

    /// [`Storage::upsert_proxies`](crate::storage::Storage::upsert_proxies): all records are
    /// checked first; then one statement per pool and 1 000 proxies. A new row starts with
    /// the record's status, `checked_at` and latency; an existing one keeps its health state
    /// and live count (a removed one comes back with the record's status).
    pub(crate) async fn upsert_proxies(&self, proxies: Vec<Proxy>) -> Result<(), LeaseError> {
        proxies.iter().try_for_each(validate)?;
        let mut by_pool: Vec<(String, Vec<Proxy>)> = Vec::new();
        for p in proxies {
            match by_pool.iter_mut().find(|(name, _)| *name == p.pool) {
                Some((_, v)) => v.push(p),
                None => by_pool.push((p.pool.clone(), vec![p])),
            }
        }
        for (pool, proxies) in by_pool {
            let Some(pool_id) = self.pool_id(&pool).await? else {
                return Err(LeaseError::UnknownPool(pool));
            };
            for chunk in proxies.chunks(UPSERT_CHUNK) {
                self.upsert_chunk(pool_id, &pool, chunk).await?;
            }
        }
        Ok(())
    }

    async fn upsert_chunk(
        &self,
        pool_id: Uuid,
        pool: &str,
        chunk: &[Proxy],
    ) -> Result<(), PgError> {
        let mut b = UpsertBatch::default();
        for p in chunk {
            b.push(p);
        }
        let rows = self
            .query(
                "inventory",
                sql::stmt("proxy_upsert_batch"),
                &[
                    &pool_id,
                    &&*self.node,
                    &b.ids,
                    &b.hosts,
                    &b.ports,
                    &b.protocols,
                    &b.schemes,
                    &b.credentials,
                    &b.statuses,
                    &b.sources,
                    &b.countries,
                    &b.cities,
                    &b.latitudes,
                    &b.longitudes,
                    &b.isps,
                    &b.asns,
                    &b.caps,
                    &b.checked,
                    &b.latencies,
                ],
            )
            .await?;
        for p in chunk {
            let uuid = p.id.uuid();
            self.ids.insert(uuid, p.id.clone());
            self.withdrawn_proxies.remove(&uuid);
        }
        tracing::debug!(
            pool,
            proxies = b.len(),
            changed = rows.len(),
            "proxies upserted"
        );
        if !rows.is_empty() {
            self.wake_fleet(pool_id, Some(pool));
        }
        Ok(())
    }

    /// [`Storage::remove_proxy`](crate::storage::Storage::remove_proxy) (see the module doc).
    pub(crate) async fn remove_proxy(&self, id: &ProxyId) -> Result<bool, LeaseError> {
        let uuid = id.uuid();
        if self.withdrawn_proxies.contains(&uuid) {
            return Ok(false);
        }
        let rows = self
            .query(
                "inventory",
                sql::stmt("proxy_remove"),
                &[&vec![uuid], &&*self.node],
            )
            .await?;
        if !rows.is_empty() {
            return Ok(true);
        }
        if !self.ids.contains_key(&uuid) {
            return Ok(false);
        }
        // Ours in the config, another's in the database: stop leasing it here.
        let row = self.proxy_row(uuid).await?;
        let live = row.is_some_and(|(_, removed)| !removed);
        if live {
            self.withdrawn_proxies.insert(uuid);
        }
        Ok(live)
    }

    /// [`Storage::remove_pool`](crate::storage::Storage::remove_pool) (see the module doc).
    /// True when this node withdrew the pool (it had upserted it) or removed proxies of it
    /// that it owns; false for a pool that was never this node's (a Python pool, say), which
    /// stays leasable.
    pub(crate) async fn remove_pool(&self, name: &str) -> Result<bool, LeaseError> {
        if self.withdrawn_pools.contains(name) || self.pool_id(name).await?.is_none() {
            return Ok(false);
        }
        let rows = self
            .query(
                "inventory",
                sql::stmt("pool_withdraw"),
                &[&name, &&*self.node],
            )
            .await?;
        let ours = self.own_pools.remove(name).is_some();
        if ours {
            self.withdrawn_pools.insert(name.into());
        }
        if ours || !rows.is_empty() {
            tracing::info!(
                pool = name,
                removed = rows.len(),
                "pool withdrawn by this node"
            );
        }
        Ok(ours || !rows.is_empty())
    }

    /// A proxy as stored, with whether it is removed.
    async fn proxy_row(&self, id: Uuid) -> Result<Option<(ProxyInfo, bool)>, PgError> {
        let rows = self
            .query("inventory", sql::stmt("get_proxy"), &[&id])
            .await?;
        match rows.first() {
            Some(row) => self.info(row),
            None => Ok(None),
        }
    }

    /// A `list_proxies` / `get_proxy` row as this node sees it, and whether it is removed.
    fn info(&self, row: &tokio_postgres::Row) -> Result<Option<(ProxyInfo, bool)>, PgError> {
        let pool: &str = row.try_get("pool_name").op(self, "inventory")?;
        let Some(p) = rows::proxy(row, pool, &self.ids).op(self, "inventory")? else {
            return Ok(None);
        };
        let p = rows::with_rest(row, p).op(self, "inventory")?;
        let removed = row
            .try_get::<_, Option<SystemTime>>("removed_at")
            .op(self, "inventory")?
            .is_some();
        let leases: i32 = row.try_get("current_leases").op(self, "inventory")?;
        let uuid: Uuid = row.try_get("proxy_id").op(self, "inventory")?;
        let draining = removed
            || self.withdrawn_proxies.contains(&uuid)
            || self.withdrawn_pools.contains(pool);
        let info = ProxyInfo {
            proxy: Arc::new(p),
            current_leases: u32::try_from(leases).unwrap_or(0),
            draining,
        };
        Ok(Some((info, removed)))
    }

    /// Hides what the in-memory storage forgets: drained proxies with no lease left.
    fn visible(info: ProxyInfo) -> Option<ProxyInfo> {
        (!info.draining || info.current_leases > 0).then_some(info)
    }

    /// [`Storage::get_proxy`](crate::storage::Storage::get_proxy).
    pub(crate) async fn get_proxy(&self, id: &ProxyId) -> Result<Option<ProxyInfo>, LeaseError> {
        Ok(self
            .proxy_row(id.uuid())
            .await?
            .and_then(|(info, _)| Self::visible(info)))
    }

    /// [`Storage::list_proxies`](crate::storage::Storage::list_proxies): the pool's proxies
    /// in inventory order, whoever added them.
    pub(crate) async fn list_proxies(&self, pool: &str) -> Result<Vec<ProxyInfo>, LeaseError> {
        let rows = self
            .query("inventory", sql::stmt("list_proxies"), &[&pool])
            .await?;
        if rows.is_empty() && self.pool_id(pool).await?.is_none() {
            return Err(LeaseError::UnknownPool(pool.to_owned()));
        }
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some((info, _)) = self.info(row)?
                && let Some(info) = Self::visible(info)
            {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// [`Storage::apply_health`](crate::storage::Storage::apply_health): status, check time,
    /// latency, and a health record; ends a rest. Returns the previous status as this
    /// backend reports it (`inactive` while resting).
    pub(crate) async fn apply_health(
        &self,
        id: &ProxyId,
        check: HealthCheck,
    ) -> Result<ProxyStatus, LeaseError> {
        let uuid = id.uuid();
        let status = check.status.as_str();
        let latency_us = check
            .latency
            .map(|l| i64::try_from(l.as_micros()).unwrap_or(i64::MAX));
        let latency_ms = check
            .latency
            .map(|l| i32::try_from(l.as_millis()).unwrap_or(i32::MAX));
        let reachable = matches!(check.status, ProxyStatus::Active | ProxyStatus::Slow);
        let error: Option<&str> = None;
        let rows = self
            .query(
                "health",
                sql::stmt("proxy_health"),
                &[
                    &uuid,
                    &status,
                    &check.checked_at,
                    &latency_us,
                    &latency_ms,
                    &reachable,
                    &error,
                    &true,
                ],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| LeaseError::UnknownProxy(id.clone()))?;
        let before: &str = row.try_get("status_before").op(self, "health")?;
        // NULL (not false) when the proxy was not resting: `NULL > now()` in rest_cleared.
        let became_eligible = row
            .try_get::<_, Option<bool>>("became_eligible")
            .op(self, "health")?
            .unwrap_or(false);
        let pool_id: Uuid = row.try_get("pool_id").op(self, "health")?;
        let before: ProxyStatus = before.parse().unwrap_or(ProxyStatus::Inactive);
        if became_eligible {
            self.wake_fleet(pool_id, None);
        }
        // A leasable status that "became eligible" was resting: it read as inactive.
        let leasable = matches!(before, ProxyStatus::Active | ProxyStatus::Slow);
        Ok(if became_eligible && leasable {
            ProxyStatus::Inactive
        } else {
            before
        })
    }

    /// [`Storage::rest`](crate::storage::Storage::rest): a stored deadline, the fleet's.
    pub(crate) async fn rest(&self, id: &ProxyId, until: SystemTime) -> Result<bool, LeaseError> {
        let secs = until
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        let reason = "passive health: consecutive connect failures";
        let rows = self
            .query(
                "health",
                sql::stmt("proxy_rest"),
                &[&id.uuid(), &secs, &reason],
            )
            .await?;
        Ok(!rows.is_empty())
    }
}
