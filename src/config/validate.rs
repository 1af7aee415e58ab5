//! Configuration validation: everything parsing cannot check, every problem reported with its
//! key path (the caller adds the file).

use std::collections::{HashMap, HashSet};

use super::{
    Config, MAX_WORKER_THREADS, ProxyConfig, StorageKind, USERNAME_KEYS, parse_upstream_url,
    proxy_id,
};
use crate::model::ProxyProtocol;

/// An hour in milliseconds: the bound of every timeout given in ms.
const HOUR_MS: u64 = 3_600_000;
/// Longest `storage.keep_released_hours`: ten years.
const KEEP_RELEASED_MAX_HOURS: u64 = 87_600;
/// A week in seconds.
const WEEK_SECS: u64 = 7 * 24 * 3600;
/// 30 days in seconds: the longest lease or session.
const MAX_LEASE_SECS: u64 = crate::storage::MAX_LEASE_DURATION.as_secs();

/// A name that may go into a header or a URL path as is: 1 to 128 characters, none of them
/// whitespace or control characters.
fn printable_name(s: &str) -> bool {
    (1..=128).contains(&s.chars().count())
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Reports `key` when `v` is over `max` (durations so large that adding them to a time would
/// overflow are refused here, not found out later).
fn bounded(problems: &mut Vec<String>, key: &str, v: u64, max: u64) {
    if v > max {
        problems.push(format!("{key}: at most {max}"));
    }
}

impl Config {
    fn validate_api(&self, problems: &mut Vec<String>) {
        let mut names = HashSet::new();
        for (ki, k) in self.api.keys.iter().enumerate() {
            let key = format!("api.keys[{ki}]");
            if !printable_name(&k.name) || !names.insert(k.name.as_str()) {
                problems.push(format!(
                    "{key}.name: a unique name without spaces is required"
                ));
            }
            match &k.key {
                None => problems.push(format!("{key}: key or key_env is required")),
                Some(s) if s.expose().len() < 16 => {
                    problems.push(format!("{key}.key: at least 16 characters"))
                }
                Some(_) => {}
            }
            if k.max_ttl_seconds == 0 {
                problems.push(format!("{key}.max_ttl_seconds: must be positive"));
            }
            bounded(
                problems,
                &format!("{key}.max_ttl_seconds"),
                k.max_ttl_seconds,
                MAX_LEASE_SECS,
            );
            for (ci, c) in k.consumers.iter().enumerate() {
                if !printable_name(c) {
                    problems.push(format!(
                        "{key}.consumers[{ci}]: `{}` is not a usable name",
                        c.escape_debug()
                    ));
                }
            }
        }
        let mut seen = HashSet::new();
        for k in self.api.keys.iter().filter_map(|k| k.key.as_ref()) {
            if !seen.insert(k.expose()) {
                problems.push("api.keys: two keys are the same".into());
            }
        }
    }

    fn validate_storage(&self, problems: &mut Vec<String>) {
        let st = &self.storage;
        if st.kind == StorageKind::Memory {
            return;
        }
        match &st.url {
            None => {
                problems.push("storage.url: required for kind = \"postgres\" (or url_env)".into())
            }
            Some(url) => {
                let u = url.expose();
                if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                    problems.push(format!(
                        "storage.url: `{}` is not a postgres:// URL",
                        super::mask_url(u)
                    ));
                }
            }
        }
        if st.node_id.as_deref().is_some_and(|n| !printable_name(n)) {
            problems.push(
                "storage.node_id: must be 1 to 128 characters without spaces or control characters"
                    .into(),
            );
        }
        bounded(problems, "storage.pool_size", st.pool_size as u64, 1024);
        if st.pool_size == 0 {
            problems.push("storage.pool_size: must be positive".into());
        }
        if st.statement_timeout_ms == 0 {
            problems.push("storage.statement_timeout_ms: must be positive".into());
        }
        bounded(
            problems,
            "storage.statement_timeout_ms",
            st.statement_timeout_ms,
            HOUR_MS,
        );
        bounded(
            problems,
            "storage.keep_released_hours",
            st.keep_released_hours,
            KEEP_RELEASED_MAX_HOURS,
        );
        if let Some(ca) = &st.ca_file
            && !ca.exists()
        {
            problems.push(format!("storage.ca_file: {} does not exist", ca.display()));
        }
        for (pi, pool) in self.pools.iter().enumerate() {
            for (xi, p) in pool.proxies.iter().enumerate() {
                if parse_upstream_url(&p.url).is_ok_and(|u| u.protocol == ProxyProtocol::Direct) {
                    problems.push(format!(
                        "pools[{pi}].proxies[{xi}]: `direct` upstreams cannot be shared in a \
                         postgres storage (Python pharox cannot read them); use memory storage"
                    ));
                }
            }
        }
    }

    /// Checks everything that parsing cannot; pushes one line per problem.
    pub(super) fn validate(&self, problems: &mut Vec<String>) {
        if self.pools.is_empty() {
            problems.push("pools: at least one pool is required".into());
        }
        if self.listen == self.admin.listen && self.listen.port() != 0 {
            problems.push("admin.listen: must differ from listen".into());
        }
        if !self.auth.required
            && !self.listen.ip().is_loopback()
            && !self.security.allow_open_non_loopback
        {
            problems.push(format!(
                "auth.required: false on the non-loopback address {} would be an open proxy; \
                 set security.allow_open_non_loopback = true to allow it",
                self.listen
            ));
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.max_connections", l.max_connections as u64),
            ("limits.max_head_bytes", l.max_head_bytes as u64),
            ("limits.head_timeout_ms", l.head_timeout_ms),
            ("limits.connect_timeout_ms", l.connect_timeout_ms),
            ("limits.response_timeout_ms", l.response_timeout_ms),
            ("limits.listen_backlog", u64::from(l.listen_backlog)),
            (
                "limits.max_sessions_per_consumer",
                l.max_sessions_per_consumer as u64,
            ),
        ] {
            if v == 0 {
                problems.push(format!("{key}: must be positive"));
            }
        }
        for (key, v, max) in [
            ("limits.head_timeout_ms", l.head_timeout_ms, HOUR_MS),
            ("limits.connect_timeout_ms", l.connect_timeout_ms, HOUR_MS),
            ("limits.response_timeout_ms", l.response_timeout_ms, HOUR_MS),
            ("limits.idle_timeout_secs", l.idle_timeout_secs, WEEK_SECS),
            (
                "limits.drain_timeout_secs",
                l.drain_timeout_secs,
                HOUR_MS / 1000,
            ),
            ("limits.max_head_bytes", l.max_head_bytes as u64, 1 << 20),
            ("limits.listen_backlog", u64::from(l.listen_backlog), 65_535),
        ] {
            bounded(problems, key, v, max);
        }
        if l.max_head_bytes > 0 && l.max_head_bytes < 1024 {
            problems.push("limits.max_head_bytes: must be at least 1024".into());
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            problems.push(format!(
                "worker_threads: at most {MAX_WORKER_THREADS} (0 = one per CPU)"
            ));
        }
        self.validate_storage(problems);
        self.validate_api(problems);
        let pool_names = self.validate_pools(problems);
        self.validate_consumers(&pool_names, problems);
        if let Some(p) = &self.default_pool
            && !pool_names.contains(p.as_str())
        {
            problems.push(format!("default_pool: unknown pool `{p}`"));
        }
    }

    fn validate_pools(&self, problems: &mut Vec<String>) -> HashSet<&str> {
        let mut names = HashSet::new();
        let mut ids: HashMap<String, String> = HashMap::new();
        for (pi, pool) in self.pools.iter().enumerate() {
            let key = format!("pools[{pi}]");
            if !printable_name(&pool.name) {
                problems.push(format!(
                    "{key}.name: must be 1 to 128 characters without spaces or control characters"
                ));
            } else if !names.insert(pool.name.as_str()) {
                problems.push(format!("{key}.name: duplicate pool `{}`", pool.name));
            }
            if pool.lease_seconds == 0 {
                problems.push(format!("{key}.lease_seconds: must be positive"));
            }
            let r = &pool.retry;
            for (field, v, max) in [
                ("lease_seconds", pool.lease_seconds, MAX_LEASE_SECS),
                (
                    "session_ttl_seconds",
                    pool.session_ttl_seconds,
                    MAX_LEASE_SECS,
                ),
                (
                    "session_max_ttl_seconds",
                    pool.session_max_ttl_seconds,
                    MAX_LEASE_SECS,
                ),
                ("failover_attempts", u64::from(pool.failover_attempts), 100),
                ("retry.max_attempts", u64::from(r.max_attempts), 1000),
                ("retry.backoff_ms", r.backoff_ms, HOUR_MS),
                ("retry.max_backoff_ms", r.max_backoff_ms, HOUR_MS),
                (
                    "health.cooldown_seconds",
                    pool.health.cooldown_seconds,
                    WEEK_SECS,
                ),
            ] {
                bounded(problems, &format!("{key}.{field}"), v, max);
            }
            if let Some(hc) = &pool.health_check {
                for (field, v, max) in [
                    ("interval_secs", hc.interval_secs, WEEK_SECS),
                    ("timeout_ms", hc.timeout_ms, HOUR_MS),
                    ("slow_threshold_ms", hc.slow_threshold_ms, HOUR_MS),
                    ("concurrency", hc.concurrency as u64, 1024),
                ] {
                    bounded(problems, &format!("{key}.health_check.{field}"), v, max);
                }
            }
            if pool.session_ttl_seconds == 0 || pool.session_max_ttl_seconds == 0 {
                problems.push(format!("{key}.session_ttl_seconds: must be positive"));
            }
            if pool.session_ttl_seconds > pool.session_max_ttl_seconds {
                problems.push(format!(
                    "{key}.session_ttl_seconds: larger than session_max_ttl_seconds"
                ));
            }
            if let Err(e) = pool.retry.policy().validate() {
                problems.push(format!("{key}.retry: {e}"));
            }
            if let Some(hc) = &pool.health_check {
                if crate::target::Target::parse_authority(&hc.target).is_err() {
                    problems.push(format!(
                        "{key}.health_check.target: `{}` is not host:port",
                        hc.target
                    ));
                }
                if hc.url.as_deref().is_some_and(|u| !u.starts_with("http://")) {
                    problems.push(format!(
                        "{key}.health_check.url: only http:// URLs are fetched"
                    ));
                }
                if hc.interval_secs == 0 || hc.timeout_ms == 0 || hc.concurrency == 0 {
                    problems.push(format!("{key}.health_check: interval_secs, timeout_ms and concurrency must be positive"));
                }
            }
            if pool.health.max_failures == 0 || pool.health.cooldown_seconds == 0 {
                problems.push(format!(
                    "{key}.health: max_failures and cooldown_seconds must be positive"
                ));
            }
            // In a shared storage a pool may be filled by others (Python, the lease API).
            if pool.proxies.is_empty() && self.storage.kind == StorageKind::Memory {
                problems.push(format!("{key}.proxies: the pool has no upstream"));
            }
            for (xi, proxy) in pool.proxies.iter().enumerate() {
                let pkey = format!("{key}.proxies[{xi}]");
                match proxy_id(pool, proxy) {
                    Ok(id) if !printable_name(&id) => problems.push(format!(
                        "{pkey}.id: `{}` must be 1 to 128 characters without spaces or control characters",
                        id.escape_debug()
                    )),
                    Ok(id) => {
                        if let Some(other) = ids.insert(id.clone(), pkey.clone()) {
                            problems.push(format!(
                                "{pkey}: id `{id}` already used by {other}; set `id`"
                            ));
                        }
                    }
                    Err(e) => problems.push(format!("{pkey}.url: {e}")),
                }
                validate_proxy(proxy, &pkey, problems);
            }
        }
        names
    }

    fn validate_consumers(&self, pools: &HashSet<&str>, problems: &mut Vec<String>) {
        let mut names = HashSet::new();
        for (ci, c) in self.consumers.iter().enumerate() {
            let key = format!("consumers[{ci}]");
            if c.name.is_empty()
                || c.name.starts_with('-')
                || c.name.ends_with('-')
                || c.name.contains("--")
            {
                problems.push(format!(
                    "{key}.name: `{}` is not a usable user name",
                    c.name
                ));
            } else if c.name.contains([':', ' ']) {
                problems.push(format!("{key}.name: must not contain ':' or spaces"));
            }
            if let Some(seg) = c.name.split('-').find(|s| USERNAME_KEYS.contains(s)) {
                problems.push(format!(
                    "{key}.name: `{}` contains the username key `{seg}` as a segment",
                    c.name
                ));
            }
            if !names.insert(c.name.as_str()) {
                problems.push(format!("{key}.name: duplicate consumer `{}`", c.name));
            }
            if self.auth.required && c.password.is_none() && c.password_env.is_none() {
                problems.push(format!(
                    "{key}: auth.required is true, so a password or password_env is needed"
                ));
            }
            for (i, p) in c.pools.iter().enumerate() {
                if !pools.contains(p.as_str()) {
                    problems.push(format!("{key}.pools[{i}]: unknown pool `{p}`"));
                }
            }
            if let Some(p) = &c.default_pool {
                if !pools.contains(p.as_str()) {
                    problems.push(format!("{key}.default_pool: unknown pool `{p}`"));
                } else if !c.pools.is_empty() && !c.pools.contains(p) {
                    problems.push(format!(
                        "{key}.default_pool: `{p}` is not among the consumer's pools"
                    ));
                }
            }
        }
    }
}

fn validate_proxy(p: &ProxyConfig, key: &str, problems: &mut Vec<String>) {
    for k in p.unknown.keys() {
        problems.push(format!("{key}: unknown key `{k}`"));
    }
    if p.max_concurrency == Some(0) {
        problems.push(format!(
            "{key}.max_concurrency: must be at least 1 (omit for unlimited)"
        ));
    }
    let m = &p.meta;
    if m.latitude.is_some() != m.longitude.is_some() {
        problems.push(format!("{key}: latitude and longitude go together"));
    }
    if m.latitude.is_some_and(|v| !(-90.0..=90.0).contains(&v))
        || m.longitude.is_some_and(|v| !(-180.0..=180.0).contains(&v))
    {
        problems.push(format!("{key}: coordinates out of range"));
    }
    for (name, v) in m.strings() {
        if v.as_deref() == Some("") {
            problems.push(format!("{key}.{name}: must not be empty"));
        }
    }
    let protocol = parse_upstream_url(&p.url).map(|u| u.protocol).ok();
    if p.bind.is_some() && protocol.is_some_and(|pr| pr != ProxyProtocol::Direct) {
        problems.push(format!("{key}.bind: only for direct upstreams"));
    }
    if let Some(ca) = &p.ca_file {
        if protocol.is_some_and(|pr| pr != ProxyProtocol::Https) {
            problems.push(format!("{key}.ca_file: only for https upstreams"));
        } else if !ca.exists() {
            problems.push(format!("{key}.ca_file: {} does not exist", ca.display()));
        }
    }
}
