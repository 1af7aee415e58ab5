//! Wiring: builds the lease engine and the proxy state from a config, runs the listeners it
//! is given (tests pass port-0 listeners), and shuts down gracefully: stop accepting, let open
//! connections drain up to the deadline, then close the rest; every lease is released before
//! `run` returns.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::config::{StorageConfig, StorageKind};
use crate::manager::ProxyManager;
use crate::metrics::Metrics;
use crate::proxy::{self, ProxyState};
use crate::reload::{self, ReloadError};
use crate::storage::postgres::{PgSettings, PostgresStorage};
use crate::storage::{AnyStorage, InMemoryStorage};
use crate::systemd;

/// A started daemon: its state and where it listens.
pub struct Daemon {
    /// Shared proxy state (the lease engine is `state.manager`).
    pub state: Arc<ProxyState>,
    /// Admin state (readiness, reload source).
    pub admin: Arc<AdminState>,
    /// Where the proxy listens.
    pub proxy_addr: SocketAddr,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
}

/// Drives a started daemon's listeners.
pub struct Runner {
    state: Arc<ProxyState>,
    admin: Arc<AdminState>,
    proxy: TcpListener,
    admin_listener: TcpListener,
}

impl Daemon {
    /// Builds everything on bound listeners. `config_path` is what reloads re-read.
    pub async fn start(
        config: Config,
        config_path: Option<PathBuf>,
        proxy: TcpListener,
        admin_listener: TcpListener,
    ) -> Result<(Daemon, Runner), ReloadError> {
        let proxy_addr = proxy.local_addr().map_err(ReloadError::Listener)?;
        let admin_addr = admin_listener.local_addr().map_err(ReloadError::Listener)?;
        let metrics = Arc::new(Metrics::new());
        let manager = ProxyManager::new(open_storage(&config, &metrics).await?);
        let runtime = reload::initial(&manager, config, vec![proxy_addr, admin_addr]).await?;
        let state = Arc::new(ProxyState::new(manager, runtime, metrics));
        let admin = Arc::new(AdminState::new(config_path));
        let daemon = Daemon {
            state: state.clone(),
            admin: admin.clone(),
            proxy_addr,
            admin_addr,
        };
        Ok((
            daemon,
            Runner {
                state,
                admin,
                proxy,
                admin_listener,
            },
        ))
    }
}

/// The storage the config names: in memory, or PostgreSQL (connected, node id claimed,
/// schema migrated or checked; its operations feed the storage metrics).
async fn open_storage(config: &Config, metrics: &Arc<Metrics>) -> Result<AnyStorage, ReloadError> {
    let st = &config.storage;
    match st.kind {
        StorageKind::Memory => Ok(AnyStorage::from(InMemoryStorage::new())),
        StorageKind::Postgres => {
            let pg = PostgresStorage::connect(pg_settings(st)?).await?;
            let m = metrics.clone();
            pg.set_observer(Arc::new(move |op, took, ok| m.storage_op(op, took, ok)));
            metrics.storage_up(true);
            Ok(AnyStorage::Postgres(pg))
        }
    }
}

/// The PostgreSQL settings of `[storage]`.
pub fn pg_settings(st: &StorageConfig) -> Result<PgSettings, ReloadError> {
    let url = st
        .url
        .as_ref()
        .ok_or_else(|| ReloadError::Invalid("storage.url: required for postgres".into()))?;
    let mut s = PgSettings::new(url.expose(), st.node());
    s.pool_size = st.pool_size;
    s.statement_timeout = st.statement_timeout();
    s.migrate = st.migrate;
    s.ca_file = st.ca_file.clone();
    s.keep_released = st.keep_released();
    Ok(s)
}

impl Runner {
    /// Serves until `shutdown` resolves, then drains and stops.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let state = self.state;
        let bg = &state.background;
        let sweeper = state.manager.spawn_sweeper(Duration::from_secs(1));
        bg.spawn(every(Duration::from_secs(5), state.stop.clone(), {
            let (metrics, manager) = (state.metrics.clone(), state.manager.clone());
            move || {
                metrics.upkeep();
                metrics.storage_up(manager.storage().is_up());
                async {}
            }
        }));
        bg.spawn(every(crate::proxy::held::RENEW_TICK, state.stop.clone(), {
            let state = state.clone();
            move || {
                let state = state.clone();
                async move {
                    state.renew_held().await;
                }
            }
        }));
        let checks = bg.spawn(crate::health::run(state.clone(), state.drain.clone()));
        let admin_task = bg.spawn(admin::serve(
            self.admin_listener,
            self.admin.clone(),
            state.clone(),
            state.stop.clone(),
        ));
        let proxy_task = tokio::spawn(proxy::serve(self.proxy, state.clone()));
        self.admin.ready.store(true, Ordering::Release);
        systemd::notify("READY=1");
        info!("pharox ready");

        shutdown.await;
        let grace = state.runtime.load().limits().drain_timeout();
        info!(
            ?grace,
            "shutting down: no new connections, draining open ones"
        );
        systemd::notify("STOPPING=1");
        self.admin.ready.store(false, Ordering::Release);
        state.drain.cancel();
        let _ = proxy_task.await;
        let _ = checks.await;
        state.tracker.close();
        if tokio::time::timeout(grace, state.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                open = state.tracker.len(),
                "drain deadline reached; closing the remaining connections"
            );
            state.close_all();
            state.tracker.wait().await;
        }
        // Sessions hold leases between connections; with every connection gone, end them.
        state.end_sessions();
        state.stop.cancel();
        bg.close();
        bg.wait().await;
        // A database backend releases on its own time: wait for it before the end.
        if !state.manager.flush(grace).await {
            warn!("some leases could not be released in time; they will expire");
        }
        if let AnyStorage::Postgres(pg) = state.manager.storage() {
            pg.close().await;
        }
        drop(admin_task);
        drop(sweeper);
        info!("stopped");
    }
}

/// Runs `tick` every `period` until `stop` is cancelled (a missed tick is delayed, not
/// bunched).
async fn every<F, Fut>(period: Duration, stop: tokio_util::sync::CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = interval.tick() => tick().await,
        }
    }
}

/// Binds a listener with an accept queue of `backlog` connections (`SO_REUSEADDR` on, so a
/// restart does not wait for old sockets in TIME_WAIT).
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The tokio runtime for `config`: the single-threaded scheduler for one worker (no
/// work-stealing machinery and no second thread to hand tasks to), the multi-threaded one
/// with `config.workers()` workers otherwise.
pub fn runtime(config: &Config) -> std::io::Result<tokio::runtime::Runtime> {
    match config.workers() {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
}

#[cfg(test)]
mod tests {
    use tokio::runtime::RuntimeFlavor;

    use super::*;

    #[test]
    fn one_worker_runs_the_single_threaded_scheduler() {
        let mut config = Config {
            worker_threads: 1,
            ..Config::default()
        };
        let rt = runtime(&config).unwrap();
        assert_eq!(rt.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        config.worker_threads = 2;
        let rt = runtime(&config).unwrap();
        assert_eq!(rt.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(rt.metrics().num_workers(), 2);
        config.worker_threads = 0;
        assert!(config.workers() >= 1);
    }
}
