//! The proxy listener: accept loop, per-connection dispatch (CONNECT tunnels on the raw
//! socket, plain HTTP handed to hyper), and the leasing every connection shares: acquire with
//! the pool's retry policy, dial with failover, passive health, renewal while open, and the
//! registry that lets an operator close a lease's connection.

pub mod connect;
pub mod forward;
pub mod head;
pub mod headers;
pub mod http1;
mod lease;
pub mod session;
pub mod socks;
pub mod splice;
pub mod upstream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
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
use crate::model::{Proxy, ProxyId};
use crate::retry::RetryPolicy;
use crate::selector::Selector;
use head::{Head, HeadError, Opening};
use splice::Transferred;
use upstream::{Policy, Target, UpstreamExtra};

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
    connections: DashMap<LeaseId, Holding, rustc_hash::FxBuildHasher>,
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
            connections: DashMap::default(),
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

    /// Closes every open connection (the end of the shutdown drain): the daemon-wide token,
    /// then each held lease's own token. A lease held after the first step sees the daemon
    /// token cancelled when it registers (`hold`), so none is missed.
    pub fn close_all(&self) {
        self.cancel.cancel();
        for h in self.connections.iter() {
            h.cancel.cancel();
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

/// Accepts clients until `state.drain` is cancelled; each connection runs on the tracker.
pub async fn serve(listener: TcpListener, state: Arc<ProxyState>) {
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one setsockopt for
    // the daemon's life instead of one per connection.
    let inherits_nodelay = cfg!(target_os = "linux")
        && socket2::SockRef::from(&listener)
            .set_tcp_nodelay(true)
            .is_ok();
    let max = state.runtime.load().limits().max_connections;
    let permits = Arc::new(Semaphore::new(max));
    loop {
        // Drain first: under a flood, accept would always be ready.
        let permit = tokio::select! {
            biased;
            () = state.drain.cancelled() => return,
            p = permits.clone().acquire_owned() => p.expect("never closed"),
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = state.drain.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state2 = state.clone();
        let span = info_span!(
            "conn", client = %peer, kind = Empty, consumer = Empty, pool = Empty,
            proxy = Empty, target = Empty
        );
        if !inherits_nodelay {
            let _ = stream.set_nodelay(true);
        }
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
    let rt = state.runtime.load_full();
    let limits = rt.limits();
    let opening = tokio::select! {
        biased;
        h = head::read_opening(&mut stream, limits.max_head_bytes, limits.head_timeout()) => h,
        () = state.drain.cancelled() => return,
    };
    let head = match opening {
        Ok(Opening::Http(head)) => head,
        Ok(Opening::Socks5(greeting)) => return socks::handle(&state, &rt, stream, greeting).await,
        Err(HeadError::Closed | HeadError::Io(_)) => return,
        Err(HeadError::Bad(e)) => {
            state.metrics.connection_done("http", e.code());
            return reply_error(&mut stream, &e).await;
        }
    };
    if head.method().eq_ignore_ascii_case("CONNECT") {
        connect::handle(&state, &rt, stream, head).await;
    } else if head.target().starts_with("http://") || head.target().starts_with("https://") {
        forward::serve(state, rt, stream, head).await;
    } else {
        let e = ProxyError::BadRequest(format!(
            "`{}` is not a proxy request (absolute URI or CONNECT)",
            head.target()
        ));
        state.metrics.connection_done("http", e.code());
        reply_error(&mut stream, &e).await;
    }
}

/// Records a finished connection: metrics, and the summary event in its span.
pub fn finish(
    state: &ProxyState,
    kind: &'static str,
    pool: Option<&str>,
    outcome: &'static str,
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
    if span.is_disabled() {
        return;
    }
    span.record("consumer", &*id.consumer);
    span.record("pool", &*id.pool);
    span.record("target", target.authority().as_str());
    if let Some(p) = proxy {
        span.record("proxy", p.as_str());
    }
}

#[cfg(test)]
mod tests {
    /// `serve` relies on this to skip a setsockopt per connection.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        socket2::SockRef::from(&listener)
            .set_tcp_nodelay(true)
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (accepted, _) = accepted.unwrap();
        assert!(accepted.nodelay().unwrap());
        drop(client);
    }
}
