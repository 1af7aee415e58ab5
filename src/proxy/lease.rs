//! Leasing for a client connection: acquire with the pool's retry policy (or reuse the sticky
//! session's lease), dial through the upstream with failover, passive health, and the
//! registry-driven renewal of held leases.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::upstream::{self, DialError, Target, UpstreamIo};
use super::{DialMode, Held, Holding, LeaseHold, PoolRuntime, ProxyState, Runtime, session};
use crate::config::PassiveHealthConfig;
use crate::error::ProxyError;
use crate::identity::Identity;
use crate::manager::LeaseGuard;
use crate::model::{Proxy, ProxyId, ProxyStatus};
use crate::retry::RetryPolicy;
use crate::storage::{AcquireRequest, LeaseError, Storage};

impl ProxyState {
    /// Leases an upstream of the identity's pool (or uses its sticky session's) and connects
    /// through it, trying other upstreams (never the same twice) when one fails.
    pub async fn lease_and_dial(
        self: &Arc<Self>,
        rt: &Runtime,
        id: &Identity,
        target: &Target,
        mode: DialMode,
        exclude: &[ProxyId],
    ) -> Result<(Held, UpstreamIo, Bytes), ProxyError> {
        rt.policy
            .check_literal(target)
            .map_err(|e| ProxyError::DestinationDenied(e.to_string()))?;
        let pool = rt
            .pools
            .get(&id.pool)
            .ok_or_else(|| ProxyError::UnknownPool(id.pool.to_string()))?;
        let Some(session_id) = &id.session else {
            let (hold, io, rest) = self
                .dial_with_failover(rt, id, pool, target, mode, None, None, exclude)
                .await?;
            return Ok((Held::new(hold, None), io, rest));
        };
        let ttl = id.ttl.map_or(pool.session_ttl, |t| {
            Duration::from_secs(t).min(pool.session_max_ttl)
        });
        let key = (id.consumer.clone(), id.pool.clone(), session_id.clone());
        let metrics = self.metrics.clone();
        let session = self.sessions.get_or_create(
            key,
            ttl,
            self.cancel.clone(),
            move |s| metrics.session(&s.key().1, -1.0),
            |s| self.metrics.session(&s.key().1, 1.0),
        );
        // One connection of a session at a time past this point, so that a new session never
        // takes two leases.
        let mut lease = session.lease.lock().await;
        let mut current = lease.current.clone();
        if let Some(h) = &current
            && (h.cancel.is_cancelled() || !self.still_leasable(h.proxy(), pool.lease_slow).await)
        {
            current = None;
        }
        let before = lease.current.as_ref().map(|h| h.proxy().id.clone());
        let avoid = lease.avoid.clone();
        let result = self
            .dial_with_failover(rt, id, pool, target, mode, current, avoid, exclude)
            .await;
        let (hold, io, rest) = match result {
            Ok(ok) => ok,
            Err(e) => {
                lease.current = None;
                return Err(e);
            }
        };
        let moved_from = before.filter(|b| *b != hold.proxy().id);
        lease.current = Some(hold.clone());
        lease.avoid = None;
        drop(lease);
        Ok((
            Held::new(hold, Some(session::SessionUse::new(session, moved_from))),
            io,
            rest,
        ))
    }

    /// Is the upstream still active (not banned, not resting, not removed)?
    async fn still_leasable(&self, proxy: &Proxy, lease_slow: bool) -> bool {
        match self.manager.storage().get_proxy(&proxy.id).await {
            Ok(Some(info)) if !info.draining => match info.proxy.status {
                ProxyStatus::Active => true,
                ProxyStatus::Slow => lease_slow,
                _ => false,
            },
            _ => false,
        }
    }

    /// Tries `first` (a lease already held), then new leases, until a dial succeeds or the
    /// pool's failover budget is spent. `avoid` is skipped when another upstream is free;
    /// `exclude` (upstreams that already failed this request) never.
    #[allow(clippy::too_many_arguments)]
    async fn dial_with_failover(
        self: &Arc<Self>,
        rt: &Runtime,
        id: &Identity,
        pool: &PoolRuntime,
        target: &Target,
        mode: DialMode,
        mut first: Option<Arc<LeaseHold>>,
        avoid: Option<ProxyId>,
        exclude: &[ProxyId],
    ) -> Result<(Arc<LeaseHold>, UpstreamIo, Bytes), ProxyError> {
        let mut tried: Vec<ProxyId> = exclude.to_vec();
        let mut errors: Vec<(ProxyId, DialError)> = Vec::new();
        for attempt in 0..=pool.failover {
            let hold = match first.take() {
                Some(h) => h,
                None => {
                    let policy = if attempt == 0 {
                        pool.retry.clone()
                    } else {
                        RetryPolicy::once()
                    };
                    let mut lease = None;
                    if let Some(a) = &avoid {
                        let mut skip = tried.clone();
                        skip.push(a.clone());
                        lease = self.acquire(id, pool, &skip, &RetryPolicy::once()).await?;
                    }
                    if lease.is_none() {
                        lease = self.acquire(id, pool, &tried, &policy).await?;
                    }
                    let Some(lease) = lease else {
                        if errors.is_empty() {
                            let retry_after = pool
                                .retry
                                .max_backoff
                                .unwrap_or(pool.retry.backoff)
                                .as_secs()
                                .max(1);
                            return Err(ProxyError::PoolExhausted {
                                pool: id.pool.to_string(),
                                retry_after,
                            });
                        }
                        break;
                    };
                    self.hold(self.manager.guard(lease), pool.lease)
                }
            };
            let proxy = hold.proxy().clone();
            let extra = rt.extras.get(&proxy.id).cloned().unwrap_or_default();
            let timeout = rt.limits().connect_timeout();
            let dialed = match mode {
                DialMode::Tunnel => {
                    upstream::open_tunnel(&proxy, &extra, target, &rt.policy, timeout).await
                }
                DialMode::Forward => {
                    upstream::open_forward(&proxy, &extra, target, &rt.policy, timeout).await
                }
            };
            match dialed {
                Ok((io, rest)) => {
                    self.failures.remove(&proxy.id);
                    return Ok((hold, io, rest));
                }
                Err(DialError::Denied(m)) => return Err(ProxyError::DestinationDenied(m)),
                Err(e) => {
                    warn!(proxy = %proxy.id, pool = %id.pool, error = %e, "upstream failed");
                    self.metrics.upstream_failure(&id.pool, e.reason());
                    self.record_failure(&proxy.id, &pool.health);
                    tried.push(proxy.id.clone());
                    errors.push((proxy.id.clone(), e));
                }
            }
        }
        let all_timeouts = errors.iter().all(|(_, e)| matches!(e, DialError::Timeout));
        let detail = errors
            .iter()
            .map(|(p, e)| format!("{p}: {e}"))
            .collect::<Vec<_>>()
            .join("; ");
        Err(if all_timeouts {
            ProxyError::UpstreamTimeout(detail)
        } else {
            ProxyError::UpstreamFailed(detail)
        })
    }

    async fn acquire(
        &self,
        id: &Identity,
        pool: &PoolRuntime,
        skip: &[ProxyId],
        policy: &RetryPolicy,
    ) -> Result<Option<crate::model::Lease>, ProxyError> {
        let req = request(id, pool, skip);
        self.manager
            .acquire_proxy_with_retry(&req, policy)
            .await
            .map_err(lease_error)
    }

    fn hold(self: &Arc<Self>, guard: LeaseGuard, lease: Duration) -> Arc<LeaseHold> {
        // A token of its own, not a child of the daemon's: a child token takes the parent's
        // lock on creation and drop, which every connection would contend on. `close_all`
        // reaches it through the registry instead.
        let cancel = CancellationToken::new();
        let holding = Holding {
            cancel: cancel.clone(),
            lease: (*guard).clone(),
            duration: lease,
            renew_at: Instant::now() + lease / 2,
        };
        self.connections.insert(guard.id, holding);
        if self.cancel.is_cancelled() {
            cancel.cancel();
        }
        Arc::new(LeaseHold {
            guard,
            state: self.clone(),
            cancel,
        })
    }

    /// Renews every held lease that is past half its life. One task does this for all
    /// leases (`RENEW_TICK`), so a tunnel costs no timer of its own.
    pub async fn renew_held(&self) {
        let now = Instant::now();
        let due: Vec<(crate::model::Lease, Duration)> = self
            .connections
            .iter()
            .filter(|e| e.renew_at <= now)
            .map(|e| (e.lease.clone(), e.duration))
            .collect();
        for (lease, duration) in due {
            match self.manager.renew(&lease, duration).await {
                Ok(Some(_)) => {
                    if let Some(mut e) = self.connections.get_mut(&lease.id) {
                        e.renew_at = Instant::now() + duration / 2;
                    }
                }
                Ok(None) => {}
                Err(e) => warn!(lease = %lease.id, error = %e, "renewal failed"),
            }
        }
    }

    /// Counts a connect failure; at the pool's threshold the upstream rests for the cooldown.
    pub(crate) fn record_failure(self: &Arc<Self>, id: &ProxyId, health: &PassiveHealthConfig) {
        let count = {
            let mut n = self.failures.entry(id.clone()).or_insert(0);
            *n += 1;
            *n
        };
        if count != health.max_failures {
            return;
        }
        let (state, id) = (self.clone(), id.clone());
        let cooldown = Duration::from_secs(health.cooldown_seconds);
        tokio::spawn(async move {
            let storage = state.manager.storage();
            if storage
                .set_proxy_status(&id, ProxyStatus::Inactive)
                .await
                .ok()
                != Some(ProxyStatus::Active)
            {
                state.failures.remove(&id);
                return; // Not ours to rest (banned, removed, already resting).
            }
            warn!(proxy = %id, ?cooldown, "upstream put in cooldown after consecutive failures");
            tokio::select! {
                () = tokio::time::sleep(cooldown) => {}
                () = state.cancel.cancelled() => return,
            }
            state.failures.remove(&id);
            if let Ok(Some(info)) = storage.get_proxy(&id).await
                && info.proxy.status == ProxyStatus::Inactive
            {
                let _ = storage.set_proxy_status(&id, ProxyStatus::Active).await;
                debug!(proxy = %id, "upstream back from cooldown");
            }
        });
    }
}

fn request(id: &Identity, pool: &PoolRuntime, tried: &[ProxyId]) -> AcquireRequest {
    let mut req = AcquireRequest::new(id.pool.clone())
        .consumer(id.consumer.clone())
        .selector(pool.selector)
        .duration(pool.lease);
    req.filter = if tried.is_empty() {
        id.filter.clone()
    } else {
        // Never the same upstream twice: the identity's filter plus an exclusion.
        let tried = tried.to_vec();
        let mut f = id.filter.as_deref().cloned().unwrap_or_default();
        f = f.predicate(move |p| !tried.contains(&p.id));
        Some(Arc::new(f))
    };
    req
}

fn lease_error(e: LeaseError) -> ProxyError {
    match e {
        LeaseError::UnknownPool(p) => ProxyError::UnknownPool(p),
        LeaseError::InvalidFilter(f) => ProxyError::BadUsername(f.to_string()),
        other => ProxyError::UpstreamFailed(format!("lease engine: {other}")),
    }
}
