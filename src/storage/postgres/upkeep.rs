//! Background work, one task each, all ending with the storage's cancellation token:
//! - [`notifier`]: sends `NOTIFY pharox_capacity, POOL_ID` after the change committed, each
//!   as its own statement, at most once per pool per 10 ms (ids arriving meanwhile are
//!   coalesced, never dropped);
//! - [`release_retries`]: releases lease ids whose outcome was unknown (an acquire or a
//!   release that broke without an answer; see [`Unsure`]);
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

/// A lease id to release in the background.
pub(crate) struct Unsure {
    id: LeaseId,
    /// Until when to keep releasing it even after a release found nothing: an acquire sent
    /// before a timeout may still reach the server and create the lease later. `None` for a
    /// failed release (the first answer settles it).
    sticky_until: Option<Instant>,
    next: Instant,
    backoff: Duration,
    queued: Instant,
}

impl Unsure {
    /// A release that failed.
    pub fn release(id: LeaseId) -> Self {
        Self::new(id, None)
    }

    /// An acquire without an answer, for a lease of `duration`.
    pub fn acquire(id: LeaseId, duration: Duration) -> Self {
        let keep = (duration + Duration::from_secs(60)).min(STICKY_MAX);
        Self::new(id, Some(Instant::now() + keep))
    }

    fn new(id: LeaseId, sticky_until: Option<Instant>) -> Self {
        let now = Instant::now();
        Self {
            id,
            sticky_until,
            next: now + Duration::from_millis(250),
            backoff: Duration::from_secs(1),
            queued: now,
        }
    }

    /// After an attempt: `Some(self)` to try again later.
    fn after(mut self, answered: bool) -> Option<Self> {
        let now = Instant::now();
        let keep = match (answered, self.sticky_until) {
            (true, Some(until)) => now < until,
            (true, None) => false,
            (false, _) => now.duration_since(self.queued) < RETRY_FOR,
        };
        self.next = now + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(60));
        keep.then_some(self)
    }
}

/// Longest time an acquire without an answer keeps its id queued.
const STICKY_MAX: Duration = Duration::from_secs(900);

/// Releases, in the background, leases whose acquire or release had no definite answer:
/// a failed release until it gets an answer (at most 10 minutes); an unanswered acquire
/// again and again with a growing pause (1 s doubling to 60 s) until its lease would have
/// expired anyway (at most 15 minutes).
pub(crate) async fn release_retries(
    core: Arc<Core>,
    mut rx: UnboundedReceiver<Unsure>,
    cancel: CancellationToken,
) {
    let mut pending: Vec<Unsure> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            u = rx.recv() => match u {
                Some(u) => pending.push(u),
                None => return,
            },
            _ = tick.tick(), if !pending.is_empty() => {
                let now = Instant::now();
                let mut keep = Vec::new();
                for u in pending.drain(..) {
                    if u.next > now {
                        keep.push(u);
                        continue;
                    }
                    let answered = match core.release_id(u.id, "lost").await {
                        Ok(Some(_)) => {
                            tracing::info!(lease = %u.id, "released a lease whose outcome was unknown");
                            continue;
                        }
                        Ok(None) => true,
                        Err(e) => {
                            tracing::debug!(lease = %u.id, error = %e, "background release failed");
                            false
                        }
                    };
                    keep.extend(u.after(answered));
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
