//! Prometheus metrics: every name with its help text in one place, explicit histogram
//! buckets, bounded labels only (pool, consumer, selector, status, kind, outcome, direction,
//! reason, result — never a host, lease id or client address).
//!
//! Each daemon owns its recorder (no process-global state), fed by the lease engine's
//! acquire/release callbacks and by connection events, and rendered on the admin listener.
//!
//! Adding a metric: a name constant below, a `describe` line in [`Metrics::new`], buckets if
//! it is a histogram, a helper that records it, a row in README's metrics table and, if it is
//! worth a panel, the Grafana dashboard.

use std::sync::Arc;

use dashmap::DashMap;
use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use rustc_hash::FxBuildHasher;

use crate::events::{AcquireEvent, ReleaseEvent};
use crate::model::PoolStats;
use crate::selector::Selector;

/// Metric names (part of the product contract).
pub mod names {
    /// Acquire attempts by outcome.
    pub const ACQUIRE_TOTAL: &str = "pharox_acquire_total";
    /// Time an acquire attempt took.
    pub const ACQUIRE_DURATION: &str = "pharox_acquire_duration_seconds";
    /// Leases released.
    pub const RELEASE_TOTAL: &str = "pharox_release_total";
    /// How long leases were held.
    pub const LEASE_DURATION: &str = "pharox_lease_duration_seconds";
    /// Proxies with a free slot.
    pub const POOL_AVAILABLE: &str = "pharox_pool_available_proxies";
    /// Proxies with status active.
    pub const POOL_ACTIVE: &str = "pharox_pool_active_proxies";
    /// Proxies carrying at least one lease.
    pub const POOL_LEASED: &str = "pharox_pool_leased_proxies";
    /// Client connections holding a lease.
    pub const CONNECTIONS_ACTIVE: &str = "pharox_connections_active";
    /// Client connections by kind and outcome.
    pub const CONNECTIONS_TOTAL: &str = "pharox_connections_total";
    /// Bytes relayed.
    pub const BYTES_TOTAL: &str = "pharox_bytes_total";
    /// Upstream connect failures by reason.
    pub const UPSTREAM_FAILURES: &str = "pharox_upstream_failures_total";
    /// Configuration reloads by result.
    pub const CONFIG_RELOADS: &str = "pharox_config_reloads_total";
    /// Live sticky sessions.
    pub const SESSIONS_ACTIVE: &str = "pharox_sessions_active";
    /// Active health probes by result.
    pub const HEALTH_CHECKS: &str = "pharox_health_checks_total";
    /// Latency measured by health probes.
    pub const PROXY_LATENCY: &str = "pharox_proxy_latency_seconds";
    /// Held leases lost (not renewed): their connections were closed.
    pub const LEASES_LOST: &str = "pharox_leases_lost_total";
    /// Lease API requests by route and result.
    pub const API_REQUESTS: &str = "pharox_api_requests_total";
    /// 1 while the lease storage answers, 0 while it does not.
    pub const STORAGE_UP: &str = "pharox_storage_up";
    /// Storage operations that failed, by operation.
    pub const STORAGE_ERRORS: &str = "pharox_storage_errors_total";
    /// Time of storage operations, by operation.
    pub const STORAGE_DURATION: &str = "pharox_storage_duration_seconds";
}

/// Buckets for acquire latency (seconds).
const ACQUIRE_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets for lease lifetimes (seconds).
const LEASE_BUCKETS: &[f64] = &[
    0.1, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 86400.0,
];

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// A daemon's metrics: its recorder, the handle that renders it, and the handles of the
/// series every connection touches, registered once (a registry lookup builds a key with
/// owned label strings; the hot path only bumps an atomic).
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pools: DashMap<Arc<str>, Arc<PoolMetrics>, FxBuildHasher>,
    connections: DashMap<(&'static str, &'static str), Counter, FxBuildHasher>,
}

/// The series labelled by one pool only (plus fixed label values).
struct PoolMetrics {
    release: Counter,
    lease_duration: Histogram,
    acquire_hit: Histogram,
    acquire_miss: Histogram,
    available: Gauge,
    active: Gauge,
    leased: Gauge,
    connections_active: Gauge,
    bytes_tx: Counter,
    bytes_rx: Counter,
    sessions: Gauge,
    /// `pharox_acquire_total` by consumer and selector: `[hit, miss]`. Default (keyed)
    /// hasher: without required auth, consumer names come from clients.
    acquire: DashMap<(Arc<str>, Selector), [Counter; 2]>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// A recorder with the buckets and help texts of every metric.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(names::ACQUIRE_DURATION.into()),
                ACQUIRE_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(names::LEASE_DURATION.into()), LEASE_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(names::PROXY_LATENCY.into()),
                    ACQUIRE_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(names::STORAGE_DURATION.into()),
                    ACQUIRE_BUCKETS,
                )
            })
            .expect("bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let m = Self {
            recorder,
            handle,
            pools: DashMap::default(),
            connections: DashMap::default(),
        };
        m.describe_all();
        m
    }

    fn describe_all(&self) {
        use names::*;
        let r = &self.recorder;
        r.describe_counter(
            ACQUIRE_TOTAL.into(),
            Some(Unit::Count),
            "Lease acquire attempts (status=hit|miss).".into(),
        );
        r.describe_histogram(
            ACQUIRE_DURATION.into(),
            Some(Unit::Seconds),
            "Duration of one acquire attempt.".into(),
        );
        r.describe_counter(
            RELEASE_TOTAL.into(),
            Some(Unit::Count),
            "Leases released (by holder, operator or expiry).".into(),
        );
        r.describe_histogram(
            LEASE_DURATION.into(),
            Some(Unit::Seconds),
            "How long released leases were held.".into(),
        );
        r.describe_gauge(
            POOL_AVAILABLE.into(),
            Some(Unit::Count),
            "Active proxies with a free slot.".into(),
        );
        r.describe_gauge(
            POOL_ACTIVE.into(),
            Some(Unit::Count),
            "Proxies with status active.".into(),
        );
        r.describe_gauge(
            POOL_LEASED.into(),
            Some(Unit::Count),
            "Proxies carrying at least one lease.".into(),
        );
        r.describe_gauge(
            CONNECTIONS_ACTIVE.into(),
            Some(Unit::Count),
            "Client connections holding a lease.".into(),
        );
        r.describe_counter(
            CONNECTIONS_TOTAL.into(),
            Some(Unit::Count),
            "Client connections by kind and outcome.".into(),
        );
        r.describe_counter(
            BYTES_TOTAL.into(),
            Some(Unit::Bytes),
            "Bytes relayed (tx: client to upstream).".into(),
        );
        r.describe_counter(
            UPSTREAM_FAILURES.into(),
            Some(Unit::Count),
            "Upstream connect failures by reason.".into(),
        );
        r.describe_counter(
            CONFIG_RELOADS.into(),
            Some(Unit::Count),
            "Configuration reloads (result=ok|invalid).".into(),
        );
        r.describe_gauge(
            SESSIONS_ACTIVE.into(),
            Some(Unit::Count),
            "Live sticky sessions.".into(),
        );
        r.describe_counter(
            HEALTH_CHECKS.into(),
            Some(Unit::Count),
            "Health probes (result=active|slow|inactive).".into(),
        );
        r.describe_histogram(
            PROXY_LATENCY.into(),
            Some(Unit::Seconds),
            "Upstream latency measured by health probes.".into(),
        );
        r.describe_counter(
            API_REQUESTS.into(),
            Some(Unit::Count),
            "Lease API requests (route=pools|proxies|leases, result=ok|error).".into(),
        );
        r.describe_gauge(
            STORAGE_UP.into(),
            Some(Unit::Count),
            "1 while the lease storage answers, 0 while it does not.".into(),
        );
        r.describe_counter(
            STORAGE_ERRORS.into(),
            Some(Unit::Count),
            "Lease storage operations that failed (op=acquire|release|renew|sweep|...).".into(),
        );
        r.describe_histogram(
            STORAGE_DURATION.into(),
            Some(Unit::Seconds),
            "Time of one lease storage operation.".into(),
        );
        r.describe_counter(
            LEASES_LOST.into(),
            Some(Unit::Count),
            "Held leases the storage did not renew (expired, released elsewhere); their connections were closed.".into(),
        );
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect();
        Key::from_parts(name, labels)
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&Self::key(name, labels), &METADATA)
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder
            .register_gauge(&Self::key(name, labels), &METADATA)
    }

    fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&Self::key(name, labels), &METADATA)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains histogram buffers; call periodically.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The registered series of `pool`.
    fn pool(&self, pool: &str) -> Arc<PoolMetrics> {
        if let Some(p) = self.pools.get(pool) {
            return p.clone();
        }
        let l = [("pool", pool)];
        let with = |k: &'static str, v: &'static str| [("pool", pool), (k, v)];
        let p = Arc::new(PoolMetrics {
            release: self.counter(names::RELEASE_TOTAL, &l),
            lease_duration: self.histogram(names::LEASE_DURATION, &l),
            acquire_hit: self.histogram(names::ACQUIRE_DURATION, &with("status", "hit")),
            acquire_miss: self.histogram(names::ACQUIRE_DURATION, &with("status", "miss")),
            available: self.gauge(names::POOL_AVAILABLE, &l),
            active: self.gauge(names::POOL_ACTIVE, &l),
            leased: self.gauge(names::POOL_LEASED, &l),
            connections_active: self.gauge(names::CONNECTIONS_ACTIVE, &l),
            bytes_tx: self.counter(names::BYTES_TOTAL, &with("direction", "tx")),
            bytes_rx: self.counter(names::BYTES_TOTAL, &with("direction", "rx")),
            sessions: self.gauge(names::SESSIONS_ACTIVE, &l),
            acquire: DashMap::new(),
        });
        self.pools
            .entry(Arc::from(pool))
            .or_insert(p)
            .value()
            .clone()
    }

    /// An acquire attempt (callback of the lease engine).
    pub fn on_acquire(&self, e: &AcquireEvent) {
        let p = self.pool(&e.pool_name);
        let hit = e.lease.is_some();
        let key = (e.consumer_name.clone(), e.selector);
        let counters = match p.acquire.get(&key) {
            Some(c) => c,
            None => {
                let labels = |status| {
                    [
                        ("pool", &*e.pool_name),
                        ("consumer", &*e.consumer_name),
                        ("selector", e.selector.as_str()),
                        ("status", status),
                    ]
                };
                let c = [
                    self.counter(names::ACQUIRE_TOTAL, &labels("hit")),
                    self.counter(names::ACQUIRE_TOTAL, &labels("miss")),
                ];
                p.acquire.entry(key).or_insert(c).downgrade()
            }
        };
        counters[usize::from(!hit)].increment(1);
        drop(counters);
        let h = if hit { &p.acquire_hit } else { &p.acquire_miss };
        h.record(e.duration.as_secs_f64());
        Self::set_pool_stats(&p, &e.pool_stats);
    }

    /// A release (callback of the lease engine).
    pub fn on_release(&self, e: &ReleaseEvent) {
        let p = self.pool(&e.pool_name);
        p.release.increment(1);
        p.lease_duration.record(e.lease_duration.as_secs_f64());
        Self::set_pool_stats(&p, &e.pool_stats);
    }

    /// The pool gauges.
    fn set_pool_stats(p: &PoolMetrics, s: &PoolStats) {
        p.available.set(s.available as f64);
        p.active.set(s.active as f64);
        p.leased.set(s.leased as f64);
    }

    /// A lease API request.
    pub fn api_request(&self, route: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.counter(names::API_REQUESTS, &[("route", route), ("result", result)])
            .increment(1);
    }

    /// One storage operation: its time, and whether it failed.
    pub fn storage_op(&self, op: &'static str, took: Option<std::time::Duration>, ok: bool) {
        if let Some(took) = took {
            self.histogram(names::STORAGE_DURATION, &[("op", op)])
                .record(took.as_secs_f64());
        }
        if !ok {
            self.counter(names::STORAGE_ERRORS, &[("op", op)])
                .increment(1);
        }
    }

    /// Whether the storage answers.
    pub fn storage_up(&self, up: bool) {
        self.gauge(names::STORAGE_UP, &[])
            .set(if up { 1.0 } else { 0.0 });
    }

    /// A held lease was lost; its connections were closed.
    pub fn lease_lost(&self, pool: &str) {
        self.counter(names::LEASES_LOST, &[("pool", pool)])
            .increment(1);
    }

    /// A client connection took (+1) or gave back (-1) a lease.
    pub fn connection_active(&self, pool: &str, delta: f64) {
        self.pool(pool).connections_active.increment(delta);
    }

    /// A client connection ended. `kind`: connect, http or socks5; `outcome`: ok, idle,
    /// shutdown, error, or an error code.
    pub fn connection_done(&self, kind: &'static str, outcome: &'static str) {
        if let Some(c) = self.connections.get(&(kind, outcome)) {
            return c.increment(1);
        }
        let c = self.counter(
            names::CONNECTIONS_TOTAL,
            &[("kind", kind), ("outcome", outcome)],
        );
        c.increment(1);
        self.connections.insert((kind, outcome), c);
    }

    /// Bytes relayed for a pool.
    pub fn bytes(&self, pool: &str, tx: u64, rx: u64) {
        let p = self.pool(pool);
        p.bytes_tx.increment(tx);
        p.bytes_rx.increment(rx);
    }

    /// An upstream failed to connect. `reason`: timeout, refused, io.
    pub fn upstream_failure(&self, pool: &str, reason: &str) {
        self.counter(
            names::UPSTREAM_FAILURES,
            &[("pool", pool), ("reason", reason)],
        )
        .increment(1);
    }

    /// A sticky session started (+1) or ended (-1).
    pub fn session(&self, pool: &str, delta: f64) {
        self.pool(pool).sessions.increment(delta);
    }

    /// A health probe's result (`active`, `slow`, `inactive`) and, if it succeeded, latency.
    pub fn health_check(&self, pool: &str, result: &str, latency: Option<std::time::Duration>) {
        self.counter(names::HEALTH_CHECKS, &[("pool", pool), ("result", result)])
            .increment(1);
        if let Some(l) = latency {
            self.histogram(names::PROXY_LATENCY, &[("pool", pool)])
                .record(l.as_secs_f64());
        }
    }

    /// A configuration reload. `result`: ok or invalid.
    pub fn reload(&self, result: &str) {
        self.counter(names::CONFIG_RELOADS, &[("result", result)])
            .increment(1);
    }
}
