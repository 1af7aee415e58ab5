//! The retry schedule (through an injected sleeper), jitter bounds, policy validation, and
//! early wake-up when capacity is released.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{RecordingSleeper, leased, proxy};
use pharox::retry::{SleepFuture, TokioClock};
use pharox::{
    AcquireRequest, InMemoryStorage, LeaseError, Pool, ProxyManager, RetryPolicy, Sleeper, Storage,
};

fn secs(v: &[f64]) -> Vec<Duration> {
    v.iter().map(|s| Duration::from_secs_f64(*s)).collect()
}

/// A manager over a pool whose single exclusive proxy is already leased.
async fn exhausted(sleeper: RecordingSleeper) -> (ProxyManager, pharox::Lease) {
    let m = ProxyManager::with_time(
        InMemoryStorage::new(),
        Arc::new(TokioClock),
        Arc::new(sleeper),
    );
    m.storage().upsert_pool(Pool::new("p")).await.unwrap();
    m.storage()
        .upsert_proxy(proxy("p", "a").with_max_concurrency(Some(1)))
        .await
        .unwrap();
    let held = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap()
        .unwrap();
    (m, held)
}

async fn run_schedule(policy: RetryPolicy) -> (Vec<Duration>, usize) {
    let sleeper = RecordingSleeper::default();
    let (m, _held) = exhausted(sleeper.clone()).await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    m.on_acquire(move |_| {
        a.fetch_add(1, Ordering::SeqCst);
    });
    let got = m
        .acquire_proxy_with_retry(&AcquireRequest::new("p"), &policy)
        .await
        .unwrap();
    assert!(got.is_none());
    (sleeper.delays(), attempts.load(Ordering::SeqCst))
}

#[tokio::test]
async fn capped_schedule_matches_the_seed() {
    let policy = RetryPolicy {
        max_attempts: 5,
        backoff: Duration::from_millis(500),
        multiplier: 2.0,
        max_backoff: Some(Duration::from_millis(1500)),
        jitter: 0.0,
    };
    assert_eq!(policy.schedule(), secs(&[0.5, 1.0, 1.5, 1.5]));
    assert_eq!(run_schedule(policy).await, (secs(&[0.5, 1.0, 1.5, 1.5]), 5));
}

#[tokio::test]
async fn tripling_schedule_matches_the_seed() {
    let policy = RetryPolicy {
        max_attempts: 4,
        backoff: Duration::from_millis(100),
        multiplier: 3.0,
        max_backoff: None,
        jitter: 0.0,
    };
    assert_eq!(run_schedule(policy).await, (secs(&[0.1, 0.3, 0.9]), 4));
}

#[tokio::test]
async fn zero_backoff_never_sleeps() {
    let policy = RetryPolicy {
        max_attempts: 3,
        backoff: Duration::ZERO,
        ..RetryPolicy::default()
    };
    assert_eq!(run_schedule(policy).await, (vec![], 3));
}

#[tokio::test]
async fn jitter_only_shortens_sleeps() {
    let policy = RetryPolicy {
        max_attempts: 6,
        backoff: Duration::from_millis(100),
        multiplier: 2.0,
        max_backoff: None,
        jitter: 0.5,
    };
    let (delays, _) = run_schedule(policy.clone()).await;
    for (got, full) in delays.iter().zip(policy.schedule()) {
        assert!(
            *got <= full && *got >= full / 2,
            "{got:?} outside [{:?}, {full:?}]",
            full / 2
        );
    }
}

/// Records delays; its second sleep gives the held lease back first.
struct ReleasingSleeper {
    calls: Arc<std::sync::Mutex<Vec<Duration>>>,
    target: Arc<std::sync::OnceLock<(ProxyManager, pharox::Lease)>>,
}

impl Sleeper for ReleasingSleeper {
    fn sleep(&self, d: Duration) -> SleepFuture {
        let mut calls = self.calls.lock().unwrap();
        calls.push(d);
        let target = (calls.len() == 2)
            .then(|| self.target.get().cloned())
            .flatten();
        Box::pin(async move {
            if let Some((m, lease)) = target {
                assert!(m.release_proxy(&lease).await.unwrap());
            }
        })
    }
}

#[tokio::test]
async fn stops_at_the_first_hit() {
    let calls = Arc::default();
    let target = Arc::new(std::sync::OnceLock::new());
    let sleeper = ReleasingSleeper {
        calls: Arc::clone(&calls),
        target: target.clone(),
    };
    let m = ProxyManager::with_time(
        InMemoryStorage::new(),
        Arc::new(TokioClock),
        Arc::new(sleeper),
    );
    m.storage().upsert_pool(Pool::new("p")).await.unwrap();
    m.storage()
        .upsert_proxy(proxy("p", "a").with_max_concurrency(Some(1)))
        .await
        .unwrap();
    let held = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap()
        .unwrap();
    target.set((m.clone(), held)).unwrap();
    let policy = RetryPolicy {
        max_attempts: 10,
        backoff: Duration::from_millis(10),
        ..RetryPolicy::default()
    };
    let lease = m
        .acquire_proxy_with_retry(&AcquireRequest::new("p"), &policy)
        .await
        .unwrap();
    assert!(lease.is_some());
    assert_eq!(
        *calls.lock().unwrap(),
        [Duration::from_millis(10), Duration::from_millis(20)]
    );
}

#[tokio::test]
async fn invalid_policies_are_rejected() {
    let (m, _held) = exhausted(RecordingSleeper::default()).await;
    let bad = [
        RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        },
        RetryPolicy {
            multiplier: 0.5,
            ..RetryPolicy::default()
        },
        RetryPolicy {
            multiplier: f64::NAN,
            ..RetryPolicy::default()
        },
        RetryPolicy {
            max_backoff: Some(Duration::ZERO),
            ..RetryPolicy::default()
        },
        RetryPolicy {
            jitter: 1.5,
            ..RetryPolicy::default()
        },
    ];
    for p in bad {
        let err = m
            .acquire_proxy_with_retry(&AcquireRequest::new("p"), &p)
            .await
            .unwrap_err();
        assert!(matches!(err, LeaseError::InvalidRetry(_)), "{p:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_waiter_is_woken_early_by_a_release() {
    let m = ProxyManager::new(InMemoryStorage::new());
    m.storage().upsert_pool(Pool::new("p")).await.unwrap();
    m.storage()
        .upsert_proxy(proxy("p", "a").with_max_concurrency(Some(1)))
        .await
        .unwrap();
    let held = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap()
        .unwrap();

    let (missed_tx, missed_rx) = tokio::sync::oneshot::channel();
    let missed_tx = std::sync::Mutex::new(Some(missed_tx));
    m.on_acquire(move |e| {
        if e.lease.is_none()
            && let Some(tx) = missed_tx.lock().unwrap().take()
        {
            let _ = tx.send(());
        }
    });
    let policy = RetryPolicy {
        max_attempts: 2,
        backoff: Duration::from_secs(60),
        ..RetryPolicy::default()
    };
    let start = tokio::time::Instant::now();
    let waiter = tokio::spawn({
        let m = m.clone();
        async move {
            m.acquire_proxy_with_retry(&AcquireRequest::new("p"), &policy)
                .await
        }
    });
    missed_rx.await.unwrap();
    assert!(m.release_proxy(&held).await.unwrap());
    let lease = waiter
        .await
        .unwrap()
        .unwrap()
        .expect("woken by the release");
    assert_eq!(lease.proxy_id().as_str(), "a");
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "slept out the backoff: {:?}",
        start.elapsed()
    );
    assert_eq!(leased(&m, "p").await, 1);
}
