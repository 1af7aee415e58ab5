//! pharox: a lease engine for pools of upstream proxies, and the daemon built on it.
//!
//! Module map:
//! - [`model`]: pools, proxies, consumers, leases, pool statistics.
//! - [`filter`]: the filter language (scalar fields, geo radius, combinators, predicates).
//! - [`selector`]: selector strategies.
//! - [`storage`]: the storage contract, the in-memory backend and the PostgreSQL one (fleet
//!   mode).
//! - [`manager`]: [`ProxyManager`] (acquire, retry, release, renew, cleanup, callbacks) and
//!   [`LeaseGuard`].
//! - [`retry`]: retry policy and the clock/sleeper seams.
//! - [`events`]: acquire and release event payloads.
//!
//! The daemon:
//! - [`config`]: configuration (figment: TOML + `PHAROX_…` environment), validation.
//! - [`cli`]: command line.
//! - [`identity`]: credentials, the username grammar, identity headers.
//! - [`error`]: errors answered to clients and their HTTP form.
//! - [`proxy`]: the proxy listener (CONNECT, plain HTTP, upstream dialing, splicing).
//! - [`health`]: active health checks.
//! - [`admin`]: the admin listener and its API.
//! - [`api`]: the lease API (`/v1/`, what `pharox-sdk` speaks).
//! - [`metrics`]: Prometheus metrics.
//! - [`reload`]: building settings from a config, diffing and applying them to a running daemon.
//! - [`app`]: wiring, the run loop, graceful shutdown.
//! - [`systemd`]: readiness notification.
//! - [`target`]: destinations (validated hosts and ports) and the destination policy.
//!
//! ```
//! use pharox::{AcquireRequest, InMemoryStorage, Pool, Proxy, ProxyManager, ProxyProtocol, Storage};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let manager = ProxyManager::new(InMemoryStorage::new());
//! manager.storage().upsert_pool(Pool::new("latam")).await?;
//! let proxy = Proxy::new("p1", "latam", ProxyProtocol::Http, "10.0.0.1", 8080);
//! manager.storage().upsert_proxy(proxy.with_max_concurrency(Some(1))).await?;
//!
//! let lease = manager.acquire_proxy(&AcquireRequest::new("latam")).await?.expect("free");
//! assert!(manager.acquire_proxy(&AcquireRequest::new("latam")).await?.is_none());
//! manager.release_proxy(&lease).await?;
//! # Ok::<(), pharox::LeaseError>(())
//! # }).unwrap();
//! ```

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms, missing_docs)]

pub mod admin;
pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod error;
pub mod events;
pub mod filter;
pub mod health;
pub mod identity;
pub mod manager;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod reload;
pub mod retry;
pub mod selector;
pub mod storage;
pub mod systemd;
pub mod target;

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use events::{AcquireEvent, ReleaseEvent};
pub use filter::{Filter, FilterError};
pub use manager::{LeaseGuard, ProxyManager, SweeperHandle};
pub use model::{
    Consumer, Credentials, DEFAULT_CONSUMER_NAME, HealthCheck, Lease, LeaseId, LeaseStatus, Pool,
    PoolStats, Proxy, ProxyId, ProxyInfo, ProxyMeta, ProxyProtocol, ProxyStatus, Secret,
};
pub use retry::{Clock, RetryPolicy, Sleeper};
pub use selector::Selector;
pub use storage::{AcquireRequest, InMemoryStorage, LeaseError, PostgresStorage, Storage};
