//! The proxy listener: accept loop, per-connection dispatch (CONNECT tunnels on the raw
//! socket, plain HTTP handed to hyper), and the leasing every connection shares: acquire with
//! the pool's retry policy, dial with failover, passive health, renewal while open, and the
//! registry that lets an operator close a lease's connection.

pub mod connect;
mod deadline;
mod exchange;
pub mod forward;
pub mod head;
pub mod held;
pub mod http1;
mod lease;
pub mod session;
pub mod socks;
pub mod splice;

mod tunnel;
pub mod upstream;
mod woken;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use rustc_hash::FxBuildHasher;
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
use crate::metrics::Metrics;
use crate::model::{LeaseId, ProxyId};
use crate::retry::RetryPolicy;
use crate::selector::Selector;
use crate::storage::Storage;
use crate::target::{Policy, Target};
use head::{HeadError, Opening};
use held::{Manager, Registry};
use splice::Transferred;
use upstream::UpstreamExtra;

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

/// Per-upstream settings the engine does not carry, by upstream. Built from the config file
/// alone (a client's ids are looked up, never inserted), so a fast hash is safe.
pub type Extras = HashMap<ProxyId, UpstreamExtra, FxBuildHasher>;

/// Everything derived from one configuration. Swapped whole on reload; a connection keeps
/// the snapshot it started with.
pub struct Runtime {
    /// The configuration it was built from.
    pub config: Config,
    /// Credentials and identity.
    pub auth: Authenticator,
    /// Per-pool settings: the config's pools and the storage's (the default, keyed hash:
    /// the lease API, Python workers and other daemons add names there).
    pub pools: HashMap<Arc<str>, PoolRuntime>,
    /// Per-upstream settings the engine does not carry.
    pub extras: Extras,
    /// Destination policy.
    pub policy: Policy,
    /// Pools of the storage that the config does not name, leasable with default settings.
    pub discovered: Vec<Arc<str>>,
}

impl PoolRuntime {
    /// The settings of a configured pool.
    pub fn from_config(pc: &crate::config::PoolConfig) -> Self {
        Self {
            selector: pc.selector,
            lease: Duration::from_secs(pc.lease_seconds),
            retry: pc.retry.policy(),
            failover: pc.failover_attempts,
            health: pc.health.clone(),
            session_ttl: Duration::from_secs(pc.session_ttl_seconds),
            session_max_ttl: Duration::from_secs(pc.session_max_ttl_seconds),
            health_check: pc.health_check.clone(),
            lease_slow: pc.lease_slow,
        }
    }
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
    pub manager: Manager,
    /// The current configuration-derived settings.
    pub runtime: ArcSwap<Runtime>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Consecutive connect failures per upstream.
    pub failures: DashMap<ProxyId, u32>,
    /// Every lease held for connections: renewal, and closing a lease's connections.
    pub registry: Arc<Registry>,
    /// Cancelled when shutdown starts: keep-alive connections finish their request and close.
    pub drain: CancellationToken,
    /// Every connection task and every tunnel, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Background tasks (session reapers, admin connections, health probes): they end when
    /// `stop` is cancelled, after the connections.
    pub background: TaskTracker,
    /// Cancelled at the very end of shutdown, for background tasks.
    pub stop: CancellationToken,
    /// Live sticky sessions.
    pub sessions: Arc<session::Sessions>,
    /// Serialises reloads (SIGHUP and the API).
    pub reload_lock: tokio::sync::Mutex<()>,
    /// Leases taken through the lease API, kept for an hour after they end.
    pub api_leases: crate::api::ApiLeases,
}

impl ProxyState {
    /// Assembles the state around a first runtime, wiring the engine's events to metrics.
    pub fn new(manager: Manager, runtime: Runtime, metrics: Arc<Metrics>) -> Self {
        let m = metrics.clone();
        manager.on_acquire(move |e| m.on_acquire(e));
        let m = metrics.clone();
        manager.on_release(move |e| m.on_release(e));
        Self {
            manager,
            runtime: ArcSwap::from_pointee(runtime),
            metrics,
            failures: DashMap::new(),
            registry: Arc::default(),
            drain: CancellationToken::new(),
            tracker: TaskTracker::new(),
            background: TaskTracker::new(),
            stop: CancellationToken::new(),
            sessions: Arc::default(),
            reload_lock: tokio::sync::Mutex::new(()),
            api_leases: crate::api::ApiLeases::default(),
        }
    }

    /// Ends a sticky session (its next connection takes a new lease). False if unknown.
    pub fn rotate_session(&self, key: &session::SessionKey) -> bool {
        self.sessions.rotate(key, &self.metrics)
    }

    /// Ends every sticky session, releasing leases held between connections (shutdown).
    pub fn end_sessions(&self) {
        self.sessions.clear(&self.metrics);
    }

    /// Closes every open connection (the end of the shutdown drain).
    pub fn close_all(&self) {
        self.registry.close_all();
    }

    /// Closes the connections holding lease `id` and releases the lease. False if it was
    /// not live.
    pub async fn close_lease(&self, id: LeaseId) -> Result<bool, crate::storage::LeaseError> {
        self.registry.close(id);
        self.manager.release_by_id(id).await
    }

    /// Renews the held leases that are due (one batch); closes the connections of lost ones.
    pub async fn renew_held(&self) -> usize {
        self.registry.renew_due(&self.manager, &self.metrics).await
    }

    /// Live leases in `pool` (0 for an unknown pool).
    pub async fn leased(&self, pool: &str) -> u64 {
        match self.manager.storage().pool_stats(pool).await {
            Ok(Some(s)) => s.total_leases,
            _ => 0,
        }
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

/// Connections past `limits.max_connections` that are answered at once (an error reply);
/// beyond these, further ones are closed without a word.
const MAX_REFUSING: usize = 256;

/// How long a refused connection may take to send its first bytes before it is answered.
const REFUSE_READ: Duration = Duration::from_millis(500);

/// Accepts clients until `state.drain` is cancelled; each connection runs on the tracker.
/// A client past `limits.max_connections` is answered at once (HTTP 503
/// `too_many_connections` with `Retry-After`, or a SOCKS5 refusal) instead of waiting in the
/// listen backlog.
pub async fn serve(listener: TcpListener, state: Arc<ProxyState>) {
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one setsockopt for
    // the daemon's life instead of one per connection.
    let inherits_nodelay = cfg!(target_os = "linux")
        && socket2::SockRef::from(&listener)
            .set_tcp_nodelay(true)
            .is_ok();
    let max = state.runtime.load().limits().max_connections;
    let permits = Arc::new(Semaphore::new(max));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    loop {
        // Drain first: under a flood, accept would always be ready.
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
        if !inherits_nodelay {
            let _ = stream.set_nodelay(true);
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if let Ok(slot) = refusing.clone().try_acquire_owned() {
                let state2 = state.clone();
                state.tracker.spawn(async move {
                    refuse(&state2, stream).await;
                    drop(slot);
                });
            }
            continue;
        };
        let state2 = state.clone();
        let span = info_span!(
            "conn", client = %peer, kind = Empty, consumer = Empty, pool = Empty,
            proxy = Empty, target = Empty
        );
        state
            .tracker
            .spawn(handle(state2, stream, permit).instrument(span));
    }
}

/// Answers a connection past the connection limit: a SOCKS5 client gets "no acceptable
/// method" (the only refusal SOCKS5 has before authentication), anyone else HTTP 503.
async fn refuse(state: &ProxyState, mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut first = [0u8; 4096];
    let n = tokio::time::timeout(REFUSE_READ, stream.read(&mut first))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(0);
    let e = ProxyError::TooManyConnections;
    if n > 0 && first[0] == 5 {
        state.metrics.connection_done("socks5", e.code());
        let _ = stream.write_all(&[5, 0xff]).await;
    } else {
        state.metrics.connection_done("http", e.code());
        let _ = stream.write_all(e.to_http().as_bytes()).await;
    }
    close_gracefully(&mut stream).await;
}

/// Serves one client connection.
///
/// The opening (reading and judging the first head) runs in a box of its own that is freed
/// before the connection's kind runs, and each kind's future is boxed too: the task's own
/// future is a few words, and a connection holds only the memory of the kind it turned out
/// to be (an idle tunnel keeps its task allocation for hours).
///
/// A plain function returning a block, not an `async fn`, which would keep its arguments
/// twice (as arguments and as locals): this future is the task's for the connection's life.
/// `permit` is the connection's slot under `max_connections`, given back at the end.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
fn handle(
    state: Arc<ProxyState>,
    stream: TcpStream,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        if let Some(conn) = Box::pin(open(state, stream)).await {
            conn.await;
        }
        drop(permit);
    }
}

/// A connection's kind, once its first head was judged.
type Conn = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Reads the first head and answers what cannot be served; otherwise returns the future
/// that serves the connection.
async fn open(state: Arc<ProxyState>, mut stream: TcpStream) -> Option<Conn> {
    let rt = state.runtime.load_full();
    let limits = rt.limits();
    let opening = tokio::select! {
        biased;
        h = head::read_opening(&mut stream, limits.max_head_bytes, limits.head_timeout()) => h,
        () = state.drain.cancelled() => return None,
    };
    let (head, rest) = match opening {
        Ok(Opening::Http(head, rest)) => (head, rest),
        Ok(Opening::Socks5(greeting)) => {
            return Some(Box::pin(socks::handle(state, rt, stream, greeting)));
        }
        Err(HeadError::Closed | HeadError::Io(_)) => return None,
        Err(HeadError::Bad(e)) => {
            state.metrics.connection_done("http", e.code());
            reply_error(&mut stream, &e).await;
            return None;
        }
    };
    if head.method_is("CONNECT") {
        Some(Box::pin(connect::handle(state, rt, stream, head, rest)))
    } else if head.absolute_uri().is_ok() {
        Some(Box::pin(forward::serve(state, rt, stream, head, rest)))
    } else {
        let e = ProxyError::BadRequest(format!(
            "`{}` is not a proxy request (absolute URI or CONNECT)",
            head.target().chars().take(64).collect::<String>()
        ));
        state.metrics.connection_done("http", e.code());
        reply_error(&mut stream, &e).await;
        None
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
    close_gracefully(stream).await;
}

/// How long a connection refused mid-request is read (and discarded) after the answer.
const LINGER: Duration = Duration::from_secs(2);
/// How much of it at most.
const LINGER_BYTES: usize = 1 << 20;

/// Ends our side of a connection after an answer, then reads and discards what the client
/// still sends (for at most [`LINGER`] and [`LINGER_BYTES`]): closing with unread bytes
/// would reset the connection, and the client could lose the answer.
pub async fn close_gracefully(stream: &mut TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        // On the heap: an array here would size every connection's future by it.
        let mut sink = vec![0u8; 8192];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Logs a refused request at the level its side deserves.
pub fn log_error(e: &ProxyError) {
    if e.is_client_fault() {
        debug!(code = e.code(), error = %e, "request refused");
    } else {
        warn!(code = e.code(), error = %e, "request failed");
    }
}

/// The identity a request head's `Proxy-Authorization` and `X-Pharox-*` headers give.
pub fn identify(auth: &Authenticator, head: &http1::RequestHead) -> Result<Identity, ProxyError> {
    auth.identify(head.field(http1::Kind::ProxyAuthorization), &|name| {
        head.header(name)
    })
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
