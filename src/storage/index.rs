//! The selector indexes of the in-memory storage: per view, one ordered set of the eligible
//! slots per selector, kept current from before/after snapshots of a slot.

use std::collections::BTreeSet;
use std::time::SystemTime;

use crate::filter::IndexKey;
use crate::selector::Selector;

/// What an index needs to know about a slot before or after a change.
pub(super) struct Snap {
    /// Address of the proxy record, to tell whether it was replaced.
    pub(super) record: usize,
    pub(super) leases: u32,
    pub(super) rank: u32,
    pub(super) eligible: bool,
    pub(super) checked_at: SystemTime,
    pub(super) latency_us: u64,
}

/// Rank of a slot added since the last rank rebuild.
pub(super) const UNRANKED: u32 = u32::MAX;

/// Rank and slot in one integer: ordered by rank, unique by slot.
pub(super) fn ranked(rank: u32, slot: u32) -> u64 {
    (u64::from(rank) << 32) | u64::from(slot)
}

pub(super) fn slot_of(key: u64) -> u32 {
    key as u32
}

/// Sort key of `lowest_latency`: measured latency in µs (unmeasured last), leases, rank.
type LatencyKey = (u64, u32, u64);
/// Sort key of `least_used`: leases, oldest `checked_at`, rank.
type LeastUsedKey = (u32, SystemTime, u64);

/// The eligible slots of one view in one selector's order.
pub(super) enum Index {
    /// Insertion order (slot number).
    First(BTreeSet<u32>),
    /// Id order (`ranked`).
    Id(BTreeSet<u64>),
    LeastUsed(BTreeSet<LeastUsedKey>),
    Latency(BTreeSet<LatencyKey>),
    /// Unordered, for uniform random picks: the slots, and each slot's place among them
    /// (`u32::MAX`: absent).
    Random {
        items: Vec<u32>,
        pos: Vec<u32>,
    },
}

impl Index {
    pub(super) fn new(selector: Selector) -> Self {
        match selector {
            Selector::FirstAvailable => Index::First(BTreeSet::new()),
            Selector::RoundRobin => Index::Id(BTreeSet::new()),
            Selector::LeastUsed => Index::LeastUsed(BTreeSet::new()),
            Selector::LowestLatency => Index::Latency(BTreeSet::new()),
            Selector::Random => Index::Random {
                items: Vec::new(),
                pos: Vec::new(),
            },
        }
    }

    /// Does moving from `before` to `after` change this index's key for the slot?
    pub(super) fn key_changed(&self, before: &Snap, after: &Snap) -> bool {
        match self {
            Index::First(_) | Index::Random { .. } => false,
            Index::Id(_) => before.rank != after.rank,
            Index::LeastUsed(_) => {
                before.leases != after.leases
                    || before.checked_at != after.checked_at
                    || before.rank != after.rank
            }
            Index::Latency(_) => {
                before.leases != after.leases
                    || before.latency_us != after.latency_us
                    || before.rank != after.rank
            }
        }
    }

    pub(super) fn insert(&mut self, slot: u32, s: &Snap) {
        match self {
            Index::First(set) => {
                set.insert(slot);
            }
            Index::Id(set) => {
                set.insert(ranked(s.rank, slot));
            }
            Index::LeastUsed(set) => {
                set.insert(least_used_key(slot, s));
            }
            Index::Latency(set) => {
                set.insert(latency_key(slot, s));
            }
            Index::Random { items, pos } => {
                let i = slot as usize;
                if pos.len() <= i {
                    pos.resize(i + 1, u32::MAX);
                }
                pos[i] = items.len() as u32;
                items.push(slot);
            }
        }
    }

    pub(super) fn remove(&mut self, slot: u32, s: &Snap) {
        match self {
            Index::First(set) => {
                set.remove(&slot);
            }
            Index::Id(set) => {
                set.remove(&ranked(s.rank, slot));
            }
            Index::LeastUsed(set) => {
                set.remove(&least_used_key(slot, s));
            }
            Index::Latency(set) => {
                set.remove(&latency_key(slot, s));
            }
            Index::Random { items, pos } => {
                let Some(p) = pos.get_mut(slot as usize) else {
                    return;
                };
                let i = std::mem::replace(p, u32::MAX);
                if i == u32::MAX {
                    return;
                }
                items.swap_remove(i as usize);
                if let Some(&moved) = items.get(i as usize) {
                    pos[moved as usize] = i;
                }
            }
        }
    }

    /// Eligible slots in this index's preference order. `rr_from` is the first rank
    /// `round_robin` considers (then it wraps around); `start` rotates the random index.
    pub(super) fn candidates<'a>(
        &'a self,
        rr_from: u32,
        start: usize,
    ) -> Box<dyn Iterator<Item = u32> + 'a> {
        match self {
            Index::First(set) => Box::new(set.iter().copied()),
            Index::Id(set) => {
                let from = ranked(rr_from, 0);
                Box::new(
                    set.range(from..)
                        .chain(set.range(..from))
                        .map(|k| slot_of(*k)),
                )
            }
            Index::LeastUsed(set) => Box::new(set.iter().map(|k| slot_of(k.2))),
            Index::Latency(set) => Box::new(set.iter().map(|k| slot_of(k.2))),
            Index::Random { items, .. } => {
                let start = if items.is_empty() {
                    0
                } else {
                    start % items.len()
                };
                Box::new(items[start..].iter().chain(&items[..start]).copied())
            }
        }
    }

    /// The preferred candidate without a residual filter, without building an iterator.
    pub(super) fn first(&self, rr_from: u32, start: usize) -> Option<u32> {
        match self {
            Index::First(set) => set.first().copied(),
            Index::Id(set) => set
                .range(ranked(rr_from, 0)..)
                .next()
                .or_else(|| set.first())
                .map(|k| slot_of(*k)),
            Index::LeastUsed(set) => set.first().map(|k| slot_of(k.2)),
            Index::Latency(set) => set.first().map(|k| slot_of(k.2)),
            Index::Random { items, .. } => (!items.is_empty()).then(|| items[start % items.len()]),
        }
    }
}

fn least_used_key(slot: u32, s: &Snap) -> LeastUsedKey {
    (s.leases, s.checked_at, ranked(s.rank, slot))
}

fn latency_key(slot: u32, s: &Snap) -> LatencyKey {
    (s.latency_us, s.leases, ranked(s.rank, slot))
}

pub(super) fn uses_rank(selector: Selector) -> bool {
    matches!(
        selector,
        Selector::RoundRobin | Selector::LeastUsed | Selector::LowestLatency
    )
}

/// Selector indexes of one subset of the pool.
pub(super) struct View {
    pub(super) key: IndexKey,
    /// One index per selector, built on first use.
    pub(super) indexes: [Option<Index>; 5],
    /// When it was last used (the pool's count of filtered acquires).
    pub(super) last_used: u64,
}

impl View {
    pub(super) fn new(key: IndexKey) -> Self {
        Self {
            key,
            indexes: Default::default(),
            last_used: 0,
        }
    }
}

pub(super) fn selector_slot(selector: Selector) -> usize {
    match selector {
        Selector::FirstAvailable => 0,
        Selector::LeastUsed => 1,
        Selector::RoundRobin => 2,
        Selector::LowestLatency => 3,
        Selector::Random => 4,
    }
}

impl View {
    pub(super) fn apply(&mut self, slot: u32, before: Option<&Snap>, after: Option<&Snap>) {
        for index in self.indexes.iter_mut().flatten() {
            match (before, after) {
                (Some(b), Some(a)) if !index.key_changed(b, a) => {}
                _ => {
                    if let Some(b) = before {
                        index.remove(slot, b);
                    }
                    if let Some(a) = after {
                        index.insert(slot, a);
                    }
                }
            }
        }
    }
}
