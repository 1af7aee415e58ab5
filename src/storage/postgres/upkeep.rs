//! Background work, one task each, all ending with the storage's cancellation token:
//! - [`notifier`]: sends `NOTIFY pharox_capacity, POOL_ID` after the change committed, each
//!   as its own statement, at most once per pool per 10 ms (ids arriving meanwhile are
//!   coalesced, never dropped);
//! - [`release_retries`]: releases lease ids whose outcome was unknown (an acquire or a
//!   release that broke without an answer), every second until done or 10 minutes old;
//! - [`stats_refresh`]: re-reads, every second, the figures of the pools whose cached stats
//!   events used since the last refresh.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Core, sql};
use crate::model::LeaseId;

/// Coalescing window of the notifier.
const NOTIFY_WINDOW: Duration = Duration::from_millis(10);
/// How long an unknown-outcome lease id is retried.
const RETRY_FOR: Duration = Duration::from_secs(600);

/// Sends the NOTIFYs queued by releases, sweeps and health changes.
pub(crate) async fn notifier(
    core: Arc<Core>,
    mut rx: UnboundedReceiver<Uuid>,
    cancel: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            id = rx.recv() => match id {
                Some(id) => id,
                None => return,
            },
            () = cancel.cancelled() => {
                let mut rest = HashSet::new();
                while let Ok(id) = rx.try_recv() {
                    rest.insert(id);
                }
                send(&core, rest).await;
                return;
            }
        };
        let mut pending = HashSet::from([first]);
        while let Ok(id) = rx.try_recv() {
            pending.insert(id);
        }
        send(&core, pending).await;
        tokio::time::sleep(NOTIFY_WINDOW).await;
    }
}

async fn send(core: &Core, pools: HashSet<Uuid>) {
    for id in pools {
        let payload = id.hyphenated().to_string();
        if let Err(e) = core
            .query("notify", sql::stmt("notify_capacity"), &[&payload])
            .await
        {
            tracing::debug!(error = %e, pool = %id, "NOTIFY failed (waiters elsewhere fall back to polling)");
        }
    }
}

/// Releases, in the background, leases whose acquire or release had no definite answer.
pub(crate) async fn release_retries(
    core: Arc<Core>,
    mut rx: UnboundedReceiver<LeaseId>,
    cancel: CancellationToken,
) {
    let mut pending: Vec<(LeaseId, Instant)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            id = rx.recv() => match id {
                Some(id) => pending.push((id, Instant::now())),
                None => return,
            },
            _ = tick.tick(), if !pending.is_empty() => {
                let mut keep = Vec::new();
                for (id, since) in pending.drain(..) {
                    match core.release_id(id, "lost").await {
                        Ok(Some(_)) => tracing::info!(lease = %id, "released a lease whose outcome was unknown"),
                        Ok(None) => {}
                        Err(_) if since.elapsed() < RETRY_FOR => keep.push((id, since)),
                        Err(e) => tracing::warn!(lease = %id, error = %e, "gave up releasing a lease; it expires by its TTL"),
                    }
                }
                pending = keep;
            }
            () = cancel.cancelled() => return,
        }
    }
}

/// Refreshes the cached pool stats that were used since the last tick.
pub(crate) async fn stats_refresh(core: Arc<Core>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let wanted: Vec<Arc<str>> = core
            .stats
            .iter_mut()
            .filter_map(|mut e| {
                let want = std::mem::take(&mut e.wanted);
                want.then(|| e.key().clone())
            })
            .collect();
        for pool in wanted {
            if let Err(e) = core.fetch_stats(&pool).await {
                tracing::debug!(error = %e, pool = %pool, "pool stats refresh failed");
            }
        }
    }
}
