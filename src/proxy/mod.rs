//! The proxy listener: accept loop, per-connection dispatch (CONNECT tunnels on the raw
//! socket, plain HTTP handed to hyper), and the leasing every connection shares: acquire with
//! the pool's retry policy, dial with failover, passive health, renewal while open, and the
//! registry that lets an operator close a lease's connection.

pub mod connect;
pub mod forward;
pub mod head;
pub mod headers;
pub mod session;
pub mod socks;
pub mod splice;
pub mod upstream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use dashmap::DashMap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::field::Empty;
use tracing::{Instrument, Span, debug, info, info_span, warn};

use crate::config::{Config, LimitsConfig, PassiveHealthConfig};
use crate::error::ProxyError;
use crate::identity::{Authenticator, Identity};
use crate::manager::{LeaseGuard, ProxyManager};
use crate::metrics::Metrics;
use crate::model::LeaseId;
use crate::model::{Proxy, ProxyId, ProxyStatus};
use crate::retry::RetryPolicy;
use crate::selector::Selector;
use crate::storage::{AcquireRequest, LeaseError, Storage};
use head::{Head, HeadError};
use splice::Transferred;
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
    /// Sticky-session idle TTL.
    pub session_ttl: Duration,
    /// Largest TTL a username may ask for.
    pub session_max_ttl: Duration,
    /// Active health checks, if configured.
    pub health_check: Option<crate::config::HealthCheckConfig>,
    /// Whether `slow` upstreams are leased.
    pub lease_slow: bool,
}

/// Everything derived from one configuration. Swapped whole on reload; a connection keeps
/// the snapshot it started with.
pub struct Runtime {
    /// The configuration it was built from.
    pub config: Config,
    /// Credentials and identity.
    pub auth: Authenticator,
    /// Per-pool settings.
    pub pools: HashMap<Arc<str>, PoolRuntime>,
    /// Per-upstream settings the engine does not carry.
    pub extras: HashMap<ProxyId, UpstreamExtra>,
    /// Destination policy.
    pub policy: Policy,
}

impl Runtime {
    /// Limits and timeouts.
    pub fn limits(&self) -> &LimitsConfig {
        &self.config.limits
    }
}

/// Everything connections share, for the daemon's whole life.
pub struct ProxyState {
    /// The lease engine.
    pub manager: ProxyManager,
    /// The current configuration-derived settings.
    pub runtime: ArcSwap<Runtime>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Consecutive connect failures per upstream.
    pub failures: DashMap<ProxyId, u32>,
    /// Each held lease's connection, so an operator can close it.
    connections: DashMap<LeaseId, Holding>,
    /// Cancelled when open connections must close (end of the shutdown drain).
    pub cancel: CancellationToken,
    /// Cancelled when shutdown starts: keep-alive connections finish their request and close.
    pub drain: CancellationToken,
    /// Every connection task and every tunnel, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Live sticky sessions.
    pub sessions: session::Sessions,
}

impl ProxyState {
    /// Assembles the state around a first runtime, wiring the engine's events to metrics.
    pub fn new(manager: ProxyManager, runtime: Runtime, metrics: Arc<Metrics>) -> Self {
        let m = metrics.clone();
        manager.on_acquire(move |e| m.on_acquire(e));
        let m = metrics.clone();
        manager.on_release(move |e| m.on_release(e));
        Self {
            manager,
            runtime: ArcSwap::from_pointee(runtime),
            metrics,
            failures: DashMap::new(),
            connections: DashMap::new(),
            cancel: CancellationToken::new(),
            drain: CancellationToken::new(),
            tracker: TaskTracker::new(),
            sessions: session::Sessions::default(),
        }
    }

    /// Ends a sticky session (its next connection takes a new lease). False if unknown.
    pub fn rotate_session(&self, key: &session::SessionKey) -> bool {
        match self.sessions.rotate(key) {
            Some(s) => {
                self.metrics.session(&s.key().1, -1.0);
                true
            }
            None => false,
        }
    }

    /// Ends every sticky session, releasing leases held between connections (shutdown).
    pub fn end_sessions(&self) {
        for s in self.sessions.list() {
            self.rotate_session(s.key());
        }
    }

    /// Closes the connection holding lease `id` and releases the lease. False if not live.
    pub async fn close_lease(&self, id: LeaseId) -> bool {
        if let Some((_, holding)) = self.connections.remove(&id) {
            holding.cancel.cancel();
        }
        self.manager.release_by_id(id).await.unwrap_or(false)
    }
}

/// How often held leases are checked for renewal.
pub const RENEW_TICK: Duration = Duration::from_millis(250);

/// A lease and what comes with it: renewal while it is held (by `renew_held`), and the token
/// that closes every connection using it. Released exactly once, when the last holder (a
/// connection, or a sticky session between connections) drops it.
pub struct LeaseHold {
    guard: LeaseGuard,
    state: Arc<ProxyState>,
    /// Cancelled when an operator closes this lease (or at hard shutdown).
    pub cancel: CancellationToken,
}

/// A held lease as the registry knows it: how to close its connections and when to renew it.
struct Holding {
    cancel: CancellationToken,
    lease: crate::model::Lease,
    duration: Duration,
    renew_at: Instant,
}

impl Drop for LeaseHold {
    fn drop(&mut self) {
        self.state.connections.remove(&self.guard.id);
    }
}

impl LeaseHold {
    /// The leased upstream.
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.guard.proxy
    }
}

/// One client connection's use of a lease.
pub struct Held {
    hold: Arc<LeaseHold>,
    /// Cancelled when the connection must close (operator, hard shutdown).
    pub cancel: CancellationToken,
    /// The sticky session this connection belongs to, if any.
    pub session: Option<session::SessionUse>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.hold
            .state
            .metrics
            .connection_active(&self.hold.guard.pool_name, -1.0);
    }
}

impl Held {
    fn new(hold: Arc<LeaseHold>, session: Option<session::SessionUse>) -> Self {
        hold.state
            .metrics
            .connection_active(&hold.guard.pool_name, 1.0);
        Held {
            cancel: hold.cancel.clone(),
            hold,
            session,
        }
    }

    /// The leased upstream.
    pub fn proxy(&self) -> &Arc<Proxy> {
        self.hold.proxy()
    }

    /// The lease id, as sent in `X-Pharox-Lease-Id`.
    pub fn lease_id(&self) -> String {
        self.hold.guard.id.to_string()
    }

    /// Extra response headers: the session and, if it just moved, the upstream it left.
    pub fn session_headers(&self) -> Vec<(&'static str, String)> {
        let Some(s) = &self.session else {
            return Vec::new();
        };
        let mut h = vec![("X-Pharox-Session", s.id().to_owned())];
        if let Some(from) = &s.moved_from {
            h.push(("X-Pharox-Session-Moved-From", from.to_string()));
        }
        h
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
        let cancel = self.cancel.child_token();
        let holding = Holding {
            cancel: cancel.clone(),
            lease: (*guard).clone(),
            duration: lease,
            renew_at: Instant::now() + lease / 2,
        };
        self.connections.insert(guard.id, holding);
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

/// Accepts clients until `state.drain` is cancelled; each connection runs on the tracker.
pub async fn serve(listener: TcpListener, state: Arc<ProxyState>) {
    let max = state.runtime.load().limits().max_connections;
    let permits = Arc::new(Semaphore::new(max));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("never closed"),
            () = state.drain.cancelled() => return,
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
            () = state.drain.cancelled() => return,
        };
        let state2 = state.clone();
        let span = info_span!(
            "conn", client = %peer, kind = Empty, consumer = Empty, pool = Empty,
            proxy = Empty, target = Empty
        );
        state.tracker.spawn(
            async move {
                handle(state2, stream).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Serves one client connection.
async fn handle(state: Arc<ProxyState>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let rt = state.runtime.load_full();
    let limits = rt.limits();
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        r = tokio::time::timeout(limits.head_timeout(), stream.peek(&mut first)) => r,
        () = state.drain.cancelled() => return,
    };
    match peeked {
        Ok(Ok(1)) if first[0] == 5 => return socks::handle(&state, &rt, stream).await,
        Ok(Ok(1..)) => {}
        Ok(_) => return, // closed or failed before a byte
        Err(_) => {
            let e = ProxyError::BadRequest("request head not received in time".into());
            state.metrics.connection_done("http", e.code());
            return reply_error(&mut stream, &e).await;
        }
    }
    let head = tokio::select! {
        h = head::read_head(&mut stream, limits.max_head_bytes, limits.head_timeout()) => h,
        () = state.drain.cancelled() => return,
    };
    let head = match head {
        Ok(head) => head,
        Err(HeadError::Closed | HeadError::Io(_)) => return,
        Err(HeadError::Bad(e)) => {
            state.metrics.connection_done("http", e.code());
            return reply_error(&mut stream, &e).await;
        }
    };
    if head.method.eq_ignore_ascii_case("CONNECT") {
        connect::handle(&state, &rt, stream, head).await;
    } else if head.target.starts_with("http://") || head.target.starts_with("https://") {
        forward::serve(state, rt, stream, head).await;
    } else {
        let e = ProxyError::BadRequest(format!(
            "`{}` is not a proxy request (absolute URI or CONNECT)",
            head.target
        ));
        state.metrics.connection_done("http", e.code());
        reply_error(&mut stream, &e).await;
    }
}

/// Records a finished connection: metrics, and the summary event in its span.
pub fn finish(
    state: &ProxyState,
    kind: &str,
    pool: Option<&str>,
    outcome: &str,
    bytes: Transferred,
    started: Instant,
) {
    state.metrics.connection_done(kind, outcome);
    if let Some(pool) = pool {
        state.metrics.bytes(pool, bytes.tx, bytes.rx);
    }
    info!(
        kind,
        outcome,
        tx = bytes.tx,
        rx = bytes.rx,
        duration_ms = started.elapsed().as_millis() as u64,
        "connection closed"
    );
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

/// Records who and what a connection is about in its span.
pub fn record_identity(id: &Identity, target: &Target, proxy: Option<&ProxyId>) {
    let span = Span::current();
    span.record("consumer", &*id.consumer);
    span.record("pool", &*id.pool);
    span.record("target", target.authority().as_str());
    if let Some(p) = proxy {
        span.record("proxy", p.as_str());
    }
}
