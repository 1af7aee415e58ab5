//! Acquire and release events, and the callbacks that receive them.
//!
//! Callbacks run synchronously on the caller's task, after the storage has finished (no lock
//! is held). A callback that panics is logged and skipped: it can neither leak a lease nor
//! fail an acquisition.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use crate::filter::Filter;
use crate::model::{Lease, PoolStats};
use crate::selector::Selector;

/// One acquire attempt, hit or miss.
#[derive(Clone, Debug)]
pub struct AcquireEvent {
    /// The lease, or `None` on a miss.
    pub lease: Option<Lease>,
    /// The pool asked for.
    pub pool_name: Arc<str>,
    /// The effective consumer name.
    pub consumer_name: Arc<str>,
    /// The filter used, if any.
    pub filter: Option<Arc<Filter>>,
    /// The selector used.
    pub selector: Selector,
    /// When the attempt started.
    pub started_at: SystemTime,
    /// When it completed.
    pub completed_at: SystemTime,
    /// `completed_at - started_at`.
    pub duration: Duration,
    /// The pool's figures right after the attempt.
    pub pool_stats: PoolStats,
}

/// A lease released, by its holder, an operator or expiry. Fired once per lease.
#[derive(Clone, Debug)]
pub struct ReleaseEvent {
    /// The lease, with status `released` or `expired`.
    pub lease: Lease,
    /// Its pool.
    pub pool_name: Arc<str>,
    /// When it was released.
    pub released_at: SystemTime,
    /// How long it was held.
    pub lease_duration: Duration,
    /// The pool's figures right after.
    pub pool_stats: PoolStats,
}

/// A function called on every acquire attempt.
pub type AcquireCallback = Arc<dyn Fn(&AcquireEvent) + Send + Sync>;
/// A function called on every release.
pub type ReleaseCallback = Arc<dyn Fn(&ReleaseEvent) + Send + Sync>;

/// The registered callbacks. Registration is rare; reading is lock-free.
#[derive(Default)]
pub(crate) struct Callbacks {
    acquire: ArcSwap<Vec<AcquireCallback>>,
    release: ArcSwap<Vec<ReleaseCallback>>,
    /// Fast checks, so that building an event costs nothing when nobody listens.
    any_acquire: AtomicBool,
    any_release: AtomicBool,
}

impl Callbacks {
    pub fn add_acquire(&self, cb: AcquireCallback) {
        self.acquire.rcu(|v| {
            let mut v = Vec::clone(v);
            v.push(cb.clone());
            v
        });
        self.any_acquire.store(true, Ordering::Release);
    }

    pub fn add_release(&self, cb: ReleaseCallback) {
        self.release.rcu(|v| {
            let mut v = Vec::clone(v);
            v.push(cb.clone());
            v
        });
        self.any_release.store(true, Ordering::Release);
    }

    pub fn has_acquire(&self) -> bool {
        self.any_acquire.load(Ordering::Acquire)
    }

    pub fn has_release(&self) -> bool {
        self.any_release.load(Ordering::Acquire)
    }

    pub fn fire_acquire(&self, event: &AcquireEvent) {
        for cb in self.acquire.load().iter() {
            if catch_unwind(AssertUnwindSafe(|| cb(event))).is_err() {
                tracing::warn!(pool = %event.pool_name, "acquire callback panicked; ignored");
            }
        }
    }

    pub fn fire_release(&self, event: &ReleaseEvent) {
        for cb in self.release.load().iter() {
            if catch_unwind(AssertUnwindSafe(|| cb(event))).is_err() {
                tracing::warn!(pool = %event.pool_name, "release callback panicked; ignored");
            }
        }
    }
}
