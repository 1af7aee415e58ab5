//! Wiring: builds the lease engine and the proxy state from a config, binds nothing itself
//! (listeners come in, so tests use port 0), runs the listeners until shutdown, then closes
//! every connection and waits for their leases to be released.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::admin::{self, AdminState};
use crate::config::{Config, parse_upstream_url, proxy_id};
use crate::identity::Authenticator;
use crate::manager::ProxyManager;
use crate::model::{Credentials, Pool, Proxy, ProxyId, ProxyProtocol};
use crate::proxy::upstream::{Policy, UpstreamExtra, tls_connector};
use crate::proxy::{self, PoolRuntime, ProxyState};
use crate::storage::{InMemoryStorage, Storage};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The inventory was rejected by the lease engine.
    #[error("{0}")]
    Inventory(#[from] crate::storage::LeaseError),
    /// A TLS setting could not be used.
    #[error("{0}")]
    Tls(String),
    /// A listener problem.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The running daemon's handles.
pub struct Daemon {
    /// Shared proxy state (the lease engine is `state.manager`).
    pub state: Arc<ProxyState>,
    /// Admin state (readiness).
    pub admin: Arc<AdminState>,
    /// Where the proxy listens.
    pub proxy_addr: SocketAddr,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
}

/// Builds the engine, fills it from the config, and assembles the proxy state.
pub async fn build_state(
    config: &Config,
    own: Vec<SocketAddr>,
) -> Result<Arc<ProxyState>, AppError> {
    let manager = ProxyManager::new(InMemoryStorage::new());
    let storage = manager.storage();
    let mut pools = HashMap::new();
    let mut extras = HashMap::new();
    let mut tls_cache: HashMap<Option<PathBuf>, tokio_rustls::TlsConnector> = HashMap::new();
    for pc in &config.pools {
        storage.upsert_pool(Pool::new(pc.name.clone())).await?;
        for xc in &pc.proxies {
            let url = parse_upstream_url(&xc.url).expect("validated");
            let id = ProxyId::new(proxy_id(pc, xc).expect("validated"));
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
            p.country = xc.country.clone();
            p.city = xc.city.clone();
            p.source = xc.source.clone();
            p.isp = xc.isp.clone();
            p.asn = xc.asn;
            p.latitude = xc.latitude;
            p.longitude = xc.longitude;
            let mut extra = UpstreamExtra {
                bind: xc.bind,
                tls: None,
            };
            if url.protocol == ProxyProtocol::Https {
                let key = xc.ca_file.clone();
                let tls = match tls_cache.get(&key) {
                    Some(t) => t.clone(),
                    None => {
                        let t = tls_connector(key.as_deref()).map_err(AppError::Tls)?;
                        tls_cache.insert(key, t.clone());
                        t
                    }
                };
                extra.tls = Some(tls);
            }
            extras.insert(id, extra);
            storage.upsert_proxy(p).await?;
        }
        let runtime = PoolRuntime {
            selector: pc.selector,
            lease: Duration::from_secs(pc.lease_seconds),
            retry: pc.retry.policy(),
            failover: pc.failover_attempts,
            health: pc.health.clone(),
        };
        pools.insert(Arc::from(pc.name.as_str()), runtime);
    }
    let policy = Policy {
        allow_private: config.security.allow_private_targets,
        own,
    };
    Ok(Arc::new(ProxyState::new(
        manager,
        Authenticator::new(config),
        pools,
        extras,
        config.limits.clone(),
        policy,
    )))
}

impl Daemon {
    /// Starts the daemon on bound listeners. Returns at once; `run` drives it.
    pub async fn start(
        config: &Config,
        proxy: TcpListener,
        admin_listener: TcpListener,
    ) -> Result<(Daemon, Runner), AppError> {
        let proxy_addr = proxy.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let state = build_state(config, vec![proxy_addr, admin_addr]).await?;
        let admin = Arc::new(AdminState::default());
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

/// Runs the listeners of a started daemon.
pub struct Runner {
    state: Arc<ProxyState>,
    admin: Arc<AdminState>,
    proxy: TcpListener,
    admin_listener: TcpListener,
}

impl Runner {
    /// Serves until `shutdown` resolves, then closes every connection and waits until each
    /// one has released its lease.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let tracker = TaskTracker::new();
        let stop_accepting = CancellationToken::new();
        let sweeper = self.state.manager.spawn_sweeper(Duration::from_secs(1));
        let admin_task = tokio::spawn(admin::serve(
            self.admin_listener,
            self.admin.clone(),
            tracker.clone(),
            stop_accepting.clone(),
        ));
        let proxy_task = tokio::spawn(proxy::serve(
            self.proxy,
            self.state.clone(),
            tracker.clone(),
            stop_accepting.clone(),
        ));
        self.admin.ready.store(true, Ordering::Release);
        info!("pharox ready");
        shutdown.await;
        info!("shutting down");
        stop_accepting.cancel();
        self.state.cancel.cancel();
        let _ = tokio::join!(admin_task, proxy_task);
        tracker.close();
        tracker.wait().await;
        drop(sweeper);
        info!("stopped");
    }
}
