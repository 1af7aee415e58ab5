//! Per-thread copies of pool and consumer names, for the in-memory storage's hot path.
//!
//! Every lease and every [`crate::model::PoolStats`] carries its pool's name (and a lease its
//! consumer's) as an `Arc<str>`. Cloning and dropping one `Arc` from several threads makes its
//! reference count a cache line that all of them write: at a few hundred nanoseconds per
//! transfer between cores, that alone costs more than a whole acquire + release pair on one
//! thread. So each thread hands out clones of *its own* copy of a name it uses often (same
//! text, its own allocation and count): a thread's leases touch only counts that thread owns.
//! Names are compared by value everywhere; nothing relies on two leases sharing an allocation.
//!
//! The copies sit in a small direct-mapped table per thread. A name gets its own copy on its
//! fourth use in a row of its entry; until then (and for names that keep evicting each other)
//! the caller's `Arc` is cloned, as before, so many distinct names cost no allocations.

use std::cell::RefCell;
use std::hash::Hasher;
use std::sync::Arc;

/// Entries per thread (a power of two).
const ENTRIES: usize = 64;
/// Uses of an entry after which its name gets a copy of the thread's own.
const OWN_AFTER: u32 = 4;

struct Kept {
    name: Arc<str>,
    /// `name` is this thread's own copy (else a clone of a caller's `Arc`).
    own: bool,
    uses: u32,
    /// The storage (`InMemoryStorage::id`) that last recorded this name as a consumer, so that
    /// recording it is skipped while the same storage keeps seeing it (0: none).
    consumer_of: u64,
}

thread_local! {
    static KEPT: RefCell<[Option<Kept>; ENTRIES]> = const { RefCell::new([const { None }; ENTRIES]) };
}

/// A clone of this thread's copy of `name` (or of `name` itself, see the module's doc).
pub(super) fn local(name: &Arc<str>) -> Arc<str> {
    with_kept(name, |k| k.name.clone()).unwrap_or_else(|| name.clone())
}

/// [`local`] for a consumer's name; calls `record` first, once per storage while the name's
/// entry stays in this thread's table, so that the storage knows the consumer.
pub(super) fn local_consumer(name: &Arc<str>, storage: u64, record: impl FnOnce()) -> Arc<str> {
    let mut record = Some(record);
    let kept = with_kept(name, |k| {
        if k.consumer_of != storage {
            if let Some(record) = record.take() {
                record();
            }
            k.consumer_of = storage;
        }
        k.name.clone()
    });
    kept.unwrap_or_else(|| {
        if let Some(record) = record {
            record();
        }
        name.clone()
    })
}

/// Runs `f` on the entry of `name` (made if needed); `None` while the thread is being torn
/// down.
fn with_kept<R>(name: &Arc<str>, f: impl FnOnce(&mut Kept) -> R) -> Option<R> {
    KEPT.try_with(|table| {
        let mut table = table.borrow_mut();
        let mut h = rustc_hash::FxHasher::default();
        h.write(name.as_bytes());
        let entry = &mut table[h.finish() as usize & (ENTRIES - 1)];
        let kept = match entry {
            Some(k) if *k.name == **name => {
                if !k.own {
                    k.uses += 1;
                    if k.uses >= OWN_AFTER {
                        k.name = Arc::from(&**name);
                        k.own = true;
                    }
                }
                k
            }
            _ => entry.insert(Kept {
                name: name.clone(),
                own: false,
                uses: 1,
                consumer_of: 0,
            }),
        };
        f(kept)
    })
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_in_use_gets_a_copy_of_its_own() {
        let shared: Arc<str> = Arc::from("names-test-pool");
        let first = local(&shared);
        assert!(Arc::ptr_eq(&first, &shared), "not yet worth a copy");
        let copies: Vec<Arc<str>> = (0..8).map(|_| local(&shared)).collect();
        let last = copies.last().unwrap();
        assert_eq!(&**last, "names-test-pool");
        assert!(!Arc::ptr_eq(last, &shared));
        assert!(Arc::ptr_eq(last, &local(&shared)));
        let theirs = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                for _ in 0..7 {
                    local(&shared);
                }
                local(&shared)
            })
            .join()
            .unwrap()
        };
        assert_eq!(&*theirs, "names-test-pool");
        assert!(!Arc::ptr_eq(last, &theirs));
    }

    #[test]
    fn a_consumer_is_recorded_once_per_storage() {
        let name: Arc<str> = Arc::from("names-test-consumer");
        let mut calls = 0;
        for _ in 0..10 {
            local_consumer(&name, 7, || calls += 1);
        }
        assert_eq!(calls, 1);
        local_consumer(&name, 8, || calls += 1);
        local_consumer(&name, 7, || calls += 1);
        assert_eq!(calls, 3);
    }

    #[test]
    fn names_that_evict_each_other_stay_correct() {
        let names: Vec<Arc<str>> = (0..500)
            .map(|i| Arc::from(format!("n{i}").as_str()))
            .collect();
        let mut calls = 0;
        for _ in 0..3 {
            for name in &names {
                assert_eq!(&*local(name), &**name);
                assert_eq!(&*local_consumer(name, 3, || calls += 1), &**name);
            }
        }
        // Each name was recorded at least once and at most once per round.
        assert!((500..=1500).contains(&calls), "{calls}");
    }
}
