//! Acquire + release pairs per second: the in-memory storage through the manager, for pools
//! of 10, 1 000 and 100 000 exclusive proxies, each selector: one thread (`1t`), two threads
//! contending on one pool (`2t`), two threads on one pool taking turns on a counter of their
//! own (`2t-turns`: the pool's lock is never contended, a floor for any lock that lets one
//! thread at a time run a burst), two threads each on its own pool of the same storage
//! (`2t-2pools`), next to a naive baseline (a `Mutex<Vec<_>>` scanned linearly on every
//! acquire, as the Python library does). Run with `cargo bench --bench lease`.

use std::future::Future;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pharox::{
    AcquireRequest, InMemoryStorage, Pool, Proxy, ProxyManager, ProxyProtocol, Selector, Storage,
};

const SIZES: [usize; 3] = [10, 1_000, 100_000];

/// Polls a future that is ready at once (the in-memory storage never waits).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("in-memory storage does not wait"),
    }
}

fn proxy(i: usize) -> Proxy {
    pool_proxy("bench", "proxy", i)
}

/// Proxy `i` of `pool`, its id starting with `prefix` (ids are unique across pools).
fn pool_proxy(pool: &str, prefix: &str, i: usize) -> Proxy {
    let mut p = Proxy::new(
        format!("{prefix}-{i:06}"),
        pool,
        ProxyProtocol::Http,
        "10.0.0.1",
        8080,
    )
    .with_max_concurrency(Some(1));
    p.checked_at = SystemTime::UNIX_EPOCH + Duration::from_secs(i as u64 % 97);
    p.latency = Some(Duration::from_micros(1_000 + (i as u64 * 7919) % 5_000));
    p
}

fn manager(size: usize) -> ProxyManager {
    let m = ProxyManager::new(InMemoryStorage::new());
    add_pool(&m, "bench", "proxy", size);
    m
}

fn add_pool(m: &ProxyManager, pool: &str, prefix: &str, size: usize) {
    now(m.storage().upsert_pool(Pool::new(pool))).unwrap();
    for i in 0..size {
        now(m.storage().upsert_proxy(pool_proxy(pool, prefix, i))).unwrap();
    }
}

/// Two threads, `n` pairs in all: the second one on `(m2, req2)`. Returns the elapsed time
/// from the moment both are ready until both are done.
fn two_threads(
    (m, req): (&ProxyManager, &AcquireRequest),
    (m2, req2): (&ProxyManager, &AcquireRequest),
    n: u64,
) -> Duration {
    in_two_threads(n, |me, k| {
        if me == 0 {
            pairs(m, req, k)
        } else {
            pairs(m2, req2, k)
        }
    })
}

/// Runs `work(0, n - n / 2)` here and `work(1, n / 2)` on a second thread; returns the
/// elapsed time from the moment both are ready until both are done.
fn in_two_threads(n: u64, work: impl Fn(u64, u64) + Sync) -> Duration {
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let other = s.spawn(|| {
            barrier.wait();
            work(1, n / 2);
        });
        barrier.wait();
        let start = Instant::now();
        work(0, n - n / 2);
        other.join().unwrap();
        start.elapsed()
    })
}

/// Pairs per turn in `2t-turns`: about the pool lock's burst (1 024 critical sections).
const TURN: u64 = 512;

/// A turn counter on a line of its own, and which threads are done.
#[repr(align(128))]
struct Turns {
    turn: AtomicU64,
    done: AtomicU64,
}

/// Two threads on one pool, `n` pairs in all, taking turns of [`TURN`] pairs: a thread
/// waits for its turn spinning on the counter alone, so the pool's lock is never contended
/// and its state moves between the cores once per turn.
fn two_threads_in_turns(m: &ProxyManager, req: &AcquireRequest, n: u64) -> Duration {
    let turns = Turns {
        turn: AtomicU64::new(0),
        done: AtomicU64::new(0),
    };
    in_two_threads(n, |me, mut left| {
        while left > 0 {
            while turns.turn.load(Ordering::Acquire) % 2 != me
                && turns.done.load(Ordering::Acquire) & (1 << (1 - me)) == 0
            {
                std::hint::spin_loop();
            }
            let k = left.min(TURN);
            pairs(m, req, k);
            left -= k;
            turns.turn.fetch_add(1, Ordering::Release);
        }
        turns.done.fetch_or(1 << me, Ordering::Release);
    })
}

fn pairs(m: &ProxyManager, req: &AcquireRequest, n: u64) {
    for _ in 0..n {
        let lease = now(m.acquire_proxy(req)).unwrap().expect("a free proxy");
        now(m.release_proxy(black_box(&lease))).unwrap();
    }
}

/// The baseline: one lock, a linear scan per acquire.
struct Naive {
    state: Mutex<(Vec<(Proxy, u32)>, usize)>,
}

impl Naive {
    fn new(size: usize) -> Self {
        Self {
            state: Mutex::new(((0..size).map(|i| (proxy(i), 0)).collect(), 0)),
        }
    }

    fn acquire(&self, selector: Selector) -> Option<usize> {
        let mut guard = self.state.lock().unwrap();
        let (list, cursor) = &mut *guard;
        let free = |(p, n): &(Proxy, u32)| p.max_concurrency.is_none_or(|m| *n < m);
        let eligible: Vec<usize> = (0..list.len()).filter(|&i| free(&list[i])).collect();
        let pick = match selector {
            Selector::FirstAvailable => eligible.first().copied(),
            Selector::LeastUsed => eligible.iter().copied().min_by(|&a, &b| {
                let key = |i: usize| (list[i].1, list[i].0.checked_at, &list[i].0.id);
                key(a).cmp(&key(b))
            }),
            Selector::LowestLatency => eligible
                .iter()
                .copied()
                .min_by_key(|&i| (list[i].0.latency, list[i].1)),
            Selector::RoundRobin => {
                let c = *cursor % eligible.len().max(1);
                *cursor = c + 1;
                eligible.get(c).copied()
            }
            Selector::Random => {
                (!eligible.is_empty()).then(|| eligible[fastrand::usize(..eligible.len())])
            }
        }?;
        list[pick].1 += 1;
        Some(pick)
    }

    fn release(&self, i: usize) {
        self.state.lock().unwrap().0[i].1 -= 1;
    }
}

fn bench(c: &mut Criterion) {
    for size in SIZES {
        let naive = Naive::new(size);
        let mut group = c.benchmark_group(format!("acquire_release/{size}"));
        group.throughput(Throughput::Elements(1));
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(2));
        group.sample_size(20);
        for selector in Selector::ALL.iter().copied() {
            // A fresh pool per selector: a pool keeps an index for every selector it has
            // served, and real pools serve one.
            let m = manager(size);
            let req = AcquireRequest::new("bench")
                .selector(selector)
                .consumer("bench");
            group.bench_function(BenchmarkId::new("pharox-1t", selector), |b| {
                b.iter_custom(|n| {
                    let start = Instant::now();
                    pairs(&m, &req, n);
                    start.elapsed()
                })
            });
            group.bench_function(BenchmarkId::new("pharox-2t", selector), |b| {
                b.iter_custom(|n| two_threads((&m, &req), (&m, &req), n))
            });
            group.bench_function(BenchmarkId::new("pharox-2t-turns", selector), |b| {
                b.iter_custom(|n| two_threads_in_turns(&m, &req, n))
            });
            // Two pools of the same storage, one per thread: what does not scale here is
            // shared by the whole storage.
            let m2 = manager(size);
            add_pool(&m2, "bench-2", "other", size);
            let req2 = AcquireRequest::new("bench-2")
                .selector(selector)
                .consumer("bench");
            group.bench_function(BenchmarkId::new("pharox-2t-2pools", selector), |b| {
                b.iter_custom(|n| two_threads((&m2, &req), (&m2, &req2), n))
            });
            group.bench_function(BenchmarkId::new("naive-1t", selector), |b| {
                b.iter(|| {
                    let i = naive.acquire(selector).unwrap();
                    naive.release(black_box(i));
                })
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().without_plots();
    targets = bench
}
criterion_main!(benches);
