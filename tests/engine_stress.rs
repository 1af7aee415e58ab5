//! Many tasks on a multi-thread runtime hammer one pool with acquire, release and renew.
//! Every acquire checks the cap of the proxy it got, a checker task scans the pool's live
//! counts while the load runs, and the pool ends with zero leases.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use common::proxy;
use pharox::{AcquireRequest, Filter, InMemoryStorage, Pool, ProxyManager, Selector, Storage};

const TASKS: usize = 8;
const OPS_PER_TASK: usize = 16_000;
const PROXIES: usize = 64;

fn cap_of(i: usize) -> Option<u32> {
    [None, Some(1), Some(2), Some(3), Some(5)][i % 5]
}

#[test]
fn concurrent_acquire_release_renew_never_exceeds_caps() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let m = ProxyManager::new(InMemoryStorage::new());
        m.storage().upsert_pool(Pool::new("p")).await.unwrap();
        let mut caps = HashMap::new();
        let mut held_count = HashMap::new();
        for i in 0..PROXIES {
            let id = format!("p{i:02}");
            // Unlimited proxies sit in their own country, so filtered requests can exhaust.
            let country = match (cap_of(i), i % 2) {
                (None, _) => "US",
                (_, 0) => "AR",
                _ => "BR",
            };
            m.storage()
                .upsert_proxy(
                    proxy("p", &id)
                        .with_max_concurrency(cap_of(i))
                        .with_country(country),
                )
                .await
                .unwrap();
            caps.insert(id.clone(), cap_of(i));
            held_count.insert(id, AtomicI64::new(0));
        }
        let caps = Arc::new(caps);
        let held_count = Arc::new(held_count);
        let done = Arc::new(AtomicBool::new(false));

        let checker = tokio::spawn({
            let (m, caps, done) = (m.clone(), caps.clone(), done.clone());
            async move {
                let mut scans = 0u64;
                while !done.load(Ordering::Relaxed) {
                    for info in m.storage().list_proxies("p").await.unwrap() {
                        let cap = caps[info.proxy.id.as_str()];
                        assert!(
                            cap.is_none_or(|c| info.current_leases <= c),
                            "over cap: {info:?}"
                        );
                    }
                    scans += 1;
                    tokio::task::yield_now().await;
                }
                scans
            }
        });

        let workers: Vec<_> = (0..TASKS)
            .map(|t| {
                let (m, caps, held_count) = (m.clone(), caps.clone(), held_count.clone());
                tokio::spawn(async move {
                    let mut rng = fastrand::Rng::with_seed(t as u64);
                    let mut mine = Vec::new();
                    let (mut hits, mut misses) = (0u64, 0u64);
                    for _ in 0..OPS_PER_TASK {
                        match rng.u8(..10) {
                            0..=4 => {
                                let selector = Selector::ALL[rng.usize(..Selector::ALL.len())];
                                let mut req = AcquireRequest::new("p")
                                    .selector(selector)
                                    .consumer(format!("w{t}"));
                                if rng.bool() {
                                    req = req.filter(Filter::new().country(if rng.bool() {
                                        "ar"
                                    } else {
                                        "br"
                                    }));
                                }
                                match m.acquire_proxy(&req).await.unwrap() {
                                    Some(lease) => {
                                        let id = lease.proxy_id().as_str();
                                        let now = held_count[id].fetch_add(1, Ordering::SeqCst) + 1;
                                        assert!(
                                            caps[id].is_none_or(|c| now <= c as i64),
                                            "{id} at {now}"
                                        );
                                        mine.push(lease);
                                        hits += 1;
                                    }
                                    None => misses += 1,
                                }
                            }
                            5..=8 if !mine.is_empty() => {
                                let lease = mine.swap_remove(rng.usize(..mine.len()));
                                held_count[lease.proxy_id().as_str()]
                                    .fetch_sub(1, Ordering::SeqCst);
                                assert!(m.release_proxy(&lease).await.unwrap());
                            }
                            _ if !mine.is_empty() => {
                                let lease = &mine[rng.usize(..mine.len())];
                                assert!(
                                    m.renew(lease, Duration::from_secs(60))
                                        .await
                                        .unwrap()
                                        .is_some()
                                );
                            }
                            _ => {}
                        }
                        if rng.u8(..64) == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                    for lease in mine {
                        held_count[lease.proxy_id().as_str()].fetch_sub(1, Ordering::SeqCst);
                        assert!(m.release_proxy(&lease).await.unwrap());
                    }
                    (hits, misses)
                })
            })
            .collect();

        let (mut hits, mut misses) = (0, 0);
        for w in workers {
            let (h, mi) = w.await.unwrap();
            hits += h;
            misses += mi;
        }
        done.store(true, Ordering::Relaxed);
        let scans = checker.await.unwrap();
        assert!(
            hits > 1000 && misses > 0,
            "load exercised both paths: {hits} hits, {misses} misses"
        );
        assert!(scans > 0);
        let stats = m.storage().pool_stats("p").await.unwrap().unwrap();
        assert_eq!((stats.total_leases, stats.leased), (0, 0));
        assert_eq!(stats.available as usize, PROXIES);
        assert!(
            m.storage()
                .list_proxies("p")
                .await
                .unwrap()
                .iter()
                .all(|i| i.current_leases == 0)
        );
    });
}
