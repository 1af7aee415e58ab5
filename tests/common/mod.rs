//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pharox::retry::SleepFuture;
use pharox::{InMemoryStorage, Pool, Proxy, ProxyManager, ProxyProtocol, Sleeper, Storage};

/// A proxy of `pool` with id `id`, port derived from the id's position.
pub fn proxy(pool: &str, id: &str) -> Proxy {
    Proxy::new(id, pool, ProxyProtocol::Http, "127.0.0.1", 8080)
}

/// A manager over a fresh in-memory storage holding one pool with `proxies`.
pub async fn manager_with(pool: &str, proxies: Vec<Proxy>) -> ProxyManager {
    let manager = ProxyManager::new(InMemoryStorage::new());
    manager
        .storage()
        .upsert_pool(Pool::new(pool))
        .await
        .unwrap();
    for p in proxies {
        manager.storage().upsert_proxy(p).await.unwrap();
    }
    manager
}

/// Live leases in a pool.
pub async fn leased(manager: &ProxyManager, pool: &str) -> u64 {
    manager
        .storage()
        .pool_stats(pool)
        .await
        .unwrap()
        .expect("pool exists")
        .total_leases
}

/// A sleeper that records each requested delay and returns at once.
#[derive(Default, Clone)]
pub struct RecordingSleeper(pub Arc<Mutex<Vec<Duration>>>);

impl RecordingSleeper {
    pub fn delays(&self) -> Vec<Duration> {
        self.0.lock().unwrap().clone()
    }
}

impl Sleeper for RecordingSleeper {
    fn sleep(&self, d: Duration) -> SleepFuture {
        self.0.lock().unwrap().push(d);
        Box::pin(async {})
    }
}
pub mod admin;
pub mod daemon;
pub mod hostile;
