//! The dedicated session: one connection outside the pool that holds the node's advisory
//! lock (`node_claim`), LISTENs on `pharox_capacity` and heartbeats `pharox_node`.
//!
//! It must be a direct connection (session advisory locks and LISTEN do not survive a
//! transaction-pooling PgBouncer). When it drops, the node lock is gone: the storage stops
//! taking new leases ([`PgError::NodeLockLost`]) and this task reconnects with backoff
//! (100 ms doubling to 5 s), claims the lock again (if another daemon took the node id
//! meanwhile, it logs an error and keeps trying), LISTENs again and wakes every local waiter,
//! since NOTIFYs sent while it was away are lost. After a network partition the server may
//! still run the old session's backend, holding the lock: when the lock's holder is that
//! backend (its pid was remembered), the daemon terminates it and claims again.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::conn::ConnSpec;
use super::{Core, PgError, sql};

/// Heartbeat period of the dedicated session.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// An open dedicated session: the client, and the notifications its connection delivers
/// (the channel closes when the connection ends).
pub(crate) struct Session {
    client: tokio_postgres::Client,
    payloads: mpsc::UnboundedReceiver<String>,
    driver: JoinHandle<()>,
    timeout: Duration,
    scrub: super::error::Scrub,
    /// The server backend serving this session.
    pid: Option<i32>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Session {
    /// Connects (bounded by `timeout`).
    pub async fn open(spec: &ConnSpec, timeout: Duration) -> Result<Self, PgError> {
        let connect = spec.config.connect(spec.tls.clone());
        let failed = |reason: String| PgError::Connect {
            url: spec.masked.clone(),
            reason,
        };
        let (client, mut connection) = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| failed(format!("no answer within {timeout:?}")))?
            .map_err(|e| failed(spec.scrub.db_error(&e)))?;
        let (tx, payloads) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if tx.send(n.payload().to_owned()).is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "dedicated session connection ended");
                        return;
                    }
                    None => return,
                }
            }
        });
        let mut session = Self {
            client,
            payloads,
            driver,
            timeout,
            scrub: spec.scrub.clone(),
            pid: None,
        };
        session.pid = session
            .query("session_pid", &[])
            .await?
            .first()
            .and_then(|r| r.try_get("pid").ok());
        Ok(session)
    }

    /// The session's client (migration, schema checks).
    pub fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }

    async fn query(
        &self,
        name: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, PgError> {
        let q = self.client.query(sql::stmt(name), params);
        match tokio::time::timeout(self.timeout, q).await {
            Ok(r) => r.map_err(|e| PgError::Statement {
                op: "session",
                reason: self.scrub.db_error(&e),
            }),
            Err(_) => Err(PgError::Timeout {
                op: "session",
                after: self.timeout,
            }),
        }
    }

    /// Takes the node lock; false when another live session holds it.
    pub async fn claim(&self, node: &str) -> Result<bool, PgError> {
        let rows = self.query("node_claim", &[&node]).await?;
        Ok(rows
            .first()
            .and_then(|r| r.try_get::<_, bool>("claimed").ok())
            .unwrap_or(false))
    }

    /// The backend pid holding the node lock, if any.
    async fn holder_pid(&self, node: &str) -> Option<i32> {
        let rows = self.query("node_holder", &[&node]).await.ok()?;
        rows.first()?.try_get("pid").ok().flatten()
    }

    /// Ends our own previous session's backend if it is the one holding the node lock
    /// (true when it did).
    async fn evict_own(&self, node: &str, old_pid: Option<i32>) -> bool {
        let Some(old) = old_pid else { return false };
        if self.holder_pid(node).await != Some(old) {
            return false;
        }
        tracing::warn!(
            node,
            pid = old,
            "ending this daemon's previous database session, which still holds the node lock"
        );
        let ended = self.query("terminate_own_session", &[&old]).await;
        ended.is_ok_and(|r| {
            r.first()
                .and_then(|r| r.try_get::<_, bool>("terminated").ok())
                == Some(true)
        })
    }

    /// Gives the node id back (a start that failed after [`Session::claim`]); best effort:
    /// if this fails, the session's end releases it.
    pub async fn unclaim(&self, node: &str) {
        if let Err(e) = self.query("node_unclaim", &[&node]).await {
            tracing::debug!(error = %e, node, "giving the node id back failed");
        }
    }

    /// Who holds the node lock, for the log ("unknown" if that cannot be read).
    pub async fn holder(&self, node: &str) -> String {
        let Ok(rows) = self.query("node_holder", &[&node]).await else {
            return "unknown".into();
        };
        let Some(r) = rows.first() else {
            return "nobody any more".into();
        };
        let pid: Option<i32> = r.try_get("pid").ok().flatten();
        let app: Option<String> = r.try_get("application_name").ok().flatten();
        let addr: Option<std::net::IpAddr> = r.try_get("client_addr").ok().flatten();
        format!(
            "backend pid {}, application {}, client {}",
            pid.map_or("?".into(), |p| p.to_string()),
            app.as_deref().unwrap_or("?"),
            addr.map_or("local".into(), |a| a.to_string())
        )
    }

    /// Records the node in `pharox_node`.
    pub async fn register(&self, node: &str) -> Result<(), PgError> {
        let host = hostname();
        let version = env!("CARGO_PKG_VERSION");
        self.query("node_register", &[&node, &host, &version])
            .await
            .map(drop)
    }

    /// LISTEN pharox_capacity.
    pub async fn listen(&self) -> Result<(), PgError> {
        let q = self.client.batch_execute(sql::stmt("listen_capacity"));
        tokio::time::timeout(self.timeout, q)
            .await
            .map_err(|_| PgError::Timeout {
                op: "session",
                after: self.timeout,
            })?
            .map_err(|e| PgError::Statement {
                op: "session",
                reason: self.scrub.db_error(&e),
            })
    }
}

/// The host name for `pharox_node` (informational).
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// The dedicated session's task: serve it, and when it ends reconnect, until cancelled.
pub(crate) async fn run(
    core: Arc<Core>,
    spec: ConnSpec,
    mut session: Session,
    cancel: CancellationToken,
) {
    loop {
        serve(&core, &mut session, &cancel).await;
        core.session_up.store(false, Ordering::SeqCst);
        let old_pid = session.pid;
        drop(session);
        if cancel.is_cancelled() {
            return;
        }
        tracing::warn!(node = %core.node, "dedicated database session lost; reconnecting");
        match reconnect(&core, &spec, old_pid, &cancel).await {
            Some(s) => session = s,
            None => return,
        }
    }
}

/// Relays notifications and heartbeats until the session ends or the task is cancelled.
async fn serve(core: &Core, session: &mut Session, cancel: &CancellationToken) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            payload = session.payloads.recv() => match payload {
                Some(p) => on_notification(core, &p).await,
                None => return,
            },
            _ = tick.tick() => {
                let started = std::time::Instant::now();
                let beat = session.query("node_heartbeat", &[&&*core.node]).await;
                core.observe("session", Some(started.elapsed()), beat.is_ok());
                // The database answers (or not): `is_up` follows even without traffic.
                core.statement_ok.store(beat.is_ok(), Ordering::SeqCst);
                if let Err(e) = beat {
                    tracing::warn!(error = %e, "heartbeat of the dedicated session failed");
                    return;
                }
            }
        }
    }
}

/// A `pharox_capacity` payload (a pool id): wakes that pool's local waiters.
async fn on_notification(core: &Core, payload: &str) {
    let Ok(id) = payload.parse::<Uuid>() else {
        return;
    };
    if let Some(name) = core.pool_names.get(&id).map(|n| n.clone()) {
        core.wake_local(&name);
        return;
    }
    let rows = core
        .query("session", sql::stmt("pool_name_of"), &[&id])
        .await;
    if let Some(row) = rows.ok().as_ref().and_then(|r| r.first())
        && let Ok(name) = row.try_get::<_, &str>("name")
    {
        core.learn_pool(name, id);
        core.wake_local(name);
    }
}

/// Opens a new session, claims the node lock, LISTENs; retries with backoff. `None` when
/// cancelled.
async fn reconnect(
    core: &Core,
    spec: &ConnSpec,
    old_pid: Option<i32>,
    cancel: &CancellationToken,
) -> Option<Session> {
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = std::time::Instant::now();
        let result = reopen(core, spec, old_pid).await;
        core.observe("session", Some(started.elapsed()), result.is_ok());
        match result {
            Ok(s) => {
                core.statement_ok.store(true, Ordering::SeqCst);
                core.session_up.store(true, Ordering::SeqCst);
                core.wake_all();
                tracing::info!(node = %core.node, "dedicated database session back; node lock held");
                return Some(s);
            }
            Err(PgError::NodeTaken(node)) => {
                tracing::error!(node = %node, "node id taken by another live daemon while reconnecting; not leasing, still trying");
            }
            Err(e) => tracing::debug!(error = %e, "dedicated session: reconnect failed"),
        }
        tokio::select! {
            () = cancel.cancelled() => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn reopen(core: &Core, spec: &ConnSpec, old_pid: Option<i32>) -> Result<Session, PgError> {
    let s = Session::open(spec, core.timeout).await?;
    let mut claimed = s.claim(&core.node).await?;
    if !claimed && s.evict_own(&core.node, old_pid).await {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            claimed = s.claim(&core.node).await?;
            if claimed {
                break;
            }
        }
    }
    if !claimed {
        let holder = s.holder(&core.node).await;
        tracing::error!(node = %core.node, holder = %holder, "node lock held elsewhere");
        return Err(PgError::NodeTaken(core.node.to_string()));
    }
    s.register(&core.node).await?;
    s.listen().await?;
    Ok(s)
}
