//! Leasing for a client connection: acquire with the pool's retry policy (or reuse the sticky
//! session's lease), dial through the upstream with failover, passive health, and the
//! registry-driven renewal of held leases.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::{debug, warn};

use super::held::{HeldLease, LeaseUse};
use super::session::{Session, SessionUse};
use super::upstream::{self, DialError, UpstreamIo};
use super::{DialMode, PoolRuntime, ProxyState, Runtime};
use crate::config::PassiveHealthConfig;
use crate::error::ProxyError;
use crate::identity::Identity;
use crate::model::{Lease, LeaseId, Proxy, ProxyId, ProxyStatus};
use crate::retry::{RetryPolicy, wall_now};
use crate::storage::{AcquireRequest, LeaseError, Storage};
use crate::target::Target;

/// A session lookup that keeps finding an ended session gives up after this many tries.
const SESSION_TRIES: usize = 3;

impl ProxyState {
    /// Leases an upstream of the identity's pool (or uses its sticky session's) and connects
    /// through it, trying other upstreams (never the same twice, never one in `exclude`) when
    /// one fails.
    pub async fn lease_and_dial(
        self: &Arc<Self>,
        rt: &Runtime,
        id: &Identity,
        target: &Target,
        mode: DialMode,
        exclude: &[ProxyId],
    ) -> Result<(LeaseUse, UpstreamIo, Bytes), ProxyError> {
        rt.policy
            .check_literal(target)
            .map_err(|e| ProxyError::DestinationDenied(e.to_string()))?;
        if let Some(lease) = id.lease {
            return self.dial_on_lease(rt, id, lease, target, mode).await;
        }
        let pool = rt
            .pools
            .get(&id.pool)
            .ok_or_else(|| ProxyError::UnknownPool(id.pool.to_string()))?;
        let Some(session_id) = &id.session else {
            let (held, io, rest) = self
                .dial_with_failover(rt, id, pool, target, mode, None, None, exclude)
                .await?;
            return Ok((LeaseUse::new(held, self.metrics.clone(), None), io, rest));
        };
        let ttl = id.ttl.map_or(pool.session_ttl, |t| {
            Duration::from_secs(t).min(pool.session_max_ttl)
        });
        let key = (id.consumer.clone(), id.pool.clone(), session_id.clone());
        let max = rt.limits().max_sessions_per_consumer;
        for _ in 0..SESSION_TRIES {
            let session = self.sessions.get_or_create(key.clone(), ttl, max)?;
            if let Some(done) = self
                .dial_in_session(rt, id, pool, target, mode, exclude, &session)
                .await
            {
                return done;
            }
        }
        Err(ProxyError::BadRequest(
            "the sticky session was ended repeatedly while connecting; retry".into(),
        ))
    }

    /// Dials through `session`'s lease (or a new one for it). `None` if the session ended
    /// while this connection waited for it.
    #[allow(clippy::too_many_arguments)]
    async fn dial_in_session(
        self: &Arc<Self>,
        rt: &Runtime,
        id: &Identity,
        pool: &PoolRuntime,
        target: &Target,
        mode: DialMode,
        exclude: &[ProxyId],
        session: &Arc<Session>,
    ) -> Option<Result<(LeaseUse, UpstreamIo, Bytes), ProxyError>> {
        // One connection of a session at a time past this point, so that a new session never
        // takes two leases.
        let mut state = session.state.lock().await;
        if session.is_ended() {
            return None;
        }
        let mut current = state.current.clone();
        if let Some(h) = &current
            && (h.cancelled().is_cancelled()
                || !self.still_leasable(h.proxy(), pool.lease_slow).await)
        {
            current = None;
        }
        let before = state.current.as_ref().map(|h| h.proxy().id.clone());
        let avoid = state.avoid.clone();
        let result = self
            .dial_with_failover(rt, id, pool, target, mode, current, avoid, exclude)
            .await;
        let (held, io, rest) = match result {
            Ok(ok) => ok,
            Err(e) => {
                state.current = None;
                drop(state);
                self.sessions.abandon(session);
                return Some(Err(e));
            }
        };
        let moved_from = before.filter(|b| *b != held.proxy().id);
        state.current = Some(held.clone());
        state.avoid = None;
        drop(state);
        self.sessions.start(
            session,
            &self.background,
            self.stop.clone(),
            self.metrics.clone(),
        );
        let session_use = SessionUse::new(session.clone(), moved_from);
        let lease_use = LeaseUse::new(held, self.metrics.clone(), Some(session_use));
        Some(Ok((lease_use, io, rest)))
    }

    /// Connects through a lease of the lease API (`-lease-ID`): exactly that lease, no
    /// acquire and no failover, for as long as it lives. It must be live, this consumer's,
    /// in a pool the consumer may use, and not one the daemon holds for its own connections.
    async fn dial_on_lease(
        self: &Arc<Self>,
        rt: &Runtime,
        id: &Identity,
        lease_id: LeaseId,
        target: &Target,
        mode: DialMode,
    ) -> Result<(LeaseUse, UpstreamIo, Bytes), ProxyError> {
        let shown = lease_id.to_string();
        let now = wall_now();
        let live = self
            .manager
            .storage()
            .get_lease(lease_id)
            .await
            .map_err(lease_error)?
            .filter(|l| l.expires_at > now);
        let Some(lease) = live else {
            return Err(if self.api_leases.ended(lease_id) {
                ProxyError::LeaseExpired(shown)
            } else {
                ProxyError::LeaseForbidden(shown)
            });
        };
        if *lease.consumer_name != *id.consumer || self.registry.holds(lease_id) {
            return Err(ProxyError::LeaseForbidden(shown));
        }
        if !rt.auth.allows(&id.consumer, &lease.pool_name) {
            return Err(ProxyError::PoolForbidden(lease.pool_name.to_string()));
        }
        let held = self.registry.borrow(lease, now);
        let proxy = held.proxy().clone();
        match self.dial(rt, &proxy, target, mode).await {
            Ok((io, rest)) => Ok((LeaseUse::new(held, self.metrics.clone(), None), io, rest)),
            Err(e) => {
                let timeout = matches!(e, DialError::Timeout);
                self.metrics
                    .upstream_failure(&held.lease().pool_name, e.reason());
                let detail = format!("{}: {e}", proxy.id);
                Err(e.into_proxy_error(detail, timeout))
            }
        }
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
        mut first: Option<Arc<HeldLease>>,
        avoid: Option<ProxyId>,
        exclude: &[ProxyId],
    ) -> Result<(Arc<HeldLease>, UpstreamIo, Bytes), ProxyError> {
        let mut tried: Vec<ProxyId> = exclude.to_vec();
        let mut errors: Vec<(ProxyId, DialError)> = Vec::new();
        for attempt in 0..=pool.failover {
            let held = match first.take() {
                Some(h) => h,
                None => {
                    let policy = if attempt == 0 {
                        pool.retry.clone()
                    } else {
                        RetryPolicy::once()
                    };
                    match self
                        .lease_avoiding(id, pool, &tried, avoid.as_ref(), &policy)
                        .await?
                    {
                        Some(lease) => {
                            Arc::new(self.registry.hold(self.manager.guard(lease), pool.lease))
                        }
                        None if errors.is_empty() => return Err(exhausted(id, pool)),
                        None => break,
                    }
                }
            };
            let proxy = held.proxy().clone();
            match self.dial(rt, &proxy, target, mode).await {
                Ok((io, rest)) => {
                    self.failures.remove(&proxy.id);
                    return Ok((held, io, rest));
                }
                Err(e @ (DialError::Denied(_) | DialError::Local(_))) => {
                    let detail = format!("{}: {e}", proxy.id);
                    return Err(e.into_proxy_error(detail, false));
                }
                Err(e) => {
                    warn!(proxy = %proxy.id, pool = %id.pool, error = %e, "upstream failed");
                    self.metrics.upstream_failure(&id.pool, e.reason());
                    if e.is_upstream_fault(proxy.protocol) {
                        self.record_failure(&proxy.id, &pool.health).await;
                    }
                    tried.push(proxy.id.clone());
                    errors.push((proxy.id.clone(), e));
                }
            }
        }
        Err(failed(errors))
    }

    /// Opens the connection `mode` needs through `proxy`.
    pub(crate) async fn dial(
        &self,
        rt: &Runtime,
        proxy: &Proxy,
        target: &Target,
        mode: DialMode,
    ) -> Result<(UpstreamIo, Bytes), DialError> {
        let extra = rt.extras.get(&proxy.id).cloned().unwrap_or_default();
        let timeout = rt.limits().connect_timeout();
        match mode {
            DialMode::Tunnel => {
                upstream::open_tunnel(proxy, &extra, target, &rt.policy, timeout).await
            }
            DialMode::Forward => {
                upstream::open_forward(proxy, &extra, target, &rt.policy, timeout).await
            }
        }
    }

    /// A lease avoiding `avoid` if another upstream is free at once, else any lease the
    /// policy can wait for (never one in `tried`).
    async fn lease_avoiding(
        &self,
        id: &Identity,
        pool: &PoolRuntime,
        tried: &[ProxyId],
        avoid: Option<&ProxyId>,
        policy: &RetryPolicy,
    ) -> Result<Option<Lease>, ProxyError> {
        if let Some(a) = avoid {
            let mut skip = tried.to_vec();
            skip.push(a.clone());
            if let Some(lease) = self.acquire(id, pool, &skip, &RetryPolicy::once()).await? {
                return Ok(Some(lease));
            }
        }
        self.acquire(id, pool, tried, policy).await
    }

    async fn acquire(
        &self,
        id: &Identity,
        pool: &PoolRuntime,
        skip: &[ProxyId],
        policy: &RetryPolicy,
    ) -> Result<Option<Lease>, ProxyError> {
        let req = request(id, pool, skip);
        self.manager
            .acquire_proxy_with_retry(&req, policy)
            .await
            .map_err(lease_error)
    }

    /// Counts a connect failure; at the pool's threshold the upstream rests for the cooldown
    /// (a deadline kept in the storage: no timer here, and a crash strands nothing).
    pub(crate) async fn record_failure(&self, id: &ProxyId, health: &PassiveHealthConfig) {
        let count = {
            let mut n = self.failures.entry(id.clone()).or_insert(0);
            *n += 1;
            *n
        };
        if count < health.max_failures {
            return;
        }
        self.failures.remove(id);
        let cooldown = Duration::from_secs(health.cooldown_seconds);
        let Some(until) = wall_now().checked_add(cooldown) else {
            return;
        };
        match self.manager.storage().rest(id, until).await {
            Ok(true) => {
                warn!(proxy = %id, ?cooldown, "upstream put in cooldown after consecutive failures")
            }
            Ok(false) => debug!(proxy = %id, "upstream not active; no cooldown"),
            Err(e) => warn!(proxy = %id, error = %e, "could not store the upstream's cooldown"),
        }
    }
}

fn exhausted(id: &Identity, pool: &PoolRuntime) -> ProxyError {
    let retry_after = pool
        .retry
        .max_backoff
        .unwrap_or(pool.retry.backoff)
        .as_secs()
        .max(1);
    ProxyError::PoolExhausted {
        pool: id.pool.to_string(),
        retry_after,
    }
}

/// The answer when every upstream tried failed.
fn failed(errors: Vec<(ProxyId, DialError)>) -> ProxyError {
    let all_timeouts = errors.iter().all(|(_, e)| matches!(e, DialError::Timeout));
    let detail = errors
        .iter()
        .map(|(p, e)| format!("{p}: {e}"))
        .collect::<Vec<_>>()
        .join("; ");
    match errors.into_iter().last() {
        Some((_, e)) => e.into_proxy_error(detail, all_timeouts),
        None => ProxyError::upstream("no upstream could be tried"),
    }
}

fn request(id: &Identity, pool: &PoolRuntime, tried: &[ProxyId]) -> AcquireRequest {
    let mut req = AcquireRequest::new(id.pool.clone())
        .consumer(id.consumer.clone())
        .selector(pool.selector)
        .duration(pool.lease)
        .exclude(tried.iter().cloned());
    req.filter = id.filter.clone();
    req
}

/// The answer for a lease engine error.
pub(crate) fn lease_error(e: LeaseError) -> ProxyError {
    match e {
        LeaseError::UnknownPool(p) => ProxyError::UnknownPool(p),
        LeaseError::InvalidFilter(f) => ProxyError::BadUsername(f.to_string()),
        LeaseError::Backend(e) => ProxyError::StorageUnavailable(e.to_string()),
        other => ProxyError::BadRequest(format!("lease engine: {other}")),
    }
}
