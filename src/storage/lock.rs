//! [`PoolLock`]: the mutex of one pool's state, built for short critical sections that several
//! threads hit back to back.
//!
//! Every operation on a pool reads and writes the same state (the selector indexes, the
//! lease table, the counters): all of it moves between cores whenever the lock changes hands,
//! at a few hundred nanoseconds per cache line on a virtual machine, which is more than a
//! whole critical section. A fair lock, or an unfair one whose waiters grab it whenever it is
//! free for a moment, makes two busy threads take turns at every operation, and each turn
//! pays that transfer: two threads then lease less than one. (`std`'s mutex adds a futex wake
//! to nearly every unlock on top.) So this lock lets its holder keep it for a *burst*: a
//! thread that finds it taken registers as a waiter and does not take it merely because it is
//! free between two of the holder's critical sections. It gets it
//!
//! - when the holder hands it over: after [`BURST`] acquisitions in a row while someone
//!   waited, the holder's unlock marks it `HANDOFF`, which only a thread that was already
//!   waiting may take;
//! - when it stays free: seen free at two polls (1 to 16 µs apart) with no acquisition in
//!   between (the holder has gone);
//! - after [`PATIENCE`] of waiting: whenever it is free.
//!
//! The state moves once per burst instead of once per operation. Waiters spin on a hand-over
//! counter on a line of its own, which the holder writes only when it hands over, and look at
//! the lock's word itself rarely: each look costs the holder a line transfer, so the looks
//! follow one doubling schedule ([`FIRST_POLL`] to [`LAST_POLL`]) whatever the waiter does
//! between them, and a spinning waiter reads the clock only every [`CLOCK_EVERY`] spins
//! (a waiter that looked at the word after every yield, or read the clock at every spin,
//! slowed the holder by a fifth and more: benches/README.md). Waiters yield their core after
//! [`SPIN_FOR`] (more runnable threads than cores: let the holder run) and sleep between
//! looks after [`SLEEP_AFTER`]. Nothing here affects what the state does: the lock only
//! decides who runs the next critical section, and each one still runs alone, start to end.
//!
//! The crate has no `unsafe` code, so the state itself sits in a `std::sync::Mutex` behind
//! this gate: only the gate's holder ever locks it, so that mutex is never contended (two
//! atomic operations on a line the holder already owns).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Held.
const LOCKED: u64 = 1;
/// Free, but only for a thread that was waiting when the holder handed it over.
const HANDOFF: u64 = 2;
/// One waiter (bits 2..20 count them).
const WAITER: u64 = 1 << 2;
const WAITERS: u64 = ((1 << 18) - 1) << 2;
/// One acquisition or hand-over (bits 20..64 count them, wrapping).
const SEQ: u64 = 1 << 20;

/// Acquisitions in a row a holder may make while others wait (benches/README.md: 1 024 against
/// 128, measured in paired rounds).
pub(super) const BURST: u32 = 1024;
/// First and longest time between a waiter's looks at the lock's word (doubling).
const FIRST_POLL: Duration = Duration::from_micros(1);
const LAST_POLL: Duration = Duration::from_micros(64);
/// Spins between a spinning waiter's clock reads (one to a few µs of `pause`s, by CPU).
const CLOCK_EVERY: u32 = 64;
/// Waiting after which a free lock is taken at once.
const PATIENCE: Duration = Duration::from_millis(1);
/// Waiting after which a waiter yields its core between its looks at the hand-over counter ...
const SPIN_FOR: Duration = Duration::from_micros(300);
/// ... and after which it sleeps between polls.
const SLEEP_AFTER: Duration = Duration::from_millis(3);
const SLEEP: Duration = Duration::from_micros(50);

/// A counter on a line of its own.
#[repr(align(128))]
struct Padded(AtomicU64);

/// A mutex; see the module's documentation.
pub(super) struct PoolLock<T> {
    word: AtomicU64,
    /// Acquisitions in a row by the current holder while someone waited. Only the holder
    /// reads or writes it.
    burst: AtomicU32,
    data: Mutex<T>,
    /// Hand-overs so far: waiters spin on this line, which the holder writes only when it
    /// hands over, instead of on `word`, which it writes at every acquisition.
    handoffs: Padded,
}

impl<T> PoolLock<T> {
    pub(super) fn new(data: T) -> Self {
        Self {
            word: AtomicU64::new(0),
            burst: AtomicU32::new(0),
            data: Mutex::new(data),
            handoffs: Padded(AtomicU64::new(0)),
        }
    }

    pub(super) fn lock(&self) -> PoolGuard<'_, T> {
        let w = self.word.load(Ordering::Relaxed);
        if w & (LOCKED | HANDOFF) == 0
            && self
                .word
                .compare_exchange_weak(
                    w,
                    w.wrapping_add(SEQ) | LOCKED,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return self.guard();
        }
        self.lock_slow()
    }

    /// The state, once the gate is held.
    fn guard(&self) -> PoolGuard<'_, T> {
        PoolGuard {
            // The state is only mutated through methods that do not panic midway: a panic
            // while holding it (which poisons it) leaves it consistent.
            data: self.data.lock().unwrap_or_else(|e| e.into_inner()),
            _gate: Gate(self),
        }
    }

    #[cold]
    fn lock_slow(&self) -> PoolGuard<'_, T> {
        let mut w = self.word.fetch_add(WAITER, Ordering::Relaxed) + WAITER;
        let registered = w >> 20;
        let mut handoffs = self.handoffs.0.load(Ordering::Acquire);
        let start = Instant::now();
        let mut previous = None;
        let mut poll = FIRST_POLL;
        let mut next_look = start + poll;
        let mut spins = 0u32;
        let mut yielding = false;
        loop {
            if w & LOCKED == 0 {
                let handed_over = w & HANDOFF != 0 && w >> 20 != registered;
                let gone = w & HANDOFF == 0 && previous == Some(w);
                if handed_over || gone || start.elapsed() >= PATIENCE {
                    let next = (w.wrapping_add(SEQ) | LOCKED) & !HANDOFF;
                    match self.word.compare_exchange(
                        w,
                        next - WAITER,
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => {
                            self.burst.store(0, Ordering::Relaxed);
                            return self.guard();
                        }
                        Err(now) => {
                            w = now;
                            continue;
                        }
                    }
                }
            }
            previous = Some(w);
            // Wait for a hand-over or the next look at the word, whichever comes first.
            loop {
                let h = self.handoffs.0.load(Ordering::Acquire);
                if h != handoffs {
                    handoffs = h;
                    break;
                }
                // While spinning, the clock only every few spins: a waiter that reads it
                // at every spin slows the holder down (benches/README.md).
                spins = spins.wrapping_add(1);
                if !yielding && !spins.is_multiple_of(CLOCK_EVERY) {
                    std::hint::spin_loop();
                    continue;
                }
                let now = Instant::now();
                if now >= next_look {
                    poll = (poll * 2).min(LAST_POLL);
                    next_look = now + poll;
                    break;
                }
                let waited = now - start;
                yielding = waited >= SPIN_FOR;
                if waited >= SLEEP_AFTER {
                    std::thread::sleep(SLEEP);
                } else if yielding {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
            w = self.word.load(Ordering::Relaxed);
        }
    }

    fn unlock(&self) {
        // Only the holder changes LOCKED, HANDOFF and SEQ; waiters only add themselves, so
        // WAITERS read here can only have grown by the time the update below lands.
        let w = self.word.load(Ordering::Relaxed);
        if w & WAITERS != 0 {
            let burst = self.burst.load(Ordering::Relaxed) + 1;
            self.burst.store(burst % BURST, Ordering::Relaxed);
            if burst >= BURST {
                // LOCKED -> HANDOFF (bit 0 carries into bit 1), and a new SEQ, so that only
                // threads registered before now may take it.
                self.word
                    .fetch_add(HANDOFF - LOCKED + SEQ, Ordering::Release);
                self.handoffs.0.fetch_add(1, Ordering::Release);
                return;
            }
        } else {
            self.burst.store(0, Ordering::Relaxed);
        }
        self.word.fetch_sub(LOCKED, Ordering::Release);
    }
}

/// Access to the locked state; unlocks when dropped (the state's mutex first, then the
/// gate: fields drop in order).
pub(super) struct PoolGuard<'a, T> {
    data: MutexGuard<'a, T>,
    _gate: Gate<'a, T>,
}

/// The held gate; opens it when dropped.
struct Gate<'a, T>(&'a PoolLock<T>);

impl<T> Drop for Gate<'_, T> {
    fn drop(&mut self) {
        self.0.unlock();
    }
}

impl<T> Deref for PoolGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.data
    }
}

impl<T> DerefMut for PoolGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Threads increment a counter that is not atomic: the total is exact only under mutual
    /// exclusion. Every thread finishes (no deadlock, no thread left behind).
    #[test]
    fn excludes_and_every_thread_finishes() {
        for threads in [2, 3, 8] {
            let lock = Arc::new(PoolLock::new((0u64, 0u64)));
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let lock = lock.clone();
                    std::thread::spawn(move || {
                        for i in 0..20_000u64 {
                            let mut g = lock.lock();
                            let (count, last) = &mut *g;
                            *count += 1;
                            *last = t * 1_000_000 + i;
                            if i % 1000 == 0 {
                                drop(g);
                                std::thread::yield_now();
                            }
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            assert_eq!(lock.lock().0, threads * 20_000);
            assert_eq!(lock.word.load(Ordering::Relaxed) & (LOCKED | WAITERS), 0);
        }
    }

    /// A holder that keeps coming back hands the lock over to a waiter after a burst.
    #[test]
    fn a_waiter_gets_a_busy_lock() {
        let lock = Arc::new(PoolLock::new(0u32));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hog = {
            let (lock, stop) = (lock.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    *lock.lock() += 1;
                }
            })
        };
        for _ in 0..100 {
            *lock.lock() += 1;
        }
        stop.store(true, Ordering::Relaxed);
        hog.join().unwrap();
    }

    #[test]
    fn unlocking_with_nobody_waiting_leaves_it_free() {
        let lock = PoolLock::new(());
        for _ in 0..(BURST * 3) {
            drop(lock.lock());
        }
        assert_eq!(lock.word.load(Ordering::Relaxed) & (LOCKED | HANDOFF), 0);
    }

    /// A guard dropped by unwinding unlocks.
    #[test]
    fn a_panic_while_held_unlocks() {
        let lock = Arc::new(PoolLock::new(1u8));
        let l = lock.clone();
        let r = std::thread::spawn(move || {
            let _g = l.lock();
            panic!("while held");
        })
        .join();
        assert!(r.is_err());
        assert_eq!(*lock.lock(), 1);
    }
}
