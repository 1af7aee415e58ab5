//! Active health checks: every `interval_secs`, through each upstream of a pool that has a
//! `[pools.health_check]`, open a tunnel to `target` (and optionally fetch `url` through it)
//! within `timeout_ms`, at most `concurrency` probes at once.
//!
//! A probe that succeeds sets the upstream `active` (or `slow` past `slow_threshold_ms`),
//! records `checked_at` and the latency (an EWMA, weight 0.3 for the new sample), and ends a
//! passive-health rest. A probe that fails sets it `inactive`. Banned upstreams are not probed.
//! A probe of a leasable upstream holds a lease for the probe's duration only (and is skipped
//! if the upstream is full: it is evidently in use); others are probed without one.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::HealthCheckConfig;
use crate::model::{HealthCheck, Proxy, ProxyInfo, ProxyStatus};
use crate::proxy::upstream::{self, UpstreamIo};
use crate::proxy::{ProxyState, Runtime};
use crate::storage::{AcquireRequest, Storage};
use crate::target::Target;

/// Consumer name the probes lease as.
pub const PROBE_CONSUMER: &str = "pharox-health";

/// Weight of a new latency sample in the moving average.
const EWMA_WEIGHT: f64 = 0.3;

/// Runs the checks of every pool that has them until `stop` is cancelled. Reads the runtime
/// each round, so reloads take effect at the next round.
pub async fn run(state: Arc<ProxyState>, stop: CancellationToken) {
    let mut last_round: std::collections::HashMap<Arc<str>, Instant> = Default::default();
    loop {
        let rt = state.runtime.load_full();
        let now = Instant::now();
        let mut next = now + Duration::from_secs(3600);
        for (pool, settings) in &rt.pools {
            let Some(hc) = &settings.health_check else {
                continue;
            };
            let every = Duration::from_secs(hc.interval_secs);
            let due = last_round.get(pool).is_none_or(|t| *t + every <= now);
            if due {
                last_round.insert(pool.clone(), now);
                check_pool(&state, &rt, pool, hc).await;
            }
            next = next.min(last_round[pool] + every);
        }
        tokio::select! {
            () = tokio::time::sleep_until(next.max(Instant::now() + Duration::from_millis(100))) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// One round over one pool.
pub async fn check_pool(
    state: &Arc<ProxyState>,
    rt: &Arc<Runtime>,
    pool: &Arc<str>,
    hc: &HealthCheckConfig,
) {
    let Ok(proxies) = state.manager.storage().list_proxies(pool).await else {
        return;
    };
    let permits = Arc::new(Semaphore::new(hc.concurrency));
    let mut probes = JoinSet::new();
    for info in proxies
        .into_iter()
        .filter(|i| !i.draining && i.proxy.status != ProxyStatus::Banned)
    {
        let (state, rt, pool, hc, permits) = (
            state.clone(),
            rt.clone(),
            pool.clone(),
            hc.clone(),
            permits.clone(),
        );
        probes.spawn(async move {
            let _permit = permits.acquire_owned().await;
            check_one(&state, &rt, &pool, &hc, info).await;
        });
    }
    while probes.join_next().await.is_some() {}
}

async fn check_one(
    state: &ProxyState,
    rt: &Runtime,
    pool: &Arc<str>,
    hc: &HealthCheckConfig,
    info: ProxyInfo,
) {
    let proxy = info.proxy;
    let leasable = proxy.status == ProxyStatus::Active
        || (proxy.status == ProxyStatus::Slow
            && rt
                .config
                .pools
                .iter()
                .any(|p| *p.name == **pool && p.lease_slow));
    let timeout = Duration::from_millis(hc.timeout_ms);
    // Hold a slot only for the probe; skip an upstream whose slots are all in use.
    let _lease = if leasable {
        let req = AcquireRequest::new(pool.clone())
            .consumer(PROBE_CONSUMER)
            .duration(timeout + Duration::from_secs(1))
            .only([proxy.id.clone()]);
        match state.manager.acquire_proxy(&req).await {
            Ok(Some(lease)) => Some(state.manager.guard(lease)),
            _ => return,
        }
    } else {
        None
    };
    let started = Instant::now();
    let outcome = tokio::time::timeout(timeout, probe(rt, &proxy, hc)).await;
    let latency = started.elapsed();
    let (status, measured) = match outcome {
        Ok(Ok(())) if latency > Duration::from_millis(hc.slow_threshold_ms) => {
            (ProxyStatus::Slow, Some(latency))
        }
        Ok(Ok(())) => (ProxyStatus::Active, Some(latency)),
        Ok(Err(e)) => {
            debug!(proxy = %proxy.id, error = %e, "health probe failed");
            (ProxyStatus::Inactive, None)
        }
        Err(_) => {
            debug!(proxy = %proxy.id, "health probe timed out");
            (ProxyStatus::Inactive, None)
        }
    };
    state.metrics.health_check(pool, status.as_str(), measured);
    let ewma = measured.map(|m| match proxy.latency {
        Some(old) => old.mul_f64(1.0 - EWMA_WEIGHT) + m.mul_f64(EWMA_WEIGHT),
        None => m,
    });
    // An operator's ban during the probe wins.
    if let Ok(Some(now)) = state.manager.storage().get_proxy(&proxy.id).await
        && now.proxy.status == ProxyStatus::Banned
    {
        return;
    }
    let check = HealthCheck {
        status,
        checked_at: Some(SystemTime::now()),
        latency: ewma,
    };
    if state
        .manager
        .storage()
        .apply_health(&proxy.id, check)
        .await
        .is_ok()
        && status != ProxyStatus::Inactive
    {
        state.failures.remove(&proxy.id);
    }
}

/// Opens the tunnel (and fetches the URL) through `proxy`.
async fn probe(rt: &Runtime, proxy: &Proxy, hc: &HealthCheckConfig) -> Result<(), String> {
    let target = Target::parse_authority(&hc.target).map_err(|e| e.to_string())?;
    let extra = rt.extras.get(&proxy.id).cloned().unwrap_or_default();
    let timeout = Duration::from_millis(hc.timeout_ms);
    let (mut io, early) = upstream::open_tunnel(proxy, &extra, &target, &rt.policy, timeout)
        .await
        .map_err(|e| e.to_string())?;
    match &hc.url {
        None => Ok(()),
        Some(url) => fetch(&mut io, early, url, &target, hc.expect_status).await,
    }
}

async fn fetch(
    io: &mut UpstreamIo,
    early: bytes::Bytes,
    url: &str,
    target: &Target,
    expect: u16,
) -> Result<(), String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs")?;
    let path = rest.find('/').map_or("/", |i| &rest[i..]);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: pharox-health\r\n\r\n",
        target.authority()
    );
    io.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = early.to_vec();
    let mut chunk = [0u8; 1024];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 8192 {
        let n = io.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no HTTP status")?;
    if status == expect {
        Ok(())
    } else {
        Err(format!("status {status}, expected {expect}"))
    }
}
