//! [`PostgresStorage`]: fleet mode (SPEC §6). Several daemons, and Python pharox 0.11
//! workers, share one lease state in PostgreSQL, in the schema pharox 0.11 creates plus the
//! additive migration of `migrate.sql`.
//!
//! The statements are the SQL lab's (`statements.sql`, adaptations marked `RUST:`):
//! - **acquire** is one statement per attempt (find + lock + bump the counter + insert the
//!   lease); an attempt that saw an eligible but locked proxy (`contended`) is retried at
//!   once, up to 4 attempts, before it is reported as a miss. The lease id is made here (a
//!   v4 UUID); after an ambiguous failure (timeout, lost connection) that id is released in
//!   the background, so a lease nobody knows about cannot sit out its TTL.
//! - **time** is the database's: lease times come from `now()` on the server, and the
//!   `now` arguments of the [`Storage`](crate::storage::Storage) calls are ignored (except to
//!   check durations, and to turn a rest deadline into a duration).
//! - **wake-up**: a release that freed a full proxy, a sweep that did, an ended rest or a
//!   proxy turning eligible sends `NOTIFY pharox_capacity` (after the change committed, as
//!   its own statement, coalesced per pool every 10 ms); the dedicated session LISTENs and
//!   fires the pool's [`CapacitySignal`].
//! - **node id**: the dedicated session holds the node's advisory lock (`node_claim`); a
//!   second live daemon with the same id is refused; at start the node's stale leases (a
//!   previous incarnation's) are released. While the dedicated session is down no new lease
//!   is taken ([`PgError::NodeLockLost`]); releases and renewals go on.
//! - **failure**: every call is bounded by the statement timeout (server side, and client
//!   side for the pool wait and the answer) and fails with
//!   [`LeaseError::Backend`](crate::storage::LeaseError::Backend) wrapping a [`PgError`]; the
//!   pool reconnects by itself, the dedicated session with backoff.
//!
//! Files: `conn.rs` (URL, sslmode, TLS), `sql.rs` (statement texts), `filter.rs` (filter →
//! SQL), `rows.rs` (rows ↔ values), `acquire.rs`, `ops.rs` (release, renew, sweep, stats,
//! leases, consumers), `inventory.rs` (pools, proxies, health), `listen.rs` (the dedicated
//! session), `upkeep.rs` (background NOTIFY, release retries, stats cache), `schema.rs`
//! (migration, schema check, `check`), `storage.rs` (the trait impl).

mod acquire;
mod conn;
mod error;
mod filter;
mod inventory;
mod listen;
mod ops;
mod rows;
mod schema;
mod sql;
mod storage;
mod upkeep;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use dashmap::{DashMap, DashSet};
use deadpool_postgres::{ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use conn::TlsMode;
pub use error::{PgError, mask_url};
pub use schema::{CheckReport, CounterDrift, Duplicate};

use crate::model::{LeaseId, PoolStats, ProxyId, Secret};
use crate::storage::CapacitySignal;
use error::Scrub;
use rows::IdMap;

/// Default of [`PgSettings::keep_released`].
pub const DEFAULT_KEEP_RELEASED: Duration = Duration::from_secs(24 * 3600);

/// Settings of the PostgreSQL storage (`[storage]` with `kind = "postgres"`).
#[derive(Clone)]
pub struct PgSettings {
    /// `postgres://user:pass@host:port/db?sslmode=…` (or a libpq key-value string). Never
    /// printed: `Debug` shows it through [`mask_url`].
    pub url: Secret,
    /// This daemon's id in the fleet: unique among live daemons (lease holder, owner of the
    /// proxies it upserts).
    pub node_id: String,
    /// Pooled connections (the dedicated session comes on top).
    pub pool_size: usize,
    /// Bound of every statement (server `statement_timeout`) and of every call (waiting for
    /// a pooled connection included).
    pub statement_timeout: Duration,
    /// Run `migrate.sql` at connect (creates missing tables, additive columns and indexes).
    pub migrate: bool,
    /// PEM CA certificates to trust besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// How long released leases stay in the `lease` table (history) before the sweeping
    /// node deletes them; `None` keeps them for good (what Python pharox does).
    pub keep_released: Option<Duration>,
}

impl PgSettings {
    /// Settings with the defaults: 16 connections, 2 s statement timeout, migrate, no CA
    /// file, released leases kept for 24 hours.
    pub fn new(url: impl Into<String>, node_id: impl Into<String>) -> Self {
        Self {
            url: Secret::new(url),
            node_id: node_id.into(),
            pool_size: 16,
            statement_timeout: Duration::from_secs(2),
            migrate: true,
            ca_file: None,
            keep_released: Some(DEFAULT_KEEP_RELEASED),
        }
    }
}

impl fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSettings")
            .field("url", &mask_url(self.url.expose()))
            .field("node_id", &self.node_id)
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("migrate", &self.migrate)
            .field("ca_file", &self.ca_file)
            .field("keep_released", &self.keep_released)
            .finish()
    }
}

/// The storage-operation observer: op name, duration (`None` for an operation refused
/// before it reached the database, such as an acquire while the node's session is down),
/// success.
pub type Observer = Arc<dyn Fn(&'static str, Option<Duration>, bool) + Send + Sync>;

/// A pool's figures as last read from the database, for acquire and release events.
struct CachedStats {
    stats: PoolStats,
    wanted: bool,
}

/// State shared by the handles and the background tasks.
pub(crate) struct Core {
    pool: Pool,
    node: Arc<str>,
    timeout: Duration,
    keep_released: Option<Duration>,
    scrub: Scrub,
    masked_url: String,
    /// Config ids of the proxies this node upserted.
    ids: IdMap,
    /// Pool ids by name, and names by id (NOTIFY payloads are ids).
    pool_ids: DashMap<Arc<str>, Uuid>,
    pool_names: DashMap<Uuid, Arc<str>>,
    consumers: DashMap<Arc<str>, Uuid>,
    /// Pools this node upserted (its config's), and those it dropped since: not offered by
    /// this node any more.
    own_pools: DashSet<Arc<str>>,
    withdrawn_pools: DashSet<Arc<str>>,
    /// Proxies this node dropped but does not own: this node stops leasing them.
    withdrawn_proxies: DashSet<Uuid>,
    signals: DashMap<Arc<str>, Arc<CapacitySignal>>,
    stats: DashMap<Arc<str>, CachedStats>,
    notify_tx: mpsc::UnboundedSender<Uuid>,
    retry_tx: mpsc::UnboundedSender<upkeep::Unsure>,
    statement_ok: AtomicBool,
    session_up: AtomicBool,
    observer: ArcSwapOption<Observer>,
}

/// The PostgreSQL storage backend. Cheap to clone: clones share one pool, one dedicated
/// session and one set of background tasks, which stop when the last clone is dropped or
/// [`PostgresStorage::close`] is called.
#[derive(Clone)]
pub struct PostgresStorage {
    inner: Arc<Inner>,
}

struct Inner {
    core: Arc<Core>,
    cancel: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl fmt::Debug for PostgresStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStorage")
            .field("url", &self.core().masked_url)
            .field("node_id", &self.core().node)
            .finish()
    }
}

impl PostgresStorage {
    /// Connects: opens the pool and the dedicated session, claims the node id (another live
    /// holder → [`PgError::NodeTaken`]), migrates (`s.migrate`) or checks the schema
    /// ([`PgError::Schema`] naming what is missing), releases this node's stale leases and
    /// starts listening for wake-ups.
    pub async fn connect(s: PgSettings) -> Result<Self, PgError> {
        let spec = conn::conn_spec(&s, Some(&s.node_id))?;
        let pool = build_pool(&spec, &s)?;
        let session = listen::Session::open(&spec, s.statement_timeout).await?;
        if !session.claim(&s.node_id).await? {
            let holder = session.holder(&s.node_id).await;
            tracing::error!(node = %s.node_id, holder = %holder, "node id is held by another live daemon");
            return Err(PgError::NodeTaken(s.node_id.clone()));
        }
        let (notify_tx, notify_rx) = mpsc::unbounded_channel();
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        let core = Arc::new(Core::new(pool, &s, &spec, notify_tx, retry_tx));
        let ready = async {
            if s.migrate {
                schema::migrate(session.client(), &spec.scrub).await?;
            }
            schema::require(session.client(), &spec.scrub).await?;
            session.register(&s.node_id).await?;
            core.release_stale().await?;
            session.listen().await
        };
        if let Err(e) = ready.await {
            // Not left to the session's end: a start retried at once would find it held.
            session.unclaim(&s.node_id).await;
            return Err(e);
        }
        core.session_up.store(true, Ordering::SeqCst);
        let cancel = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(listen::run(core.clone(), spec, session, cancel.clone())),
            tokio::spawn(upkeep::notifier(core.clone(), notify_rx, cancel.clone())),
            tokio::spawn(upkeep::release_retries(
                core.clone(),
                retry_rx,
                cancel.clone(),
            )),
            tokio::spawn(upkeep::stats_refresh(core.clone(), cancel.clone())),
        ];
        tracing::info!(node = %s.node_id, url = %core.masked_url, "postgres storage connected");
        Ok(Self {
            inner: Arc::new(Inner {
                core,
                cancel,
                tasks: Mutex::new(tasks),
            }),
        })
    }

    /// For `pharox check --connect`: connects (without claiming the node id), and reports
    /// the server version, what the schema lacks, the migration version, duplicate
    /// endpoints, counter drift and whether the node id is held right now.
    pub async fn check(s: &PgSettings) -> Result<CheckReport, PgError> {
        schema::check(s).await
    }

    /// This daemon's node id.
    pub fn node_id(&self) -> &str {
        &self.core().node
    }

    /// True while the last statement succeeded and the dedicated session (node lock,
    /// LISTEN) is alive.
    pub fn is_up(&self) -> bool {
        let core = self.core();
        core.statement_ok.load(Ordering::SeqCst) && core.session_up.load(Ordering::SeqCst)
    }

    /// Registers the observer of storage operations: called with the op name (`acquire`,
    /// `release`, `renew`, `sweep`, `stats`, `leases`, `consumer`, `inventory`, `health`,
    /// `notify`, `session`), its duration (`None`: refused without reaching the database) and
    /// whether it succeeded.
    pub fn set_observer(&self, f: Observer) {
        self.core().observer.store(Some(Arc::new(f)));
    }

    /// Pools this node removed from its inventory (it no longer offers them; the pool rows
    /// stay for the rest of the fleet), sorted.
    pub fn withdrawn_pools(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .core()
            .withdrawn_pools
            .iter()
            .map(|p| p.to_string())
            .collect();
        v.sort();
        v
    }

    /// Proxies this node removed but does not own (another node or Python does): this node
    /// no longer leases them; the rows are untouched.
    pub fn withdrawn_proxies(&self) -> Vec<ProxyId> {
        let core = self.core();
        let mut v: Vec<ProxyId> = core
            .withdrawn_proxies
            .iter()
            .map(|id| rows::proxy_id(&core.ids, *id))
            .collect();
        v.sort();
        v
    }

    /// Proxies whose counter disagrees with their live lease rows or exceeds the cap (the
    /// audit of the SQL lab; empty when all is well). `pool`: one pool or all.
    pub async fn audit(&self, pool: Option<&str>) -> Result<Vec<CounterDrift>, PgError> {
        let rows = self
            .core()
            .query("stats", sql::stmt("audit_counters"), &[&pool])
            .await?;
        schema::drifts(&rows, &self.core().scrub)
    }

    /// Shuts down: stops the background tasks (pending NOTIFYs are sent first), closes the
    /// dedicated session (releasing the node lock) and the pool. Leases stay as they are
    /// (release them before, or they expire).
    pub async fn close(&self) {
        self.inner.cancel.cancel();
        let tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
        let core = self.core();
        core.session_up.store(false, Ordering::SeqCst);
        core.pool.close();
    }

    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.inner.core
    }
}

fn build_pool(spec: &conn::ConnSpec, s: &PgSettings) -> Result<Pool, PgError> {
    let manager = deadpool_postgres::Manager::from_config(
        spec.config.clone(),
        spec.tls.clone(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let t = Some(s.statement_timeout);
    Pool::builder(manager)
        .max_size(s.pool_size.max(1))
        .wait_timeout(t)
        .create_timeout(t)
        .recycle_timeout(t)
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| PgError::InvalidUrl {
            url: spec.masked.clone(),
            reason: e.to_string(),
        })
}

impl Core {
    fn new(
        pool: Pool,
        s: &PgSettings,
        spec: &conn::ConnSpec,
        notify_tx: mpsc::UnboundedSender<Uuid>,
        retry_tx: mpsc::UnboundedSender<upkeep::Unsure>,
    ) -> Self {
        Self {
            pool,
            node: s.node_id.as_str().into(),
            timeout: s.statement_timeout,
            keep_released: s.keep_released,
            scrub: spec.scrub.clone(),
            masked_url: spec.masked.clone(),
            ids: DashMap::new(),
            pool_ids: DashMap::new(),
            pool_names: DashMap::new(),
            consumers: DashMap::new(),
            own_pools: DashSet::new(),
            withdrawn_pools: DashSet::new(),
            withdrawn_proxies: DashSet::new(),
            signals: DashMap::new(),
            stats: DashMap::new(),
            notify_tx,
            retry_tx,
            statement_ok: AtomicBool::new(true),
            session_up: AtomicBool::new(false),
            observer: ArcSwapOption::empty(),
        }
    }

    /// Runs one operation: bounded by the statement timeout (plus a little for the round
    /// trip), observed, and remembered for [`PostgresStorage::is_up`].
    async fn run<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, PgError>>,
    ) -> Result<T, PgError> {
        let started = Instant::now();
        let bound = self.timeout + Duration::from_millis(250);
        let result = match tokio::time::timeout(bound, fut).await {
            Ok(r) => r,
            Err(_) => Err(PgError::Timeout { op, after: bound }),
        };
        let ok = result.is_ok();
        self.statement_ok.store(ok, Ordering::SeqCst);
        self.observe(op, Some(started.elapsed()), ok);
        result
    }

    /// Reports one operation to the observer.
    fn observe(&self, op: &'static str, took: Option<Duration>, ok: bool) {
        if let Some(observer) = self.observer.load().as_ref() {
            observer(op, took, ok);
        }
    }

    /// A pooled connection.
    async fn client(&self, op: &'static str) -> Result<Object, PgError> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Timeout(_) => PgError::Timeout {
                op,
                after: self.timeout,
            },
            PoolError::Closed => PgError::Closed,
            PoolError::Backend(e) => self.stmt_err(op, &e),
            other => PgError::Pool {
                op,
                reason: self.scrub.text(other),
            },
        })
    }

    fn stmt_err(&self, op: &'static str, e: &tokio_postgres::Error) -> PgError {
        PgError::Statement {
            op,
            reason: self.scrub.db_error(e),
        }
    }

    /// Prepares (cached per connection) and runs one statement, inside `run`.
    async fn query(
        &self,
        op: &'static str,
        text: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, PgError> {
        self.run(op, self.query_now(op, text, params)).await
    }

    /// Prepares and runs one statement, bounded by the statement timeout (see
    /// [`Core::discard`]).
    async fn query_now(
        &self,
        op: &'static str,
        text: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, PgError> {
        let client = self.client(op).await?;
        let answer = tokio::time::timeout(self.timeout, async {
            let st = client.prepare_cached(text).await?;
            client.query(&st, params).await
        })
        .await;
        match answer {
            Ok(rows) => rows.map_err(|e| self.stmt_err(op, &e)),
            Err(_) => {
                self.discard(client);
                Err(PgError::Timeout {
                    op,
                    after: self.timeout,
                })
            }
        }
    }

    /// A connection that gave no answer in time is closed, and every idle one with it: the
    /// server or the network is in trouble (a partition leaves sockets that look alive),
    /// and fresh connections either work or fail fast.
    fn discard(&self, client: Object) {
        drop(Object::take(client));
        self.pool.retain(|_, _| false);
    }

    /// The signal of a pool, created on first use.
    fn signal(&self, pool: &str) -> Arc<CapacitySignal> {
        if let Some(s) = self.signals.get(pool) {
            return s.clone();
        }
        self.signals.entry(pool.into()).or_default().clone()
    }

    /// Wakes this process's waiters of a pool.
    fn wake_local(&self, pool: &str) {
        if let Some(s) = self.signals.get(pool) {
            s.notify();
        }
    }

    /// Wakes every local waiter (the dedicated session came back: NOTIFYs may be lost).
    fn wake_all(&self) {
        for s in self.signals.iter() {
            s.notify();
        }
    }

    /// Wakes the waiters of a pool everywhere: here at once, elsewhere by NOTIFY.
    fn wake_fleet(&self, pool_id: Uuid, pool_name: Option<&str>) {
        match pool_name {
            Some(name) => self.wake_local(name),
            None => {
                if let Some(name) = self.pool_names.get(&pool_id) {
                    self.wake_local(&name);
                }
            }
        }
        let _ = self.notify_tx.send(pool_id);
    }

    /// Remembers a pool's id.
    fn learn_pool(&self, name: &str, id: Uuid) {
        let name: Arc<str> = name.into();
        self.pool_ids.insert(name.clone(), id);
        self.pool_names.insert(id, name);
    }

    /// Queues a background release of a lease whose release failed.
    fn release_later(&self, id: LeaseId) {
        let _ = self.retry_tx.send(upkeep::Unsure::release(id));
    }

    /// Queues background releases of a lease id whose acquire may or may not have happened
    /// (the statement may still reach the server late, so it is released more than once).
    fn release_unknown_acquire(&self, id: LeaseId, duration: Duration) {
        let _ = self.retry_tx.send(upkeep::Unsure::acquire(id, duration));
    }
}

/// Errors from the driver inside an operation, for `?` with the op name.
trait Op<T> {
    fn op(self, core: &Core, op: &'static str) -> Result<T, PgError>;
}

impl<T> Op<T> for Result<T, tokio_postgres::Error> {
    fn op(self, core: &Core, op: &'static str) -> Result<T, PgError> {
        self.map_err(|e| core.stmt_err(op, &e))
    }
}
