//! The proxy listener: accept loop, per-connection dispatch (CONNECT tunnels on the raw
//! socket, plain HTTP handed to hyper), and the leasing every connection shares: acquire with
//! the pool's retry policy, dial with failover, passive health, renewal while open.

pub mod connect;
pub mod forward;
pub mod head;
pub mod headers;
pub mod splice;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::{Instrument, debug, info_span, warn};

use crate::config::{LimitsConfig, PassiveHealthConfig};
use crate::error::ProxyError;
use crate::identity::{Authenticator, Identity};
use crate::manager::{LeaseGuard, ProxyManager};
use crate::model::{Proxy, ProxyId, ProxyStatus};
use crate::retry::RetryPolicy;
use crate::selector::Selector;
use crate::storage::{AcquireRequest, LeaseError, Storage};
use head::{Head, HeadError};
use upstream::{DialError, Policy, Target, UpstreamExtra, UpstreamIo};

/// A pool's daemon settings.
#[derive(Debug, Clone)]
pub struct PoolRuntime {
    /// Selector strategy.
    pub selector: Selector,
    /// Lease length (renewed while open).
    pub lease: Duration,
    /// Waiting for a free upstream.
    pub retry: RetryPolicy,
    /// Other upstreams tried after a connect failure.
    pub failover: u32,
    /// Passive health.
    pub health: PassiveHealthConfig,
}

/// Everything connections share. Built by `app` from the config.
pub struct ProxyState {
    /// The lease engine.
    pub manager: ProxyManager,
    /// Credentials and identity.
    pub auth: Authenticator,
    /// Per-pool settings.
    pub pools: HashMap<Arc<str>, PoolRuntime>,
    /// Per-upstream settings the engine does not carry.
    pub extras: HashMap<ProxyId, UpstreamExtra>,
    /// Limits and timeouts.
    pub limits: LimitsConfig,
    /// Destination policy.
    pub policy: Policy,
    /// Consecutive connect failures per upstream.
    failures: DashMap<ProxyId, u32>,
    /// Cancelled when open connections must close.
    pub cancel: CancellationToken,
}

impl ProxyState {
    /// Assembles the state.
    pub fn new(
        manager: ProxyManager,
        auth: Authenticator,
        pools: HashMap<Arc<str>, PoolRuntime>,
        extras: HashMap<ProxyId, UpstreamExtra>,
        limits: LimitsConfig,
        policy: Policy,
    ) -> Self {
        Self {
            manager,
            auth,
            pools,
            extras,
            limits,
            policy,
            failures: DashMap::new(),
            cancel: CancellationToken::new(),
        }
    }
}

/// A lease held by a client connection: renewed in the background while held, released
/// exactly once when dropped.
pub struct Held {
    guard: LeaseGuard,
    _renew: AbortOnDropHandle<()>,
}

impl Held {
    /// The leased upstream.
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.guard.proxy
    }

    /// The lease id, as sent in `X-Pharox-Lease-Id`.
    pub fn lease_id(&self) -> String {
        self.guard.id.to_string()
    }
}

/// How to use the upstream once leased.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum DialMode {
    /// A byte stream to the target (CONNECT tunnels).
    Tunnel,
    /// A connection to send a plain HTTP request for the target: to the proxy itself for
    /// HTTP(S) upstreams, to the target otherwise.
    Forward,
}

impl ProxyState {
    /// Leases an upstream of the identity's pool and connects through it, trying other
    /// upstreams (never the same twice) when one fails.
    pub async fn lease_and_dial(
        self: &Arc<Self>,
        id: &Identity,
        target: &Target,
        mode: DialMode,
    ) -> Result<(Held, UpstreamIo, Bytes), ProxyError> {
        self.policy
            .check_literal(target)
            .map_err(|e| ProxyError::DestinationDenied(e.to_string()))?;
        let pool = self
            .pools
            .get(&id.pool)
            .ok_or_else(|| ProxyError::UnknownPool(id.pool.to_string()))?;
        let mut tried: Vec<ProxyId> = Vec::new();
        let mut errors: Vec<(ProxyId, DialError)> = Vec::new();
        for attempt in 0..=pool.failover {
            let policy = if attempt == 0 {
                pool.retry.clone()
            } else {
                RetryPolicy::once()
            };
            let req = request(id, pool, &tried);
            let lease = self
                .manager
                .acquire_proxy_with_retry(&req, &policy)
                .await
                .map_err(lease_error)?;
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
            let guard = self.manager.guard(lease);
            let extra = self
                .extras
                .get(&guard.proxy.id)
                .cloned()
                .unwrap_or_default();
            let timeout = self.limits.connect_timeout();
            let dialed = match mode {
                DialMode::Tunnel => {
                    upstream::open_tunnel(&guard.proxy, &extra, target, &self.policy, timeout).await
                }
                DialMode::Forward => {
                    upstream::open_forward(&guard.proxy, &extra, target, &self.policy, timeout)
                        .await
                }
            };
            match dialed {
                Ok((io, rest)) => {
                    self.failures.remove(&guard.proxy.id);
                    return Ok((self.hold(guard, pool.lease), io, rest));
                }
                Err(DialError::Denied(m)) => return Err(ProxyError::DestinationDenied(m)),
                Err(e) => {
                    warn!(proxy = %guard.proxy.id, pool = %id.pool, error = %e, "upstream failed");
                    self.record_failure(&guard.proxy.id, &pool.health);
                    tried.push(guard.proxy.id.clone());
                    errors.push((guard.proxy.id.clone(), e));
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

    /// Wraps a lease so that it is renewed while held.
    fn hold(&self, guard: LeaseGuard, lease: Duration) -> Held {
        let manager = self.manager.clone();
        let held = (*guard).clone();
        let every = (lease / 2).max(Duration::from_millis(500));
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match manager.renew(&held, lease).await {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => warn!(lease = %held.id, error = %e, "renewal failed"),
                }
            }
        });
        Held {
            guard,
            _renew: AbortOnDropHandle::new(renew),
        }
    }

    /// Counts a connect failure; at the pool's threshold the upstream rests for the cooldown.
    fn record_failure(self: &Arc<Self>, id: &ProxyId, health: &PassiveHealthConfig) {
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
    let mut filter = id.filter.clone();
    if !tried.is_empty() {
        let tried = tried.to_vec();
        filter = Some(
            filter
                .unwrap_or_default()
                .predicate(move |p| !tried.contains(&p.id)),
        );
    }
    if let Some(f) = filter {
        req = req.filter(f);
    }
    req
}

fn lease_error(e: LeaseError) -> ProxyError {
    match e {
        LeaseError::UnknownPool(p) => ProxyError::UnknownPool(p),
        LeaseError::InvalidFilter(f) => ProxyError::BadUsername(f.to_string()),
        other => ProxyError::UpstreamFailed(format!("lease engine: {other}")),
    }
}

/// Accepts clients until `shutdown` is cancelled; each connection runs on `tracker`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ProxyState>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(state.limits.max_connections));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("never closed"),
            () = shutdown.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let state = state.clone();
        let span = info_span!("conn", client = %peer);
        tracker.spawn(
            async move {
                handle(state, stream, peer).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Serves one client connection.
async fn handle(state: Arc<ProxyState>, mut stream: TcpStream, _peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let head = match head::read_head(
        &mut stream,
        state.limits.max_head_bytes,
        state.limits.head_timeout(),
    )
    .await
    {
        Ok(head) => head,
        Err(HeadError::Closed | HeadError::Io(_)) => return,
        Err(HeadError::Bad(e)) => return reply_error(&mut stream, &e).await,
    };
    if head.method.eq_ignore_ascii_case("CONNECT") {
        connect::handle(&state, stream, head).await;
    } else if head.target.starts_with("http://") || head.target.starts_with("https://") {
        forward::serve(state, stream, head).await;
    } else {
        let e = ProxyError::BadRequest(format!(
            "`{}` is not a proxy request (absolute URI or CONNECT)",
            head.target
        ));
        reply_error(&mut stream, &e).await;
    }
}

/// Writes an error response and closes.
pub async fn reply_error(stream: &mut TcpStream, e: &ProxyError) {
    use tokio::io::AsyncWriteExt;
    log_error(e);
    let _ = stream.write_all(e.to_http().as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Logs a refused request at the level its side deserves.
pub fn log_error(e: &ProxyError) {
    if e.is_client_fault() {
        debug!(code = e.code(), error = %e, "request refused");
    } else {
        warn!(code = e.code(), error = %e, "request failed");
    }
}

/// Parses a CONNECT target `host:port`.
pub fn parse_authority(s: &str) -> Result<Target, ProxyError> {
    crate::config::split_host_port(s)
        .map(|(host, port)| Target { host, port })
        .filter(|t| t.port != 0)
        .ok_or_else(|| ProxyError::BadRequest(format!("`{s}` is not host:port")))
}

impl Head {
    /// Identity from this head's headers.
    pub fn identify(&self, auth: &Authenticator) -> Result<Identity, ProxyError> {
        auth.identify(self.header("proxy-authorization"), &|name| {
            self.header(name)
        })
    }
}
