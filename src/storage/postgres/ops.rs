//! Release, renew, sweep, stats, leases and the start-up release of a node's stale leases.
//!
//! A release that freed a full proxy wakes the pool everywhere (local signal at once,
//! `NOTIFY` through the notifier). A release that failed without an answer is retried in the
//! background (release is idempotent). The sweep is the lab's: whoever wins the advisory lock
//! in this tick releases up to 500 expired leases per statement (repeated while there is a
//! backlog), then ends the rests that are due.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_postgres::Row;
use uuid::Uuid;

use super::rows::{self, listed_lease, swept_lease};
use super::{CachedStats, Core, Op, PgError, sql};
use crate::model::{Lease, LeaseId, LeaseStatus, Pool, PoolStats};
use crate::storage::{LeaseError, Released, Renewal, expiry};

/// Leases per sweep statement.
const SWEEP_BATCH: i32 = 500;
/// Sweep statements per cleanup call at most (a backlog drains over several ticks).
const SWEEP_ROUNDS: usize = 10;
/// Released lease rows deleted per `prune_released` statement: with [`SWEEP_ROUNDS`] and
/// one sweep a second, 50 000 rows a second, above what a fleet releases.
const PRUNE_BATCH: i32 = 5000;
/// Most leases `list_leases` returns.
const LIST_LIMIT: i64 = 100_000;

/// What a release statement reported.
pub(crate) struct Freed {
    pub pool_name: Arc<str>,
    pub released_at: SystemTime,
}

impl Core {
    /// Releases one lease by id (`reason` goes to `release_reason`). `None` if not live.
    pub(crate) async fn release_id(
        &self,
        id: LeaseId,
        reason: &str,
    ) -> Result<Option<Freed>, PgError> {
        let uuid = id.as_uuid();
        let rows = self
            .query("release", sql::stmt("release"), &[&uuid, &reason])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let pool_id: Uuid = row.try_get("pool_id").op(self, "release")?;
        let pool_name: &str = row.try_get("pool_name").op(self, "release")?;
        let was_full: bool = row.try_get("was_full").op(self, "release")?;
        let released_at: SystemTime = row.try_get("released_at").op(self, "release")?;
        if !self.pool_names.contains_key(&pool_id) {
            self.learn_pool(pool_name, pool_id);
        }
        self.wake_local(pool_name);
        if was_full {
            let _ = self.notify_tx.send(pool_id);
        }
        Ok(Some(Freed {
            pool_name: pool_name.into(),
            released_at,
        }))
    }

    /// [`Storage::release`](crate::storage::Storage::release).
    pub(crate) async fn release(&self, lease: &Lease) -> Result<Option<Released>, LeaseError> {
        let freed = match self.release_id(lease.id, "released").await {
            Ok(f) => f,
            Err(e) => {
                self.release_later(lease.id);
                return Err(e.into());
            }
        };
        let Some(freed) = freed else {
            return Ok(None);
        };
        Ok(Some(Released {
            lease: Lease {
                status: LeaseStatus::Released,
                ..lease.clone()
            },
            released_at: freed.released_at,
            stats: self.cached_stats(&freed.pool_name).await,
        }))
    }

    /// [`Storage::release_by_id`](crate::storage::Storage::release_by_id): an operator's
    /// release (`release_reason = 'admin'`).
    pub(crate) async fn release_by_id(&self, id: LeaseId) -> Result<Option<Released>, LeaseError> {
        let Some(freed) = self.release_id(id, "admin").await? else {
            return Ok(None);
        };
        let lease = self.lease_row(id).await?;
        let lease = lease.ok_or_else(|| PgError::Statement {
            op: "release",
            reason: format!("released lease {id} vanished"),
        })?;
        Ok(Some(Released {
            lease: Lease {
                status: LeaseStatus::Released,
                ..lease
            },
            released_at: freed.released_at,
            stats: self.cached_stats(&freed.pool_name).await,
        }))
    }

    /// [`Storage::renew`](crate::storage::Storage::renew): one `renew_batch` statement for
    /// the leases this node holds. Every duration is checked first.
    pub(crate) async fn renew(
        &self,
        renewals: &[Renewal],
    ) -> Result<Vec<(LeaseId, SystemTime)>, LeaseError> {
        let now = SystemTime::now();
        let mut due = Vec::with_capacity(renewals.len());
        for r in renewals {
            expiry(now, r.duration)?;
            due.push((r.id.as_uuid(), r.duration.as_secs_f64()));
        }
        if due.is_empty() {
            return Ok(Vec::new());
        }
        due.sort_by_key(|(id, _)| *id);
        due.dedup_by_key(|(id, _)| *id);
        let (ids, secs): (Vec<Uuid>, Vec<f64>) = due.into_iter().unzip();
        let rows = self
            .query(
                "renew",
                sql::stmt("renew_batch"),
                &[&ids, &secs, &&*self.node],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let id: Uuid = row.try_get("lease_id")?;
                Ok((LeaseId::from_uuid(id), row.try_get("expires_at")?))
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .op(self, "renew")
            .map_err(Into::into)
    }

    /// [`Storage::cleanup_expired`](crate::storage::Storage::cleanup_expired).
    pub(crate) async fn cleanup(&self) -> Result<Vec<Released>, LeaseError> {
        let mut out = Vec::new();
        for _ in 0..SWEEP_ROUNDS {
            let rows = self
                .query("sweep", sql::stmt("sweep"), &[&SWEEP_BATCH])
                .await?;
            let Some(row) = rows.first() else { break };
            let (leader, released) = self.swept(row, &mut out).await?;
            if !leader || released < i64::from(SWEEP_BATCH) {
                break;
            }
        }
        let rows = self
            .query("sweep", sql::stmt("rest_end"), &[&SWEEP_BATCH])
            .await?;
        if let Some(row) = rows.first() {
            self.wake_pools(row, "sweep")?;
        }
        // History is housekeeping: a failed prune must not lose the expiries above.
        if let Err(e) = self.prune_released().await {
            tracing::debug!(error = %e, "pruning released lease history failed (next sweep retries)");
        }
        Ok(out)
    }

    /// Deletes released leases older than `keep_released` (sweeper leader only), at most
    /// [`PRUNE_BATCH`] · [`SWEEP_ROUNDS`] rows per sweep. Returns how many.
    pub(crate) async fn prune_released(&self) -> Result<i64, PgError> {
        let Some(keep) = self.keep_released else {
            return Ok(0);
        };
        let secs = keep.as_secs_f64();
        let mut total = 0;
        for _ in 0..SWEEP_ROUNDS {
            let rows = self
                .query("sweep", sql::stmt("prune_released"), &[&secs, &PRUNE_BATCH])
                .await?;
            let deleted: i64 = match rows.first() {
                Some(row) => row.try_get("deleted").op(self, "sweep")?,
                None => 0,
            };
            total += deleted;
            if deleted < i64::from(PRUNE_BATCH) {
                break;
            }
        }
        if total > 0 {
            tracing::debug!(deleted = total, "pruned released lease history");
        }
        Ok(total)
    }

    /// Reads one sweep row: wakes its pools, collects its released leases.
    async fn swept(&self, row: &Row, out: &mut Vec<Released>) -> Result<(bool, i64), PgError> {
        let leader: bool = row.try_get("leader").op(self, "sweep")?;
        let released: i64 = row.try_get("released").op(self, "sweep")?;
        self.wake_pools(row, "sweep")?;
        let leases: serde_json::Value = row.try_get("leases").op(self, "sweep")?;
        for v in leases.as_array().into_iter().flatten() {
            if let Some((lease, released_at)) = swept_lease(v, &self.ids) {
                let stats = self.cached_stats(&lease.pool_name).await;
                out.push(Released {
                    lease,
                    released_at,
                    stats,
                });
            }
        }
        Ok((leader, released))
    }

    /// NOTIFYs the `woken_pools` of a row.
    fn wake_pools(&self, row: &Row, op: &'static str) -> Result<(), PgError> {
        let woken: Vec<Uuid> = row.try_get("woken_pools").op(self, op)?;
        for id in woken {
            self.wake_fleet(id, None);
        }
        Ok(())
    }

    /// Releases the leases a previous incarnation of this node left (at connect).
    pub(crate) async fn release_stale(&self) -> Result<(), PgError> {
        let text = sql::stmt("release_holder_batch");
        let mut total = 0;
        for _ in 0..200 {
            let rows = self
                .query("session", text, &[&&*self.node, &SWEEP_BATCH])
                .await?;
            let Some(row) = rows.first() else { break };
            self.wake_pools(row, "session")?;
            let released: i64 = row.try_get("released").op(self, "session")?;
            let remaining: i64 = row.try_get("remaining").op(self, "session")?;
            total += released;
            if remaining <= 0 {
                break;
            }
            if released == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if total > 0 {
            tracing::warn!(node = %self.node, leases = total, "released the stale leases of this node's previous run");
        }
        Ok(())
    }

    /// A pool's figures straight from the database (`None`: unknown pool).
    pub(crate) async fn fetch_stats(&self, pool: &str) -> Result<Option<PoolStats>, PgError> {
        let lease_slow: Option<bool> = None;
        let rows = self
            .query(
                "stats",
                sql::stmt("pool_stats"),
                &[&Some(pool), &lease_slow],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let stats = rows::stats(row).op(self, "stats")?;
        self.stats.insert(
            pool.into(),
            CachedStats {
                stats: stats.clone(),
                wanted: false,
            },
        );
        Ok(Some(stats))
    }

    /// The pool's figures for an event: the cached ones (refreshed every second in the
    /// background while in use), read once on first use.
    pub(crate) async fn cached_stats(&self, pool: &str) -> PoolStats {
        if let Some(mut e) = self.stats.get_mut(pool) {
            e.wanted = true;
            return e.stats.clone();
        }
        match self.fetch_stats(pool).await {
            Ok(Some(s)) => s,
            _ => PoolStats {
                pool_name: pool.into(),
                ..PoolStats::default()
            },
        }
    }

    /// [`Storage::pool_stats`](crate::storage::Storage::pool_stats): fresh, fleet-wide. A
    /// pool this node withdrew reports figures only while leases remain in it.
    pub(crate) async fn pool_stats(&self, pool: &str) -> Result<Option<PoolStats>, LeaseError> {
        let stats = self.fetch_stats(pool).await?;
        if self.withdrawn_pools.contains(pool) {
            return Ok(stats.filter(|s| s.total_leases > 0));
        }
        Ok(stats)
    }

    /// [`Storage::list_pools`](crate::storage::Storage::list_pools): every pool in the
    /// database (the fleet's and Python's) but those this node withdrew.
    pub(crate) async fn list_pools(&self) -> Result<Vec<(Pool, PoolStats)>, LeaseError> {
        let (name, lease_slow): (Option<&str>, Option<bool>) = (None, None);
        let rows = self
            .query("stats", sql::stmt("pool_stats"), &[&name, &lease_slow])
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let stats = rows::stats(row).op(self, "stats")?;
            if self.withdrawn_pools.contains(&*stats.pool_name) {
                continue;
            }
            let pool = Pool {
                name: stats.pool_name.to_string(),
                id: row.try_get("pool_id").op(self, "stats")?,
                description: row.try_get("description").op(self, "stats")?,
                lease_slow: row.try_get("lease_slow").op(self, "stats")?,
                owner: self
                    .own_pools
                    .contains(&*stats.pool_name)
                    .then(|| self.node.clone()),
            };
            self.learn_pool(&pool.name, pool.id);
            out.push((pool, stats));
        }
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(out)
    }

    /// A lease by id, any status (the `get_lease` row).
    async fn lease_row(&self, id: LeaseId) -> Result<Option<Lease>, PgError> {
        let uuid = id.as_uuid();
        let rows = self
            .query("leases", sql::stmt("get_lease"), &[&uuid])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        listed_lease(row, &self.ids).op(self, "leases")
    }

    /// [`Storage::get_lease`](crate::storage::Storage::get_lease): a live lease.
    pub(crate) async fn get_lease(&self, id: LeaseId) -> Result<Option<Lease>, LeaseError> {
        let uuid = id.as_uuid();
        let rows = self
            .query("leases", sql::stmt("get_lease"), &[&uuid])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let status: &str = row.try_get("status").op(self, "leases")?;
        if status != "active" {
            return Ok(None);
        }
        Ok(listed_lease(row, &self.ids).op(self, "leases")?)
    }

    /// [`Storage::list_leases`](crate::storage::Storage::list_leases): the fleet's live
    /// leases (holder = node id, `None` for Python's), oldest first, at most 100 000.
    pub(crate) async fn list_leases(&self, pool: Option<&str>) -> Result<Vec<Lease>, LeaseError> {
        let holder: Option<&str> = None;
        let rows = self
            .query(
                "leases",
                sql::stmt("list_leases"),
                &[&pool, &holder, &LIST_LIMIT],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(lease) = listed_lease(row, &self.ids).op(self, "leases")? {
                out.push(lease);
            }
        }
        Ok(out)
    }
}
