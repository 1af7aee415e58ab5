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
    First(SlotBits),
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
            Selector::FirstAvailable => Index::First(SlotBits::default()),
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
            Index::First(set) => set.insert(slot),
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
            Index::First(set) => set.remove(slot),
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
            Index::First(set) => Box::new(set.iter()),
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
            Index::First(set) => set.first(),
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

/// A set of slot numbers in slot order: one bit per slot, and one bit per 64 slots telling
/// which words of the first level have a bit set, so that the lowest member is found by
/// scanning 1/4 096 of the slot range. Inserting and removing never allocate once the
/// set has grown to the highest slot (a `BTreeSet` splits and merges nodes when the same
/// few slots come and go, as they do under `first_available`).
#[derive(Default)]
pub(super) struct SlotBits {
    words: Vec<u64>,
    /// Bit `i % 64` of `summary[i / 64]`: `words[i]` is not zero.
    summary: Vec<u64>,
}

impl SlotBits {
    pub(super) fn insert(&mut self, slot: u32) {
        let w = (slot / 64) as usize;
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
            self.summary.resize(w / 64 + 1, 0);
        }
        self.words[w] |= 1 << (slot % 64);
        self.summary[w / 64] |= 1 << (w % 64);
    }

    pub(super) fn remove(&mut self, slot: u32) {
        let w = (slot / 64) as usize;
        let Some(word) = self.words.get_mut(w) else {
            return;
        };
        *word &= !(1 << (slot % 64));
        if *word == 0 {
            self.summary[w / 64] &= !(1 << (w % 64));
        }
    }

    /// The lowest member.
    pub(super) fn first(&self) -> Option<u32> {
        self.next_from(0)
    }

    /// The lowest member at or after word `w` of the first level.
    fn next_from(&self, w: usize) -> Option<u32> {
        let mut s = w / 64;
        let mut mask = u64::MAX << (w % 64);
        while let Some(&bits) = self.summary.get(s) {
            let live = bits & mask;
            if live != 0 {
                let w = s * 64 + live.trailing_zeros() as usize;
                let slot = w * 64 + self.words[w].trailing_zeros() as usize;
                return Some(slot as u32);
            }
            s += 1;
            mask = u64::MAX;
        }
        None
    }

    /// The members in slot order.
    pub(super) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let mut next = self.first();
        std::iter::from_fn(move || {
            let slot = next?;
            let w = (slot / 64) as usize;
            // The rest of this word, then the next word with a member.
            let rest = self.words[w] & (u64::MAX << (slot % 64)) & !(1 << (slot % 64));
            next = if rest != 0 {
                Some((w * 64) as u32 + rest.trailing_zeros())
            } else {
                self.next_from(w + 1)
            };
            Some(slot)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::SlotBits;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        /// Against a `BTreeSet`: the same members, the same lowest, the same order, after
        /// any sequence of inserts and removes (slots spread over several summary words).
        #[test]
        fn slot_bits_is_an_ordered_set(ops in prop::collection::vec((any::<bool>(), 0u32..9_000), 0..400)) {
            let mut bits = SlotBits::default();
            let mut model = BTreeSet::new();
            for (add, slot) in ops {
                if add {
                    bits.insert(slot);
                    model.insert(slot);
                } else {
                    bits.remove(slot);
                    model.remove(&slot);
                }
                prop_assert_eq!(bits.first(), model.first().copied());
            }
            prop_assert_eq!(bits.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
        }
    }

    #[test]
    fn edges_of_words() {
        let mut bits = SlotBits::default();
        assert_eq!(bits.first(), None);
        bits.remove(5);
        for slot in [63, 64, 4_095, 4_096, 0] {
            bits.insert(slot);
        }
        assert_eq!(
            bits.iter().collect::<Vec<_>>(),
            vec![0, 63, 64, 4_095, 4_096]
        );
        bits.remove(0);
        bits.remove(63);
        assert_eq!(bits.first(), Some(64));
        bits.remove(64);
        bits.remove(4_095);
        assert_eq!(bits.first(), Some(4_096));
        bits.remove(4_096);
        assert_eq!(bits.first(), None);
        assert_eq!(bits.iter().count(), 0);
    }
}
