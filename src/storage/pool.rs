//! One pool's live state inside the in-memory storage: its proxies (slots), its live leases,
//! its counters and the selector indexes.
//!
//! Everything here runs under the pool's mutex, without allocation on the common path and
//! never across an `.await`. The selector indexes hold only *eligible* slots (active, not
//! draining, below their cap), one ordered set per selector order, per *view*. A view is the
//! subset of the pool matching an [`IndexKey`] (view 0 is the whole pool); views and their
//! indexes are built the first time a key or selector is used, then kept up to date on every
//! change of a slot, so a choice is the first element of a set: O(log n).

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use smallvec::SmallVec;

use super::index::{Index, Snap, UNRANKED, View, selector_slot, uses_rank};
use crate::filter::{Filter, IndexKey};
use crate::model::{
    HealthCheck, Lease, LeaseId, LeaseStatus, PoolStats, Proxy, ProxyId, ProxyInfo, ProxyStatus,
};
use crate::selector::Selector;

/// Most views a pool keeps. Past it, a new key takes the place of the view used least
/// recently, if that one sat unused for `VIEW_IDLE_PICKS` acquires; otherwise the filter is
/// checked by scanning view 0. Memory stays bounded however many keys clients send.
pub(crate) const MAX_VIEWS: usize = 64;
/// Acquires after which an unused view may be replaced.
const VIEW_IDLE_PICKS: u64 = 1024;

/// A proxy of the pool with its live figures. The fields the indexes read are copied out of
/// the record, so keeping indexes current never touches the (shared, colder) `Proxy`.
struct Slot {
    proxy: Arc<Proxy>,
    leases: u32,
    draining: bool,
    /// Position of the proxy's id among the pool's ids (the id order of `round_robin` and
    /// of tie-breaks). `UNRANKED` until the next rank rebuild after the proxy was added.
    rank: u32,
    active: bool,
    cap: Option<u32>,
    checked_at: SystemTime,
    /// Measured latency as a `latency_bucket`; `u64::MAX` when unmeasured (sorts last).
    latency_us: u64,
    /// Views this slot belongs to (always includes view 0).
    views: SmallVec<[u16; 4]>,
}

impl Slot {
    fn new(proxy: Arc<Proxy>, views: SmallVec<[u16; 4]>, lease_slow: bool) -> Self {
        let mut slot = Slot {
            proxy: proxy.clone(),
            leases: 0,
            draining: true,
            rank: UNRANKED,
            active: false,
            cap: None,
            checked_at: SystemTime::UNIX_EPOCH,
            latency_us: u64::MAX,
            views,
        };
        slot.set_proxy(proxy, lease_slow);
        slot
    }

    fn set_proxy(&mut self, proxy: Arc<Proxy>, lease_slow: bool) {
        self.cap = proxy.max_concurrency;
        self.checked_at = proxy.checked_at;
        self.latency_us = proxy
            .latency
            .map_or(u64::MAX, crate::selector::latency_bucket);
        self.proxy = proxy;
        self.set_leasable_statuses(lease_slow);
    }

    /// `active` (leasable status): `active`, and `slow` when the pool allows it.
    fn set_leasable_statuses(&mut self, lease_slow: bool) {
        let status = self.proxy.status;
        self.active = status == ProxyStatus::Active || (lease_slow && status == ProxyStatus::Slow);
    }

    fn eligible(&self) -> bool {
        !self.draining && self.active && self.cap.is_none_or(|max| self.leases < max)
    }

    fn snap(&self) -> Snap {
        Snap {
            record: Arc::as_ptr(&self.proxy) as usize,
            leases: self.leases,
            rank: self.rank,
            eligible: self.eligible(),
            checked_at: self.checked_at,
            latency_us: self.latency_us,
        }
    }

    fn contribution(&self) -> Counters {
        let listed = !self.draining;
        Counters {
            total: listed as u32,
            active: (listed && self.active) as u32,
            available: (listed && self.eligible()) as u32,
            leased: (self.leases > 0) as u32,
            leases: self.leases as u64,
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Counters {
    total: u32,
    active: u32,
    available: u32,
    leased: u32,
    leases: u64,
}

impl Counters {
    fn add(&mut self, c: Counters) {
        self.total += c.total;
        self.active += c.active;
        self.available += c.available;
        self.leased += c.leased;
        self.leases += c.leases;
    }

    fn sub(&mut self, c: Counters) {
        self.total -= c.total;
        self.active -= c.active;
        self.available -= c.available;
        self.leased -= c.leased;
        self.leases -= c.leases;
    }
}

/// The round-robin position: the proxy chosen last. Kept as a slot number on the hot path
/// and turned into the proxy id when that slot goes away.
#[derive(Debug, PartialEq)]
enum RrLast {
    None,
    Slot(u32),
    Id(ProxyId),
}

/// A live lease: the slot it holds and what a [`Lease`] needs beyond the slot. (Storing
/// less than a whole `Lease` keeps reference-count traffic off the hot path.)
struct LiveLease {
    slot: u32,
    consumer: Arc<str>,
    acquired_at: SystemTime,
    expires_at: SystemTime,
}

/// What an acquire asks of a pool.
pub(crate) struct Pick<'a> {
    pub selector: Selector,
    pub filter: Option<&'a Filter>,
    /// Proxies never to choose.
    pub exclude: &'a [ProxyId],
    /// When set, the only proxies to choose from.
    pub only: Option<&'a [ProxyId]>,
    pub consumer: &'a Arc<str>,
    pub now: SystemTime,
    pub expires_at: SystemTime,
}

/// A lease given back, with the pool's figures right after.
pub(crate) struct Freed {
    pub lease: Lease,
    pub stats: PoolStats,
}

/// A live lease just taken out of the table: what its [`Lease`] value is made of, so that it
/// can be made after the pool's lock is released.
pub(crate) struct Taken {
    consumer: Arc<str>,
    acquired_at: SystemTime,
    expires_at: SystemTime,
    proxy: Arc<Proxy>,
}

impl Taken {
    pub fn lease(self, id: LeaseId, pool_name: Arc<str>, status: LeaseStatus) -> Lease {
        Lease {
            id,
            pool_name,
            consumer_name: self.consumer,
            acquired_at: self.acquired_at,
            expires_at: self.expires_at,
            status,
            proxy: self.proxy,
            holder: None,
        }
    }
}

/// A pool's counters at one moment, to be made into [`PoolStats`] outside the lock.
#[derive(Clone, Copy)]
pub(crate) struct Figures(Counters);

impl Figures {
    pub fn stats(self, pool_name: Arc<str>) -> PoolStats {
        let c = self.0;
        PoolStats {
            pool_name,
            total: c.total,
            active: c.active,
            available: c.available,
            leased: c.leased,
            total_leases: c.leases,
        }
    }
}

/// The live state of one pool.
pub(crate) struct PoolState {
    name: Arc<str>,
    /// The pool's id (fixed when the pool is created).
    pub id: uuid::Uuid,
    description: Option<String>,
    /// Whose config defines the pool (see `Pool::owner`).
    pub owner: Option<Arc<str>>,
    /// Removed from the inventory; kept until its last lease is released.
    pub removed: bool,
    slots: Vec<Option<Slot>>,
    tombstones: usize,
    by_id: HashMap<ProxyId, u32>,
    views: Vec<View>,
    view_by_key: HashMap<IndexKey, u16>,
    leases: HashMap<LeaseId, LiveLease>,
    /// The round-robin position: the id chosen last (the storage's truth) ...
    rr_last: RrLast,
    /// ... and the first rank to consider next, derived from it.
    rr_from: u32,
    /// A proxy was added since ranks were last computed.
    ranks_dirty: bool,
    /// Filtered acquires so far (the clock of view recency).
    picks: u64,
    /// No lease expires before this time (a lower bound; `None`: no lease).
    next_expiry: Option<SystemTime>,
    /// No rest ends before this time (`None`: no proxy rests).
    next_rest_end: Option<SystemTime>,
    counters: Counters,
    /// Whether `slow` proxies are leased too.
    lease_slow: bool,
}

impl PoolState {
    pub fn new(name: Arc<str>, id: uuid::Uuid, description: Option<String>) -> Self {
        let all = View::new(IndexKey::default());
        Self {
            name,
            id,
            description,
            owner: None,
            removed: false,
            slots: Vec::new(),
            tombstones: 0,
            by_id: HashMap::default(),
            views: vec![all],
            view_by_key: HashMap::from_iter([(IndexKey::default(), 0)]),
            leases: HashMap::default(),
            rr_last: RrLast::None,
            rr_from: 0,
            ranks_dirty: false,
            picks: 0,
            next_expiry: None,
            next_rest_end: None,
            counters: Counters::default(),
            lease_slow: false,
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// Whether `slow` proxies are leased too.
    pub fn lease_slow(&self) -> bool {
        self.lease_slow
    }

    /// Leases `slow` proxies too (or stops); indexes follow.
    pub fn set_lease_slow(&mut self, lease_slow: bool) {
        if self.lease_slow == lease_slow {
            return;
        }
        self.lease_slow = lease_slow;
        for i in 0..self.slots.len() as u32 {
            if self.slots[i as usize].is_some() {
                self.update_slot(i, |s| s.set_leasable_statuses(lease_slow));
            }
        }
    }

    pub fn set_description(&mut self, description: Option<String>) {
        self.description = description;
    }

    pub fn stats(&self) -> PoolStats {
        self.figures().stats(self.name.clone())
    }

    pub fn figures(&self) -> Figures {
        Figures(self.counters)
    }

    /// Applies `change` to a slot and brings counters and indexes up to date.
    fn update_slot(&mut self, i: u32, change: impl FnOnce(&mut Slot)) {
        let slot = self.slots[i as usize].as_mut().expect("live slot");
        let before = slot.snap();
        self.counters.sub(slot.contribution());
        change(slot);
        self.counters.add(slot.contribution());
        if before.record == Arc::as_ptr(&slot.proxy) as usize {
            // Same record, same views: the common path (lease counts, draining).
            let after = slot.snap();
            for &v in &slot.views {
                let was = before.eligible.then_some(&before);
                let is = after.eligible.then_some(&after);
                if was.is_some() || is.is_some() {
                    self.views[v as usize].apply(i, was, is);
                }
            }
            return;
        }
        let old_views = std::mem::replace(&mut slot.views, views_of(&self.views, &slot.proxy));
        let (after, new_views) = (slot.snap(), slot.views.clone());
        for &v in old_views
            .iter()
            .chain(new_views.iter().filter(|v| !old_views.contains(v)))
        {
            let was = (before.eligible && old_views.contains(&v)).then_some(&before);
            let is = (after.eligible && new_views.contains(&v)).then_some(&after);
            if was.is_some() || is.is_some() {
                self.views[v as usize].apply(i, was, is);
            }
        }
    }

    /// Inserts or updates a proxy. An existing proxy keeps its lease count; a draining one
    /// comes back into rotation. Returns true if the pool may have gained capacity.
    pub fn upsert(&mut self, mut proxy: Proxy) -> bool {
        proxy.normalise();
        let proxy = Arc::new(proxy);
        let lease_slow = self.lease_slow;
        if let Some(&i) = self.by_id.get(&proxy.id) {
            self.update_slot(i, |s| {
                s.set_proxy(proxy, lease_slow);
                s.draining = false;
            });
            return true;
        }
        let i = self.slots.len() as u32;
        let views = views_of(&self.views, &proxy);
        self.by_id.insert(proxy.id.clone(), i);
        self.slots
            .push(Some(Slot::new(proxy, views, self.lease_slow)));
        self.ranks_dirty = true;
        self.counters.add(
            self.slots[i as usize]
                .as_ref()
                .map(Slot::contribution)
                .unwrap_or_default(),
        );
        // Enter rotation through the common path, so indexes see it.
        self.update_slot(i, |s| s.draining = false);
        true
    }

    /// Removes a proxy: it drains (no new leases) and disappears with its last lease.
    pub fn remove(&mut self, id: &ProxyId) -> bool {
        let Some(&i) = self.by_id.get(id) else {
            return false;
        };
        self.update_slot(i, |s| s.draining = true);
        self.reap(i);
        true
    }

    /// Marks every proxy as draining (the pool itself is being removed).
    pub fn drain_all(&mut self) {
        self.removed = true;
        let ids: Vec<ProxyId> = self.by_id.keys().cloned().collect();
        for id in ids {
            self.remove(&id);
        }
    }

    /// Drops a draining slot once it carries no lease.
    fn reap(&mut self, i: u32) {
        let Some(slot) = &self.slots[i as usize] else {
            return;
        };
        if !slot.draining || slot.leases > 0 {
            return;
        }
        self.counters.sub(slot.contribution());
        self.by_id.remove(&slot.proxy.id);
        if self.rr_last == RrLast::Slot(i) {
            self.rr_last = RrLast::Id(slot.proxy.id.clone());
        }
        self.slots[i as usize] = None;
        self.tombstones += 1;
        if self.tombstones > 64 && self.tombstones * 2 > self.slots.len() {
            self.compact();
        }
    }

    /// Renumbers slots without tombstones and rebuilds the views.
    fn compact(&mut self) {
        let old = std::mem::take(&mut self.slots);
        let mut renumber = HashMap::default();
        for (i, slot) in old.into_iter().enumerate() {
            if let Some(slot) = slot {
                renumber.insert(i as u32, self.slots.len() as u32);
                self.slots.push(Some(slot));
            }
        }
        self.tombstones = 0;
        for (i, slot) in self.slots.iter().enumerate() {
            let slot = slot.as_ref().expect("compacted");
            self.by_id.insert(slot.proxy.id.clone(), i as u32);
        }
        for live in self.leases.values_mut() {
            live.slot = renumber[&live.slot];
        }
        if let RrLast::Slot(i) = self.rr_last {
            self.rr_last = RrLast::Slot(renumber[&i]);
        }
        self.rebuild_indexes(|_| true);
    }

    /// Sets a proxy's status (and, for a health check, `checked_at` and latency); ends any
    /// rest. Returns the previous status, or `None` for an unknown id.
    pub fn apply_check(&mut self, id: &ProxyId, check: &HealthCheck) -> Option<ProxyStatus> {
        let &i = self.by_id.get(id)?;
        let old = self.slots[i as usize].as_ref()?.proxy.status;
        self.change_record(i, |p| {
            p.status = check.status;
            p.rest_until = None;
            if let Some(at) = check.checked_at {
                p.checked_at = at;
            }
            if check.latency.is_some() {
                p.latency = check.latency;
            }
        });
        Some(old)
    }

    /// Rests an active or slow proxy until `until`; false if it is neither.
    pub fn rest(&mut self, id: &ProxyId, until: std::time::SystemTime) -> bool {
        let Some(&i) = self.by_id.get(id) else {
            return false;
        };
        let status = self.slots[i as usize].as_ref().map(|s| s.proxy.status);
        if !matches!(status, Some(ProxyStatus::Active | ProxyStatus::Slow)) {
            return false;
        }
        self.change_record(i, |p| {
            p.status = ProxyStatus::Inactive;
            p.rest_until = Some(until);
        });
        self.next_rest_end = Some(self.next_rest_end.map_or(until, |t| t.min(until)));
        true
    }

    /// Ends the rests due at `now`; true if any proxy came back.
    fn end_rests(&mut self, now: SystemTime) -> bool {
        if self.next_rest_end.is_none_or(|t| t > now) {
            return false;
        }
        let due: Vec<u32> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let s = s.as_ref()?;
                s.proxy
                    .rest_until
                    .is_some_and(|t| t <= now)
                    .then_some(i as u32)
            })
            .collect();
        for &i in &due {
            self.change_record(i, |p| {
                p.status = ProxyStatus::Active;
                p.rest_until = None;
            });
        }
        self.next_rest_end = self
            .slots
            .iter()
            .flatten()
            .filter_map(|s| s.proxy.rest_until)
            .min();
        !due.is_empty()
    }

    /// Replaces a slot's record with a changed copy; indexes and counters follow.
    fn change_record(&mut self, i: u32, change: impl FnOnce(&mut Proxy)) {
        let lease_slow = self.lease_slow;
        self.update_slot(i, |s| {
            let mut p = (*s.proxy).clone();
            change(&mut p);
            s.set_proxy(Arc::new(p), lease_slow);
        });
    }

    pub fn proxy(&self, id: &ProxyId) -> Option<ProxyInfo> {
        let &i = self.by_id.get(id)?;
        self.slots[i as usize].as_ref().map(info)
    }

    pub fn proxies(&self) -> Vec<ProxyInfo> {
        self.slots.iter().flatten().map(info).collect()
    }

    /// Finds an eligible proxy and leases it under `id`, in one step. Returns the leased
    /// proxy's record; the caller makes the [`Lease`] (outside the lock).
    pub fn acquire(&mut self, pick: &Pick<'_>, id: LeaseId) -> Option<Arc<Proxy>> {
        let i = match pick.only {
            Some(only) => self.choose_among(pick, only),
            None => self.choose(pick.selector, pick.filter, pick.exclude),
        }?;
        if pick.selector == Selector::RoundRobin {
            let slot = self.slots[i as usize].as_ref()?;
            self.rr_last = RrLast::Slot(i);
            self.rr_from = slot.rank.saturating_add(1);
        }
        self.update_slot(i, |s| s.leases += 1);
        let expires_at = pick.expires_at;
        let live = LiveLease {
            slot: i,
            consumer: pick.consumer.clone(),
            acquired_at: pick.now,
            expires_at,
        };
        let proxy = self.slots[i as usize]
            .as_ref()
            .expect("a leased slot is live")
            .proxy
            .clone();
        self.next_expiry = Some(self.next_expiry.map_or(expires_at, |e| e.min(expires_at)));
        self.leases.insert(id, live);
        Some(proxy)
    }

    /// The public view of a live lease.
    fn lease_of(&self, id: LeaseId, live: &LiveLease, status: LeaseStatus) -> Lease {
        let proxy = self.slots[live.slot as usize]
            .as_ref()
            .expect("a leased slot is live")
            .proxy
            .clone();
        Lease {
            id,
            pool_name: self.name.clone(),
            consumer_name: live.consumer.clone(),
            acquired_at: live.acquired_at,
            expires_at: live.expires_at,
            status,
            proxy,
            holder: None,
        }
    }

    /// The slot the selector prefers among the eligible proxies of `only` that match the
    /// filter and are not excluded: a scan of the listed ids, for small sets.
    fn choose_among(&mut self, pick: &Pick<'_>, only: &[ProxyId]) -> Option<u32> {
        if self.ranks_dirty && uses_rank(pick.selector) {
            self.rebuild_ranks();
        }
        let candidates = only.iter().filter_map(|id| {
            let &i = self.by_id.get(id)?;
            let slot = self.slots[i as usize].as_ref()?;
            let ok = slot.eligible()
                && !pick.exclude.contains(id)
                && pick.filter.is_none_or(|f| f.matches(&slot.proxy));
            ok.then_some((i, slot))
        });
        let rr_from = self.rr_from;
        match pick.selector {
            Selector::FirstAvailable => candidates.min_by_key(|(i, _)| *i).map(|(i, _)| i),
            Selector::RoundRobin => candidates
                .min_by_key(|(i, s)| (s.rank < rr_from, s.rank, *i))
                .map(|(i, _)| i),
            Selector::LeastUsed => candidates
                .min_by_key(|(i, s)| (s.leases, s.checked_at, s.rank, *i))
                .map(|(i, _)| i),
            Selector::LowestLatency => candidates
                .min_by_key(|(i, s)| (s.latency_us, s.leases, s.rank, *i))
                .map(|(i, _)| i),
            Selector::Random => {
                let all: SmallVec<[u32; 8]> = candidates.map(|(i, _)| i).collect();
                (!all.is_empty()).then(|| all[fastrand::usize(..all.len())])
            }
        }
    }

    /// The slot the selector prefers among eligible proxies matching the filter.
    fn choose(
        &mut self,
        selector: Selector,
        filter: Option<&Filter>,
        exclude: &[ProxyId],
    ) -> Option<u32> {
        if self.ranks_dirty && uses_rank(selector) {
            self.rebuild_ranks();
        }
        let (view, residual) = match filter {
            None => (0, None),
            Some(f) => match self.view_for(&f.index_key()) {
                Some(v) => (v, Some(f).filter(|f| f.has_residual())),
                None => (0, Some(f)),
            },
        };
        let k = selector_slot(selector);
        if self.views[view as usize].indexes[k].is_none() {
            self.build_index(view, selector);
        }
        let index = self.views[view as usize].indexes[k].as_ref()?;
        let start = if selector == Selector::Random {
            fastrand::usize(..)
        } else {
            0
        };
        if residual.is_none() && exclude.is_empty() {
            return index.first(self.rr_from, start);
        }
        index.candidates(self.rr_from, start).find(|&s| {
            self.slots[s as usize].as_ref().is_some_and(|slot| {
                !exclude.contains(&slot.proxy.id) && residual.is_none_or(|f| f.matches(&slot.proxy))
            })
        })
    }

    /// Numbers the live slots in id order, re-derives the round-robin position, and
    /// rebuilds the indexes whose keys use ranks.
    fn rebuild_ranks(&mut self) {
        let mut order: Vec<(ProxyId, u32)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (s.proxy.id.clone(), i as u32)))
            .collect();
        order.sort_unstable();
        for (rank, (_, i)) in order.iter().enumerate() {
            if let Some(slot) = self.slots[*i as usize].as_mut() {
                slot.rank = rank as u32;
            }
        }
        let last = match &self.rr_last {
            RrLast::None => None,
            RrLast::Slot(i) => self.slots[*i as usize].as_ref().map(|s| s.proxy.id.clone()),
            RrLast::Id(id) => Some(id.clone()),
        };
        self.rr_from = last.map_or(0, |last| {
            order.partition_point(|(id, _)| *id <= last) as u32
        });
        self.ranks_dirty = false;
        self.rebuild_indexes(uses_rank);
    }

    /// Rebuilds the built indexes of every view whose selector passes `which`.
    fn rebuild_indexes(&mut self, which: fn(Selector) -> bool) {
        for v in 0..self.views.len() {
            for &selector in Selector::ALL {
                let k = selector_slot(selector);
                if which(selector) && self.views[v].indexes[k].is_some() {
                    self.build_index(v as u16, selector);
                }
            }
        }
    }

    /// The view for a key, created (with a scan of the slots) on first use; `None` when
    /// the pool keeps its most views and none of them is idle enough to give way.
    fn view_for(&mut self, key: &IndexKey) -> Option<u16> {
        self.picks += 1;
        if let Some(&v) = self.view_by_key.get(key) {
            self.views[v as usize].last_used = self.picks;
            return Some(v);
        }
        let v = if self.views.len() < MAX_VIEWS {
            self.views.push(View::new(key.clone()));
            (self.views.len() - 1) as u16
        } else {
            let (v, view) = self
                .views
                .iter()
                .enumerate()
                .skip(1)
                .min_by_key(|(_, view)| view.last_used)?;
            if view.last_used + VIEW_IDLE_PICKS > self.picks {
                return None;
            }
            self.evict_view(v as u16);
            self.views[v] = View::new(key.clone());
            v as u16
        };
        self.views[v as usize].last_used = self.picks;
        self.view_by_key.insert(key.clone(), v);
        for slot in self.slots.iter_mut().flatten() {
            if key.matches(&slot.proxy) {
                slot.views.push(v);
            }
        }
        Some(v)
    }

    /// Forgets view `v` (its slot in `views` is about to be reused).
    fn evict_view(&mut self, v: u16) {
        self.view_by_key.remove(&self.views[v as usize].key);
        for slot in self.slots.iter_mut().flatten() {
            slot.views.retain(|x| *x != v);
        }
    }

    /// Views kept (view 0, the whole pool, included).
    pub fn view_count(&self) -> usize {
        self.views.len()
    }

    fn build_index(&mut self, view: u16, selector: Selector) {
        let mut index = Index::new(selector);
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(slot) = slot
                && slot.views.contains(&view)
                && slot.eligible()
            {
                index.insert(i as u32, &slot.snap());
            }
        }
        self.views[view as usize].indexes[selector_slot(selector)] = Some(index);
    }

    /// Gives a lease back. `None` if it is not live (already released, expired, unknown).
    pub fn release(&mut self, id: LeaseId, status: LeaseStatus) -> Option<Freed> {
        let taken = self.take(id)?;
        Some(Freed {
            lease: taken.lease(id, self.name.clone(), status),
            stats: self.stats(),
        })
    }

    /// Gives a lease back and returns what its [`Lease`] is made of. `None` if it is not
    /// live (already released, expired, unknown).
    pub fn take(&mut self, id: LeaseId) -> Option<Taken> {
        let live = self.leases.remove(&id)?;
        let proxy = self.slots[live.slot as usize]
            .as_ref()
            .expect("a leased slot is live")
            .proxy
            .clone();
        self.update_slot(live.slot, |s| s.leases -= 1);
        self.reap(live.slot);
        if self.leases.is_empty() {
            self.next_expiry = None;
        }
        Some(Taken {
            consumer: live.consumer,
            acquired_at: live.acquired_at,
            expires_at: live.expires_at,
            proxy,
        })
    }

    /// Moves a live lease's expiry; false if it is not live (or already past its expiry at
    /// `now`: it is lost, and the next sweep releases it).
    pub fn renew(&mut self, id: LeaseId, now: SystemTime, expires_at: SystemTime) -> bool {
        let Some(live) = self.leases.get_mut(&id).filter(|l| l.expires_at > now) else {
            return false;
        };
        live.expires_at = expires_at;
        self.next_expiry = Some(self.next_expiry.map_or(expires_at, |e| e.min(expires_at)));
        true
    }

    pub fn lease(&self, id: LeaseId) -> Option<Lease> {
        self.leases
            .get(&id)
            .map(|l| self.lease_of(id, l, LeaseStatus::Active))
    }

    pub fn leases(&self) -> impl Iterator<Item = Lease> + '_ {
        self.leases
            .iter()
            .map(|(id, l)| self.lease_of(*id, l, LeaseStatus::Active))
    }

    /// Is any lease possibly due at `now`? (Cheap check before a sweep.)
    pub fn expiry_due(&self, now: SystemTime) -> bool {
        self.next_expiry.is_some_and(|e| e <= now)
    }

    /// Releases every lease whose `expires_at <= now` (appending them to `out`) and ends the
    /// rests due. True if a rest ended (the pool may have gained capacity).
    pub fn sweep(&mut self, now: SystemTime, out: &mut Vec<Freed>) -> bool {
        let rested = self.end_rests(now);
        if !self.expiry_due(now) {
            return rested;
        }
        let due: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires_at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            out.extend(self.release(id, LeaseStatus::Expired));
        }
        self.next_expiry = self.leases.values().map(|l| l.expires_at).min();
        rested
    }

    /// True when the pool is removed and nothing holds it any more.
    pub fn is_gone(&self) -> bool {
        self.removed && self.leases.is_empty()
    }
}

fn views_of(views: &[View], proxy: &Proxy) -> SmallVec<[u16; 4]> {
    views
        .iter()
        .enumerate()
        .filter(|(_, v)| v.key.matches(proxy))
        .map(|(i, _)| i as u16)
        .collect()
}

fn info(slot: &Slot) -> ProxyInfo {
    ProxyInfo {
        proxy: slot.proxy.clone(),
        current_leases: slot.leases,
        draining: slot.draining,
    }
}
