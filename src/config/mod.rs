//! The daemon's configuration: serde structs with defaults, loading with figment (a TOML file
//! overridden by `PHAROX_…` environment variables, `__` for nesting), `proxies_file` parsing,
//! and `validate()`, which reports every problem with its key path.
//!
//! Nothing else in the crate knows serde's config attributes or figment. Validation is in
//! `validate.rs`, upstream URLs and `proxies_file` lines in `upstream.rs`.

mod upstream;
mod validate;

pub use upstream::{
    UpstreamUrl, mask_url, parse_proxy_line, parse_upstream_url, percent_decode, proxy_id,
    split_host_port,
};

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

use crate::model::{ProxyMeta, Secret};
use crate::retry::RetryPolicy;
use crate::selector::Selector;

/// Keys of the username grammar (`identity.rs`); a consumer name may not contain one as a
/// whole segment.
pub const USERNAME_KEYS: &[&str] = &[
    "pool", "country", "city", "source", "isp", "asn", "session", "ttl", "lease",
];

/// Default config path, relative to the working directory.
pub const DEFAULT_PATH: &str = "config/pharox.toml";
/// Environment variable that names the config file.
pub const PATH_ENV: &str = "PHAROX_CONFIG";

/// A configuration that cannot be used, with every reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The named file does not exist or cannot be read.
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        reason: String,
    },
    /// The file or an environment variable does not parse (figment names the key and source).
    #[error("{0}")]
    Parse(String),
    /// Values parse but do not make sense together.
    #[error("invalid configuration{}:\n  - {}", .file.as_ref().map(|f| format!(" in {}", f.display())).unwrap_or_default(), .problems.join("\n  - "))]
    Invalid {
        /// The file, when loaded from one.
        file: Option<PathBuf>,
        /// One line per problem, each starting with its key path.
        problems: Vec<String>,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Proxy listener (HTTP CONNECT and plain HTTP). Default `127.0.0.1:8899`.
    pub listen: SocketAddr,
    /// Pool used when neither header, username nor consumer names one. Default: the only
    /// pool, if there is exactly one.
    pub default_pool: Option<String>,
    /// Admin listener.
    pub admin: AdminConfig,
    /// Client authentication.
    pub auth: AuthConfig,
    /// Sizes, counts and timeouts.
    pub limits: LimitsConfig,
    /// Threads serving connections: 0 (default) = one per CPU this process may run on. With
    /// one, the daemon runs tokio's single-threaded scheduler. Read at start only.
    pub worker_threads: usize,
    /// Safety switches.
    pub security: SecurityConfig,
    /// Who may use the daemon.
    pub consumers: Vec<ConsumerConfig>,
    /// The pools of upstreams.
    pub pools: Vec<PoolConfig>,
    /// Where the lease state lives.
    pub storage: StorageConfig,
    /// The lease API (SPEC §7) on the admin listener.
    pub api: ApiConfig,
}

/// Most `worker_threads` accepted.
pub const MAX_WORKER_THREADS: usize = 1024;

impl Config {
    /// The number of worker threads to run: `worker_threads`, or one per CPU available to
    /// this process (its affinity mask included) when 0.
    pub fn workers(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8899)),
            default_pool: None,
            admin: AdminConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            worker_threads: 0,
            security: SecurityConfig::default(),
            consumers: Vec::new(),
            pools: Vec::new(),
            storage: StorageConfig::default(),
            api: ApiConfig::default(),
        }
    }
}

/// `[storage] kind`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    /// In this process (the default): nothing to set up, nothing shared.
    #[default]
    Memory,
    /// PostgreSQL, shared by every daemon (and Python pharox worker) of a fleet.
    Postgres,
}

/// `[storage]`: where leases, counters and health live (SPEC §6).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `memory` (default) or `postgres`.
    pub kind: StorageKind,
    /// `postgres://user:pass@host:5432/db?sslmode=require`; never logged or shown (the
    /// password is masked everywhere).
    pub url: Option<Secret>,
    /// Name of an environment variable holding the URL (instead of `url`).
    pub url_env: Option<String>,
    /// This daemon's name in the fleet (unique; default: the host name). Its leases carry
    /// it, and a second live daemon with the same one is refused at start.
    pub node_id: Option<String>,
    /// Database connections in the pool (plus one for LISTEN and the node lock). Default 16.
    pub pool_size: usize,
    /// Longest a statement may take, in ms; past it the client gets 503
    /// `storage_unavailable`. Default 2000.
    pub statement_timeout_ms: u64,
    /// Create missing tables and add pharox's columns and indexes at start (additive only;
    /// Python pharox keeps working). Default true.
    pub migrate: bool,
    /// PEM file with CA certificates trusted for the database's TLS certificate, besides the
    /// system's.
    pub ca_file: Option<PathBuf>,
    /// Hours released leases stay in the `lease` table as history before the sweeping node
    /// deletes them; 0 keeps them for good (as Python pharox does). Default 24.
    pub keep_released_hours: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            kind: StorageKind::Memory,
            url: None,
            url_env: None,
            node_id: None,
            pool_size: 16,
            statement_timeout_ms: 2000,
            migrate: true,
            ca_file: None,
            keep_released_hours: 24,
        }
    }
}

impl StorageConfig {
    /// `keep_released_hours` as a duration; `None` for 0 (kept for good).
    pub fn keep_released(&self) -> Option<Duration> {
        (self.keep_released_hours > 0)
            .then(|| Duration::from_secs(self.keep_released_hours.saturating_mul(3600)))
    }

    /// `statement_timeout_ms` as a duration.
    pub fn statement_timeout(&self) -> Duration {
        Duration::from_millis(self.statement_timeout_ms)
    }

    /// The node id: `node_id`, else the host name, else `pharox`.
    pub fn node(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "pharox".into())
        })
    }
}

/// `[api]`: the lease API (`/v1/…` on the admin listener, what `pharox-sdk` speaks). Off — every
/// `/v1/` route answers 404 — unless at least one key is configured.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// The keys clients send in `X-API-Key`.
    pub keys: Vec<ApiKeyConfig>,
}

/// `[[api.keys]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// A name for logs (never the key itself).
    pub name: String,
    /// The key, inline.
    pub key: Option<Secret>,
    /// Name of an environment variable holding the key.
    pub key_env: Option<String>,
    /// Consumer names this key may lease as (`[]`, the default: any name; names the config
    /// does not define are created on first use).
    #[serde(default)]
    pub consumers: Vec<String>,
    /// May create, change and delete pools and proxies (default false: leases only).
    #[serde(default)]
    pub manage: bool,
    /// Lease responses carry the upstream's credentials (`proxy.password`, `proxy.url`), for
    /// clients that connect to the upstream themselves. Default false: the one place
    /// credentials would leave the daemon needs this explicitly.
    #[serde(default)]
    pub reveal_credentials: bool,
    /// Longest `ttl_seconds` a lease may ask for. Default 86 400.
    #[serde(default = "default_api_max_ttl")]
    pub max_ttl_seconds: u64,
}

fn default_api_max_ttl() -> u64 {
    86_400
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Admin listener (`/healthz`, `/readyz`, later `/metrics` and the API). Default
    /// `127.0.0.1:9899`.
    pub listen: SocketAddr,
    /// Bearer token required on `/api/v1` when set.
    pub token: Option<Secret>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9899)),
            token: None,
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Require valid credentials (407 otherwise). Default `true`.
    pub required: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { required: true }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open client connections at most; further clients are answered at once with 503
    /// `too_many_connections` (SOCKS5: no acceptable method). Default 10 000.
    pub max_connections: usize,
    /// Length of the proxy listener's accept queue (connections the kernel holds before the
    /// daemon accepts them). Default 1024.
    pub listen_backlog: u32,
    /// Sticky sessions one consumer may have at once; more are refused with 429
    /// `session_limit`. Default 1000.
    pub max_sessions_per_consumer: usize,
    /// Largest request head in bytes. Default 65 536.
    pub max_head_bytes: usize,
    /// Time to receive a whole request head, in ms. Default 10 000.
    pub head_timeout_ms: u64,
    /// Time to connect to an upstream and finish its handshake, in ms. Default 10 000.
    pub connect_timeout_ms: u64,
    /// Plain HTTP: time for an upstream to start answering a request (its response head),
    /// in ms; then 504 `upstream_timeout`. Default 30 000.
    pub response_timeout_ms: u64,
    /// A tunnel with no byte in either direction for this long is closed, in seconds
    /// (0 = never). Default 300.
    pub idle_timeout_secs: u64,
    /// On shutdown, how long open connections may finish before they are closed, in
    /// seconds. Default 30.
    pub drain_timeout_secs: u64,
    /// Move bulk tunnel traffic between plain TCP sockets with `splice(2)` (Linux), without
    /// copying it through the daemon. Default true.
    pub zero_copy: bool,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            listen_backlog: 1024,
            max_sessions_per_consumer: 1000,
            max_head_bytes: 64 * 1024,
            head_timeout_ms: 10_000,
            connect_timeout_ms: 10_000,
            response_timeout_ms: 30_000,
            idle_timeout_secs: 300,
            drain_timeout_secs: 30,
            zero_copy: true,
        }
    }
}

impl LimitsConfig {
    /// `head_timeout_ms` as a duration.
    pub fn head_timeout(&self) -> Duration {
        Duration::from_millis(self.head_timeout_ms)
    }

    /// `connect_timeout_ms` as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// `response_timeout_ms` as a duration.
    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.response_timeout_ms)
    }

    /// `drain_timeout_secs` as a duration.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    /// `idle_timeout_secs` as a duration (`None`: never).
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_secs > 0).then(|| Duration::from_secs(self.idle_timeout_secs))
    }
}

/// `[security]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Allow `auth.required = false` on a non-loopback listener. Default `false`.
    pub allow_open_non_loopback: bool,
    /// Allow `direct` upstreams to reach loopback and link-local addresses. Default `false`.
    pub allow_private_targets: bool,
}

/// `[[consumers]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Name: the first part of the proxy username.
    pub name: String,
    /// Password, inline.
    pub password: Option<Secret>,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// Pools this consumer may use (empty = all).
    #[serde(default)]
    pub pools: Vec<String>,
    /// Pool used when the request names none.
    pub default_pool: Option<String>,
}

/// `[[pools]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Unique name.
    pub name: String,
    /// Selector strategy. Default `first_available`.
    #[serde(default)]
    pub selector: Selector,
    /// Lease length; renewed while the connection is open. Default 300.
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u64,
    /// Sticky-session idle TTL. Default 600.
    #[serde(default = "default_session_ttl")]
    pub session_ttl_seconds: u64,
    /// Largest TTL a username's `-ttl-` may ask for (larger ones are capped). Default 3600.
    #[serde(default = "default_session_max_ttl")]
    pub session_max_ttl_seconds: u64,
    /// Other upstreams tried when one fails to connect. Default 2.
    #[serde(default = "default_failover")]
    pub failover_attempts: u32,
    /// How to wait for a free upstream.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Passive health: when to rest a failing upstream.
    #[serde(default)]
    pub health: PassiveHealthConfig,
    /// Active health checks (off unless this table is present).
    pub health_check: Option<HealthCheckConfig>,
    /// Lease `slow` proxies too. Default `true`.
    #[serde(default = "yes")]
    pub lease_slow: bool,
    /// Upstreams listed inline.
    #[serde(default)]
    pub proxies: Vec<ProxyConfig>,
    /// A file with one upstream per line: `URL [key=value ...]`.
    pub proxies_file: Option<PathBuf>,
}

impl PoolConfig {
    /// A pool with every setting at its default and no upstream (the settings of a pool that
    /// exists only in the storage).
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            selector: Selector::default(),
            lease_seconds: default_lease_seconds(),
            session_ttl_seconds: default_session_ttl(),
            session_max_ttl_seconds: default_session_max_ttl(),
            failover_attempts: default_failover(),
            retry: RetryConfig::default(),
            health: PassiveHealthConfig::default(),
            health_check: None,
            lease_slow: yes(),
            proxies: Vec::new(),
            proxies_file: None,
        }
    }
}

fn default_lease_seconds() -> u64 {
    300
}

fn default_session_ttl() -> u64 {
    600
}

fn yes() -> bool {
    true
}

fn default_session_max_ttl() -> u64 {
    3600
}

fn default_failover() -> u32 {
    2
}

/// `[pools.retry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all. Default 3.
    pub max_attempts: u32,
    /// Sleep before the second attempt, in ms. Default 250.
    pub backoff_ms: u64,
    /// Growth per attempt. Default 2.
    pub multiplier: f64,
    /// Cap on one sleep, in ms (0 = none). Default 2000.
    pub max_backoff_ms: u64,
    /// Random shortening of each sleep, 0..1. Default 0.
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff_ms: 250,
            multiplier: 2.0,
            max_backoff_ms: 2000,
            jitter: 0.0,
        }
    }
}

impl RetryConfig {
    /// The engine's policy.
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            backoff: Duration::from_millis(self.backoff_ms),
            multiplier: self.multiplier,
            max_backoff: (self.max_backoff_ms > 0)
                .then(|| Duration::from_millis(self.max_backoff_ms)),
            jitter: self.jitter,
        }
    }
}

/// `[pools.health]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveHealthConfig {
    /// Consecutive connect failures that put an upstream in cooldown. Default 3.
    pub max_failures: u32,
    /// Length of the cooldown, in seconds. Default 30.
    pub cooldown_seconds: u64,
}

impl Default for PassiveHealthConfig {
    fn default() -> Self {
        Self {
            max_failures: 3,
            cooldown_seconds: 30,
        }
    }
}

/// `[pools.health_check]`: periodic probes through every upstream of the pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// `host:port` the probe opens a tunnel to.
    pub target: String,
    /// Optional `http://` URL fetched through the tunnel (to `target`); its status must be
    /// `expect_status`.
    pub url: Option<String>,
    /// Expected HTTP status for `url`. Default 200.
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
    /// Seconds between rounds. Default 30.
    #[serde(default = "default_check_interval")]
    pub interval_secs: u64,
    /// Time for one probe, in ms. Default 5000.
    #[serde(default = "default_check_timeout")]
    pub timeout_ms: u64,
    /// A probe slower than this marks the upstream `slow`, in ms. Default 2000.
    #[serde(default = "default_slow_threshold")]
    pub slow_threshold_ms: u64,
    /// Probes running at once. Default 8.
    #[serde(default = "default_check_concurrency")]
    pub concurrency: usize,
}

fn default_expect_status() -> u16 {
    200
}

fn default_check_interval() -> u64 {
    30
}

fn default_check_timeout() -> u64 {
    5000
}

fn default_slow_threshold() -> u64 {
    2000
}

fn default_check_concurrency() -> usize {
    8
}

/// `[[pools.proxies]]`, or one line of a `proxies_file`.
///
/// (serde cannot deny unknown fields next to a flattened struct, so unknown keys are
/// collected in `unknown` and reported by validation, with their key path.)
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ProxyConfig {
    /// `scheme://[user:pass@]host:port`, scheme one of http, https, socks5, socks5h; or
    /// `direct` / `direct://`.
    pub url: String,
    /// Stable id (default: `POOL/host:port`, or `POOL/direct`).
    pub id: Option<String>,
    /// Simultaneous leases at most (omit: unlimited).
    pub max_concurrency: Option<u32>,
    /// `direct` only: local address to connect from.
    pub bind: Option<IpAddr>,
    /// `https` only: PEM file with extra CA certificates for the proxy's certificate.
    pub ca_file: Option<PathBuf>,
    /// country, city, source, isp, asn, latitude, longitude.
    #[serde(flatten)]
    pub meta: ProxyMeta,
    /// Keys that are none of the above (an error).
    #[serde(flatten)]
    pub unknown: std::collections::BTreeMap<String, serde::de::IgnoredAny>,
}

impl Config {
    /// Loads `path` (which must exist) with `PHAROX_…` overrides, reads every
    /// `proxies_file` and password variable, and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        if let Err(e) = std::fs::metadata(path) {
            return Err(ConfigError::File {
                path: path.to_owned(),
                reason: e.to_string(),
            });
        }
        let figment = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(Env::prefixed("PHAROX_").ignore(&["CONFIG"]).split("__"));
        let config = Self::from_figment(figment)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.finish(Some(path), base, &|name| std::env::var(name).ok())
    }

    /// Extracts a config from any figment (tests pass TOML strings), without validation.
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        figment
            .extract()
            .map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Parses a TOML string and finishes it like [`Config::load`], reading environment
    /// variables through `env` and `proxies_file`s relative to `base`.
    pub fn from_toml_str(
        toml: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(toml)))?.finish(None, base, env)
    }

    fn finish(
        mut self,
        file: Option<&Path>,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        self.read_proxy_files(base, &mut problems);
        self.read_password_env(env, &mut problems);
        self.read_storage_url(env, &mut problems);
        self.read_api_keys(env, &mut problems);
        self.validate(&mut problems);
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(ConfigError::Invalid {
                file: file.map(Path::to_owned),
                problems,
            })
        }
    }

    fn read_proxy_files(&mut self, base: &Path, problems: &mut Vec<String>) {
        for (pi, pool) in self.pools.iter_mut().enumerate() {
            let Some(file) = &pool.proxies_file else {
                continue;
            };
            let path = if file.is_absolute() {
                file.clone()
            } else {
                base.join(file)
            };
            let key = format!("pools[{pi}].proxies_file");
            match std::fs::read_to_string(&path) {
                Err(e) => problems.push(format!("{key}: {}: {e}", path.display())),
                Ok(text) => {
                    for (n, line) in text.lines().enumerate() {
                        match parse_proxy_line(line) {
                            Ok(Some(p)) => pool.proxies.push(p),
                            Ok(None) => {}
                            Err(e) => {
                                problems.push(format!("{key}: {}:{}: {e}", path.display(), n + 1))
                            }
                        }
                    }
                }
            }
        }
    }

    fn read_storage_url(
        &mut self,
        env: &dyn Fn(&str) -> Option<String>,
        problems: &mut Vec<String>,
    ) {
        let st = &mut self.storage;
        let Some(var) = &st.url_env else { return };
        if st.url.is_some() {
            problems.push("storage: set either url or url_env, not both".into());
        } else if var.starts_with("PHAROX_") {
            problems.push(format!(
                "storage.url_env: `{var}`: PHAROX_ variables are configuration overrides; pick another name"
            ));
        } else {
            match env(var) {
                Some(v) if !v.is_empty() => st.url = Some(Secret::new(v)),
                _ => problems.push(format!(
                    "storage.url_env: environment variable `{var}` is not set or empty"
                )),
            }
        }
    }

    fn read_api_keys(&mut self, env: &dyn Fn(&str) -> Option<String>, problems: &mut Vec<String>) {
        for (ki, k) in self.api.keys.iter_mut().enumerate() {
            let Some(var) = &k.key_env else { continue };
            if k.key.is_some() {
                problems.push(format!(
                    "api.keys[{ki}]: set either key or key_env, not both"
                ));
            } else if var.starts_with("PHAROX_") {
                problems.push(format!(
                    "api.keys[{ki}].key_env: `{var}`: PHAROX_ variables are configuration overrides; pick another name"
                ));
            } else {
                match env(var) {
                    Some(v) if !v.is_empty() => k.key = Some(Secret::new(v)),
                    _ => problems.push(format!(
                        "api.keys[{ki}].key_env: environment variable `{var}` is not set or empty"
                    )),
                }
            }
        }
    }

    fn read_password_env(
        &mut self,
        env: &dyn Fn(&str) -> Option<String>,
        problems: &mut Vec<String>,
    ) {
        for (ci, c) in self.consumers.iter_mut().enumerate() {
            let Some(var) = &c.password_env else { continue };
            if var.starts_with("PHAROX_") {
                problems.push(format!(
                    "consumers[{ci}].password_env: `{var}`: PHAROX_ variables are configuration overrides; pick another name"
                ));
                continue;
            }
            if c.password.is_some() {
                problems.push(format!(
                    "consumers[{ci}]: set either password or password_env, not both"
                ));
                continue;
            }
            match env(var) {
                Some(v) if !v.is_empty() => c.password = Some(Secret::new(v)),
                _ => problems.push(format!(
                    "consumers[{ci}].password_env: environment variable `{var}` is not set or empty"
                )),
            }
        }
    }

    /// The pool used when a request names none and its consumer has no default.
    pub fn global_default_pool(&self) -> Option<&str> {
        match (&self.default_pool, self.pools.as_slice()) {
            (Some(p), _) => Some(p),
            (None, [only]) => Some(&only.name),
            _ => None,
        }
    }
}
