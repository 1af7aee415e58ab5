//! Leases the daemon holds for client connections, and the registry that renews them and
//! closes their connections.
//!
//! A [`HeldLease`] is the one type that gives back a lease the daemon took: dropping the last
//! `Arc` of it releases the lease (through the engine's [`LeaseGuard`]) and removes it from the
//! registry. Connections hold it through a [`LeaseUse`] (which also counts the connection in
//! `pharox_connections_active` and in its sticky session), and a sticky session holds it between
//! connections.
//!
//! One task renews every registered lease past half its life, in one batch per tick. A lease
//! the storage will not renew (expired, released by an operator or by hand in the database) is
//! lost: its connections are closed at once. A lease whose renewal fails (the storage is down)
//! is kept until shortly before the expiry the storage last granted, then treated as lost the
//! same way, so its connections never run on a slot that may have been handed to someone else.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use rustc_hash::FxBuildHasher;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::session::SessionUse;
use crate::manager::{LeaseGuard, ProxyManager};
use crate::metrics::Metrics;
use crate::model::{Lease, LeaseId, Proxy};
use crate::storage::{AnyStorage, Renewal};

/// The daemon's lease engine.
pub type Manager = ProxyManager<AnyStorage>;

/// How often held leases are checked for renewal.
pub const RENEW_TICK: Duration = Duration::from_millis(250);

/// A lease held for client connections. Released when the last `Arc` is dropped, if the
/// daemon took it; a lease of the lease API that connections only use is released by its
/// API client (or expires), never here.
pub struct HeldLease {
    holding: Holding,
    registry: Arc<Registry>,
    cancel: CancellationToken,
    /// Tells this handle's registry entry from a later one for the same lease.
    serial: u64,
}

/// Serial numbers of registry entries.
fn next_serial() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Whose lease it is.
enum Holding {
    /// Taken by the daemon for its connections: the guard releases it.
    Owned(LeaseGuard<AnyStorage>),
    /// A lease of the lease API, used by connections for as long as it lives.
    Borrowed(Lease),
}

impl HeldLease {
    /// The lease as acquired.
    pub fn lease(&self) -> &Lease {
        match &self.holding {
            Holding::Owned(guard) => guard,
            Holding::Borrowed(lease) => lease,
        }
    }

    /// The leased upstream.
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.lease().proxy
    }

    /// Cancelled when the lease is lost or closed (operator, renewal refused, hard shutdown):
    /// every connection using it must close.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        // The registry entry goes first; the guard (a field) releases right after.
        let id = self.lease().id;
        let serial = self.serial;
        self.registry
            .leases
            .remove_if(&id, |_, e| e.serial == serial);
        if matches!(self.holding, Holding::Borrowed(_)) {
            self.registry
                .borrowed
                .remove_if(&id, |_, weak| weak.strong_count() == 0);
        }
    }
}

/// A held lease as the registry knows it.
struct Entry {
    cancel: CancellationToken,
    pool: Arc<str>,
    duration: Duration,
    /// When to renew next (`None`: never, a lease of the lease API).
    renew_at: Option<Instant>,
    /// Past this, the storage may already have handed the slot to someone else.
    deadline: Instant,
    /// The handle's serial (see `HeldLease::serial`).
    serial: u64,
}

/// Every lease the daemon holds for connections.
#[derive(Default)]
pub struct Registry {
    leases: DashMap<LeaseId, Entry, FxBuildHasher>,
    /// Leases of the lease API in use by connections (shared by all of them).
    borrowed: DashMap<LeaseId, std::sync::Weak<HeldLease>, FxBuildHasher>,
    /// Set at hard shutdown: leases registered afterwards start cancelled.
    closed: CancellationToken,
}

/// A lease's renewal keeps a margin before its expiry: this much, or a tenth of its life.
fn margin(duration: Duration) -> Duration {
    (duration / 10).min(Duration::from_secs(2))
}

impl Registry {
    /// Registers a fresh lease from `manager`, renewed every half of `duration`.
    pub fn hold(self: &Arc<Self>, guard: LeaseGuard<AnyStorage>, duration: Duration) -> HeldLease {
        // A token of its own, not a child of a daemon-wide one: a child token takes the
        // parent's lock on creation and drop, which every connection would contend on.
        let cancel = CancellationToken::new();
        let now = Instant::now();
        let life = guard
            .expires_at
            .duration_since(guard.acquired_at)
            .unwrap_or(duration);
        let serial = next_serial();
        self.leases.insert(
            guard.id,
            Entry {
                cancel: cancel.clone(),
                pool: guard.pool_name.clone(),
                duration,
                renew_at: Some(now + duration / 2),
                deadline: now + life.saturating_sub(margin(life)),
                serial,
            },
        );
        if self.closed.is_cancelled() {
            cancel.cancel();
        }
        HeldLease {
            holding: Holding::Owned(guard),
            registry: self.clone(),
            cancel,
            serial,
        }
    }

    /// Shares a lease of the lease API with the connections that use it (one handle per
    /// lease, however many connections): never renewed, closed at its expiry (judged from
    /// `now`, the storage's time) or when its holder releases it.
    pub fn borrow(self: &Arc<Self>, lease: Lease, now: std::time::SystemTime) -> Arc<HeldLease> {
        if let Some(held) = self.borrowed.get(&lease.id).and_then(|w| w.upgrade()) {
            return held;
        }
        let cancel = CancellationToken::new();
        let left = lease.expires_at.duration_since(now).unwrap_or_default();
        let serial = next_serial();
        self.leases.insert(
            lease.id,
            Entry {
                cancel: cancel.clone(),
                pool: lease.pool_name.clone(),
                duration: left,
                renew_at: None,
                deadline: Instant::now() + left,
                serial,
            },
        );
        if self.closed.is_cancelled() {
            cancel.cancel();
        }
        let id = lease.id;
        let held = Arc::new(HeldLease {
            holding: Holding::Borrowed(lease),
            registry: self.clone(),
            cancel,
            serial,
        });
        self.borrowed.insert(id, Arc::downgrade(&held));
        held
    }

    /// Closes the connections of lease `id`; false if the daemon does not hold it.
    pub fn close(&self, id: LeaseId) -> bool {
        match self.leases.get(&id) {
            Some(e) => {
                e.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// True when the daemon holds lease `id` for connections of its own (not one of the
    /// lease API that connections only use).
    pub fn holds(&self, id: LeaseId) -> bool {
        self.leases.get(&id).is_some_and(|e| e.renew_at.is_some())
    }

    /// Closes every held lease's connections (the end of the shutdown drain); leases held
    /// later start closed.
    pub fn close_all(&self) {
        self.closed.cancel();
        for e in self.leases.iter() {
            e.cancel.cancel();
        }
    }

    /// Held leases.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// True when no lease is held.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Renews, in one batch, every held lease past half its life. Leases the storage did not
    /// renew are lost and their connections closed; if the storage fails, leases past their
    /// deadline are treated as lost too. Returns how many were lost.
    pub async fn renew_due(&self, manager: &Manager, metrics: &Metrics) -> usize {
        let now = Instant::now();
        let overdue = self.close_overdue(now, metrics);
        let due: Vec<Renewal> = self
            .leases
            .iter()
            .filter(|e| e.renew_at.is_some_and(|t| t <= now) && !e.cancel.is_cancelled())
            .map(|e| Renewal {
                id: *e.key(),
                pool: e.pool.clone(),
                duration: e.duration,
            })
            .collect();
        if due.is_empty() {
            return overdue;
        }
        match manager.renew_many(&due).await {
            Ok(renewed) => {
                let mut lost = 0;
                for r in &due {
                    match renewed.iter().find(|(id, _)| *id == r.id) {
                        Some(_) => self.renewed(r.id, now, r.duration),
                        None => {
                            warn!(lease = %r.id, pool = %r.pool, "lease lost (not renewed); closing its connections");
                            metrics.lease_lost(&r.pool);
                            self.close(r.id);
                            lost += 1;
                        }
                    }
                }
                overdue + lost
            }
            Err(e) => {
                warn!(error = %e, leases = due.len(), "lease renewal failed; will retry");
                overdue
            }
        }
    }

    fn renewed(&self, id: LeaseId, sent: Instant, duration: Duration) {
        if let Some(mut e) = self.leases.get_mut(&id) {
            e.renew_at = Some(sent + duration / 2);
            e.deadline = sent + duration.saturating_sub(margin(duration));
        }
    }

    /// Closes leases whose deadline passed without a renewal (or, for a lease of the lease
    /// API, at its expiry).
    fn close_overdue(&self, now: Instant, metrics: &Metrics) -> usize {
        let mut lost = 0;
        for e in self.leases.iter() {
            if e.deadline <= now && !e.cancel.is_cancelled() {
                if e.renew_at.is_none() {
                    e.cancel.cancel();
                    continue; // an API lease ran out: its connections end with it
                }
                warn!(lease = %e.key(), pool = %e.pool, "lease not renewed before its expiry; closing its connections");
                metrics.lease_lost(&e.pool);
                e.cancel.cancel();
                lost += 1;
            }
        }
        lost
    }
}

/// One client connection's use of a held lease: counted in `pharox_connections_active` and,
/// for a sticky session, as one of the session's open connections, until dropped.
pub struct LeaseUse {
    lease: Arc<HeldLease>,
    metrics: Arc<Metrics>,
    /// The sticky session this connection belongs to, if any.
    pub session: Option<SessionUse>,
}

impl LeaseUse {
    /// Starts a connection's use of `lease`.
    pub fn new(lease: Arc<HeldLease>, metrics: Arc<Metrics>, session: Option<SessionUse>) -> Self {
        metrics.connection_active(&lease.lease().pool_name, 1.0);
        Self {
            lease,
            metrics,
            session,
        }
    }

    /// The held lease.
    pub fn held(&self) -> &Arc<HeldLease> {
        &self.lease
    }

    /// The leased upstream.
    pub fn proxy(&self) -> &Arc<Proxy> {
        self.lease.proxy()
    }

    /// The lease id, as sent in `X-Pharox-Lease-Id`.
    pub fn lease_id(&self) -> LeaseId {
        self.lease.lease().id
    }

    /// Cancelled when the connection must close (lease lost or closed, hard shutdown).
    pub fn cancelled(&self) -> &CancellationToken {
        self.lease.cancelled()
    }

    /// The headers a successful answer carries: the upstream's id, the lease id and, for a
    /// sticky session, the session (and the upstream it left, if it just moved).
    pub fn stamp(&self) -> Vec<(&'static str, String)> {
        let mut h = Vec::with_capacity(4);
        self.each_stamp(|name, value| h.push((name, value.to_string())));
        h
    }

    /// Appends the [`stamp`](Self::stamp) to `out` as header lines (`Name: value` and CRLF
    /// each), formatted in place.
    pub fn write_stamp(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        self.each_stamp(|name, value| {
            // Writing to a Vec cannot fail.
            let _ = write!(out, "{name}: {value}\r\n");
        });
    }

    fn each_stamp(&self, mut header: impl FnMut(&'static str, &dyn std::fmt::Display)) {
        header("X-Pharox-Proxy-Id", &self.proxy().id);
        header("X-Pharox-Lease-Id", &self.lease_id());
        if let Some(s) = &self.session {
            header("X-Pharox-Session", &s.id());
            if let Some(from) = &s.moved_from {
                header("X-Pharox-Session-Moved-From", from);
            }
        }
    }
}

impl Drop for LeaseUse {
    fn drop(&mut self) {
        self.metrics
            .connection_active(&self.lease.lease().pool_name, -1.0);
    }
}
