//! From a configuration to a running daemon's settings, at start and on reload: build the
//! runtime (TLS clients, identity tables, pool settings), then bring the lease engine's
//! inventory in line — pools and proxies added, changed, removed (removed ones drain: their
//! open connections go on, no new leases) — and swap the runtime in. An invalid config
//! changes nothing.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use tracing::{info, warn};

use crate::config::{Config, ConfigError, parse_upstream_url, proxy_id};
use crate::identity::Authenticator;
use crate::model::{Credentials, Pool, Proxy, ProxyId, ProxyInfo, ProxyProtocol};
use crate::proxy::held::Manager;
use crate::proxy::upstream::{UpstreamExtra, tls_connector};
use crate::proxy::{Extras, PoolRuntime, ProxyState, Runtime};
use crate::storage::{LeaseError, Storage};
use crate::target::Policy;

/// Why a configuration could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not load or validate.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A TLS setting could not be used.
    #[error("{0}")]
    Tls(String),
    /// The lease engine refused the inventory.
    #[error("{0}")]
    Inventory(#[from] LeaseError),
    /// The config was not validated (`Config::load` or `from_toml_str` validate).
    #[error("{0}")]
    Invalid(String),
    /// A listener's address could not be read.
    #[error("listener: {0}")]
    Listener(#[source] std::io::Error),
    /// The storage could not be opened (PostgreSQL unreachable, schema missing, node id
    /// taken).
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::postgres::PgError),
}

/// What a reload changed.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct ReloadReport {
    /// Pools created.
    pub pools_added: Vec<String>,
    /// Pools removed (they drain).
    pub pools_removed: Vec<String>,
    /// Proxies created.
    pub proxies_added: usize,
    /// Proxies whose record changed.
    pub proxies_changed: usize,
    /// Proxies removed (they drain).
    pub proxies_removed: usize,
    /// Settings that cannot change while running and were kept.
    pub warnings: Vec<String>,
}

/// The engine records a config describes, with the extras the engine does not carry.
fn inventory(config: &Config) -> Result<(Vec<Proxy>, Extras), ReloadError> {
    let mut proxies = Vec::new();
    let mut extras = HashMap::default();
    let mut tls_cache: HashMap<Option<PathBuf>, tokio_rustls::TlsConnector> = HashMap::new();
    for pc in &config.pools {
        for xc in &pc.proxies {
            let url = parse_upstream_url(&xc.url).map_err(ReloadError::Invalid)?;
            let id = ProxyId::new(proxy_id(pc, xc).map_err(ReloadError::Invalid)?);
            let mut p = Proxy::new(
                id.clone(),
                pc.name.clone(),
                url.protocol,
                url.host,
                url.port,
            );
            p.credentials = url.username.map(|u| Credentials {
                username: u,
                password: url.password.unwrap_or_default(),
            });
            p.max_concurrency = xc.max_concurrency;
            p.meta = xc.meta.clone();
            let mut extra = UpstreamExtra {
                bind: xc.bind,
                tls: None,
            };
            if url.protocol == ProxyProtocol::Https {
                let key = xc.ca_file.clone();
                let tls = match tls_cache.get(&key) {
                    Some(t) => t.clone(),
                    None => {
                        let t = tls_connector(key.as_deref()).map_err(ReloadError::Tls)?;
                        tls_cache.insert(key, t.clone());
                        t
                    }
                };
                extra.tls = Some(tls);
            }
            extras.insert(id, extra);
            proxies.push(p);
        }
    }
    Ok((proxies, extras))
}

/// Builds the runtime settings of a validated config.
fn runtime(
    config: Config,
    extras: Extras,
    own: Vec<SocketAddr>,
    discovered: Vec<Arc<str>>,
) -> Runtime {
    let defaults = crate::config::PoolConfig::named("");
    let pools = config
        .pools
        .iter()
        .map(|pc| (Arc::from(pc.name.as_str()), PoolRuntime::from_config(pc)))
        .chain(
            discovered
                .iter()
                .map(|name| (name.clone(), PoolRuntime::from_config(&defaults))),
        )
        .collect();
    let policy = Policy {
        allow_private: config.security.allow_private_targets,
        own,
    };
    Runtime {
        auth: Authenticator::new(&config, &discovered),
        pools,
        extras,
        policy,
        config,
        discovered,
    }
}

/// Pools of the storage that the config does not name (made by Python pharox, another
/// daemon or the lease API), sorted.
async fn discover(manager: &Manager, config: &Config) -> Result<Vec<Arc<str>>, LeaseError> {
    let mut found: Vec<Arc<str>> = manager
        .storage()
        .list_pools()
        .await?
        .into_iter()
        .map(|(p, _)| p.name)
        .filter(|name| !config.pools.iter().any(|pc| pc.name == *name))
        .map(Arc::from)
        .collect();
    found.sort();
    Ok(found)
}

/// Brings the runtime's list of storage-only pools up to date (they are leasable with
/// default settings by consumers allowed every pool). Cheap when nothing changed.
pub async fn refresh_pools(state: &ProxyState) -> Result<bool, LeaseError> {
    let _one_at_a_time = state.reload_lock.lock().await;
    let current = state.runtime.load_full();
    let found = discover(&state.manager, &current.config).await?;
    if found == current.discovered {
        return Ok(false);
    }
    info!(pools = ?found, "pools of the storage not in the config");
    state.runtime.store(Arc::new(runtime(
        current.config.clone(),
        current.extras.clone(),
        current.policy.own.clone(),
        found,
    )));
    Ok(true)
}

/// Checks, before anything changes, that `proxies` can be applied: no id may move from one
/// pool to another (the old one may still carry leases; give the moved proxy a new `id`).
async fn check_inventory(manager: &Manager, proxies: &[Proxy]) -> Result<(), ReloadError> {
    let storage = manager.storage();
    let mut problems = Vec::new();
    for p in proxies {
        if let Some(old) = storage.get_proxy(&p.id).await?
            && old.proxy.pool != p.pool
        {
            problems.push(format!(
                "proxy `{}` is in pool `{}` and cannot move to `{}`; give it another `id`",
                p.id, old.proxy.pool, p.pool
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ReloadError::Invalid(problems.join("; ")))
    }
}

/// Brings the engine's inventory in line with `proxies` (grouped by their pools), one batch
/// of upserts. Removed are the pools and proxies of `previous` (the running config) that
/// `config` no longer has, and those of the storage that this node's config once put there
/// (its node id is their owner); never what the lease API or another client made.
async fn sync_inventory(
    manager: &Manager,
    previous: Option<&Config>,
    config: &Config,
    proxies: Vec<Proxy>,
    report: &mut ReloadReport,
) -> Result<(), LeaseError> {
    let storage = manager.storage();
    let owner: Arc<str> = Arc::from(config.storage.node());
    let existing_pools: HashMap<String, Option<Arc<str>>> = storage
        .list_pools()
        .await?
        .into_iter()
        .map(|(p, _)| (p.name, p.owner))
        .collect();
    let wanted_pools: HashSet<&str> = config.pools.iter().map(|p| p.name.as_str()).collect();
    for pc in &config.pools {
        if !existing_pools.contains_key(&pc.name) {
            report.pools_added.push(pc.name.clone());
        }
        let mut pool = Pool::new(pc.name.clone());
        pool.lease_slow = pc.lease_slow;
        pool.owner = Some(owner.clone());
        storage.upsert_pool(pool).await?;
    }
    // Keyed by UUID: a storage names a proxy this process has not upserted yet (every proxy,
    // at start) by its UUID text, not by the config id it was stored under.
    let mut existing: HashMap<uuid::Uuid, ProxyInfo> = HashMap::new();
    for name in existing_pools.keys() {
        for info in storage.list_proxies(name).await? {
            existing.insert(info.proxy.id.uuid(), info);
        }
    }
    let wanted: HashSet<uuid::Uuid> = proxies.iter().map(|p| p.id.uuid()).collect();
    let mut batch = Vec::with_capacity(proxies.len());
    for mut p in proxies {
        p.owner = Some(owner.clone());
        match existing.get(&p.id.uuid()) {
            Some(old) if !old.draining => {
                // Live state (a ban, a rest, measured latency) survives a reload.
                p.status = old.proxy.status;
                p.checked_at = old.proxy.checked_at;
                p.latency = old.proxy.latency;
                p.rest_until = old.proxy.rest_until;
                if !same_record(&old.proxy, &p) {
                    report.proxies_changed += 1;
                }
            }
            _ => report.proxies_added += 1,
        }
        batch.push(p);
    }
    storage.upsert_proxies(batch).await?;
    let (before_proxies, before_pools) = match previous {
        Some(c) => (
            config_ids(c),
            c.pools.iter().map(|p| p.name.clone()).collect(),
        ),
        None => (HashSet::new(), HashSet::new()),
    };
    let ours = |o: &Option<Arc<str>>| o.as_deref() == Some(&*owner);
    for (uuid, info) in &existing {
        let id = &info.proxy.id;
        let mine = ours(&info.proxy.owner) || before_proxies.contains(uuid);
        if !info.draining && !wanted.contains(uuid) && mine && storage.remove_proxy(id).await? {
            report.proxies_removed += 1;
        }
    }
    for (pool, pool_owner) in &existing_pools {
        let mine = ours(pool_owner) || before_pools.contains(pool);
        if !wanted_pools.contains(pool.as_str()) && mine && storage.remove_pool(pool).await? {
            report.pools_removed.push(pool.clone());
        }
    }
    Ok(())
}

/// The UUIDs of the proxies a config defines.
fn config_ids(config: &Config) -> HashSet<uuid::Uuid> {
    config
        .pools
        .iter()
        .flat_map(|pc| {
            pc.proxies
                .iter()
                .filter_map(move |xc| proxy_id(pc, xc).ok())
        })
        .map(|id| ProxyId::new(id).uuid())
        .collect()
}

fn same_record(a: &Proxy, b: &Proxy) -> bool {
    (
        &a.host,
        a.port,
        a.protocol,
        &a.credentials,
        a.max_concurrency,
    ) == (
        &b.host,
        b.port,
        b.protocol,
        &b.credentials,
        b.max_concurrency,
    ) && a.meta == b.meta
}

/// Fills a fresh engine from `config` and returns the first runtime.
pub async fn initial(
    manager: &Manager,
    config: Config,
    own: Vec<SocketAddr>,
) -> Result<Runtime, ReloadError> {
    let (proxies, extras) = inventory(&config)?;
    check_inventory(manager, &proxies).await?;
    sync_inventory(
        manager,
        None,
        &config,
        proxies,
        &mut ReloadReport::default(),
    )
    .await?;
    let discovered = discover(manager, &config).await?;
    Ok(runtime(config, extras, own, discovered))
}

/// Applies a new, already validated config to a running daemon: all or nothing (everything
/// that can be refused is checked before the first change), one reload at a time.
pub async fn apply(state: &ProxyState, config: Config) -> Result<ReloadReport, ReloadError> {
    let _one_at_a_time = state.reload_lock.lock().await;
    apply_locked(state, config).await
}

async fn apply_locked(state: &ProxyState, config: Config) -> Result<ReloadReport, ReloadError> {
    let current = state.runtime.load_full();
    let mut report = ReloadReport::default();
    let mut config = config;
    if config.listen != current.config.listen {
        report.warnings.push(format!(
            "listen: {} → {} needs a restart; kept {}",
            current.config.listen, config.listen, current.config.listen
        ));
        config.listen = current.config.listen;
    }
    if config.admin.listen != current.config.admin.listen {
        report.warnings.push(format!(
            "admin.listen: {} → {} needs a restart; kept {}",
            current.config.admin.listen, config.admin.listen, current.config.admin.listen
        ));
        config.admin.listen = current.config.admin.listen;
    }
    if config.worker_threads != current.config.worker_threads {
        report
            .warnings
            .push("worker_threads needs a restart; kept the running value".into());
        config.worker_threads = current.config.worker_threads;
    }
    if config.storage != current.config.storage {
        report
            .warnings
            .push("storage needs a restart; kept the running settings".into());
        config.storage = current.config.storage.clone();
    }
    if config.limits.max_connections != current.config.limits.max_connections {
        report
            .warnings
            .push("limits.max_connections needs a restart; kept the running value".into());
        config.limits.max_connections = current.config.limits.max_connections;
    }
    let (proxies, extras) = inventory(&config)?;
    check_inventory(&state.manager, &proxies).await?;
    sync_inventory(
        &state.manager,
        Some(&current.config),
        &config,
        proxies,
        &mut report,
    )
    .await?;
    let discovered = discover(&state.manager, &config).await?;
    state.runtime.store(Arc::new(runtime(
        config,
        extras,
        current.policy.own.clone(),
        discovered,
    )));
    for w in &report.warnings {
        warn!("{w}");
    }
    info!(?report, "configuration reloaded");
    Ok(report)
}

/// Loads `path`, validates and applies it; counts the result. The running config stays on
/// any error.
pub async fn reload_from(
    state: &ProxyState,
    path: &std::path::Path,
) -> Result<ReloadReport, ReloadError> {
    // The file is read under the lock too, so the last reload applies the newest file.
    let _one_at_a_time = state.reload_lock.lock().await;
    let result = match Config::load(path) {
        Ok(config) => apply_locked(state, config).await,
        Err(e) => Err(e.into()),
    };
    match &result {
        Ok(_) => state.metrics.reload("ok"),
        Err(e) => {
            state.metrics.reload("invalid");
            warn!(error = %e, "configuration rejected; the running one stays");
        }
    }
    result
}
