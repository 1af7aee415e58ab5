//! Sticky sessions: `-session-ID` (or `X-Pharox-Session`) binds (consumer, pool, ID) to one
//! lease, so every connection of the session goes through the same upstream.
//!
//! A session holds its lease between connections. Its idle TTL starts when its last
//! connection closes and slides with use; when it lapses with no connection open, the session
//! ends and its lease is released. While connections are open the lease is renewed like any
//! other. A session counts once against its upstream's `max_concurrency`, however many
//! connections it has. If the upstream fails or is banned, the session moves to another one.
//! Connections of one session open one at a time (their upstream handshakes are serialised so
//! that a new session never takes two leases); established tunnels run in parallel.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::LeaseHold;
use crate::model::ProxyId;

/// (consumer, pool, session id).
pub type SessionKey = (Arc<str>, Arc<str>, String);

/// A live sticky session.
pub struct Session {
    key: SessionKey,
    ttl: Duration,
    /// The session's lease (`None` before the first connection or after its upstream
    /// failed), and an upstream to avoid when taking the next one. Locked across a
    /// connection's upstream handshake.
    pub lease: tokio::sync::Mutex<SessionLease>,
    usage: Mutex<Usage>,
    wake: Notify,
    reaper: Mutex<Option<AbortHandle>>,
}

/// The lease side of a session.
#[derive(Default)]
pub struct SessionLease {
    /// The lease the session's connections use.
    pub current: Option<Arc<LeaseHold>>,
    /// An upstream the next lease should not be on (after an operator's rotation).
    pub avoid: Option<ProxyId>,
}

struct Usage {
    open: usize,
    last_used: Instant,
}

impl Session {
    /// The session id.
    pub fn id(&self) -> &str {
        &self.key.2
    }

    /// Consumer, pool and id.
    pub fn key(&self) -> &SessionKey {
        &self.key
    }

    /// The idle TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Open connections and time since the last one closed (zero while one is open).
    pub fn usage(&self) -> (usize, Duration) {
        let u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        let idle = if u.open > 0 {
            Duration::ZERO
        } else {
            u.last_used.elapsed()
        };
        (u.open, idle)
    }
}

/// A connection's membership of a session: counted as open until dropped.
pub struct SessionUse {
    session: Arc<Session>,
    /// The upstream the session left for this connection, if it just moved.
    pub moved_from: Option<ProxyId>,
}

impl SessionUse {
    /// Marks one more open connection.
    pub fn new(session: Arc<Session>, moved_from: Option<ProxyId>) -> Self {
        session.usage.lock().unwrap_or_else(|e| e.into_inner()).open += 1;
        session.wake.notify_one();
        Self {
            session,
            moved_from,
        }
    }

    /// The session id.
    pub fn id(&self) -> &str {
        self.session.id()
    }
}

impl Drop for SessionUse {
    fn drop(&mut self) {
        {
            let mut u = self.session.usage.lock().unwrap_or_else(|e| e.into_inner());
            u.open -= 1;
            u.last_used = Instant::now();
        }
        self.session.wake.notify_one();
    }
}

type Map = Arc<DashMap<SessionKey, Arc<Session>>>;

/// Every live session of a daemon.
#[derive(Default)]
pub struct Sessions {
    map: Map,
    /// Upstreams to avoid for keys whose session an operator rotated.
    avoid: DashMap<SessionKey, ProxyId>,
}

impl Sessions {
    /// The session for `key`, created (with its reaper) if needed. `on_end` runs once when
    /// the session ends (metrics).
    pub fn get_or_create(
        &self,
        key: SessionKey,
        ttl: Duration,
        stop: tokio_util::sync::CancellationToken,
        on_end: impl FnOnce(&Session) + Send + 'static,
        on_start: impl FnOnce(&Session),
    ) -> Arc<Session> {
        if let Some(s) = self.map.get(&key) {
            return s.clone();
        }
        let mut created = None;
        let session = self
            .map
            .entry(key.clone())
            .or_insert_with(|| {
                let lease = SessionLease {
                    current: None,
                    avoid: self.avoid.remove(&key).map(|(_, p)| p),
                };
                let s = Arc::new(Session {
                    key: key.clone(),
                    ttl,
                    lease: tokio::sync::Mutex::new(lease),
                    usage: Mutex::new(Usage {
                        open: 0,
                        last_used: Instant::now(),
                    }),
                    wake: Notify::new(),
                    reaper: Mutex::new(None),
                });
                created = Some(s.clone());
                s
            })
            .clone();
        if let Some(s) = created {
            on_start(&s);
            let task = tokio::spawn(reap(s.clone(), self.map.clone(), stop, on_end));
            *s.reaper.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
        }
        session
    }

    /// Every live session.
    pub fn list(&self) -> Vec<Arc<Session>> {
        self.map.iter().map(|e| e.value().clone()).collect()
    }

    /// Ends a session now: the next connection with its key gets a new lease, on another
    /// upstream if one is free. Open connections keep their lease until they close.
    pub fn rotate(&self, key: &SessionKey) -> Option<Arc<Session>> {
        let (_, session) = self.map.remove(key)?;
        if let Ok(lease) = session.lease.try_lock()
            && let Some(current) = &lease.current
        {
            self.avoid.insert(key.clone(), current.proxy().id.clone());
        }
        if let Some(task) = session
            .reaper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
        Some(session)
    }

    /// Ends every session (shutdown).
    pub fn clear(&self) {
        let keys: Vec<SessionKey> = self.map.iter().map(|e| e.key().clone()).collect();
        for key in keys {
            self.rotate(&key);
        }
        self.avoid.clear();
    }
}

/// Waits for the session to be idle for its TTL, then ends it.
async fn reap(
    session: Arc<Session>,
    map: Map,
    stop: tokio_util::sync::CancellationToken,
    on_end: impl FnOnce(&Session),
) {
    loop {
        let (open, last) = {
            let u = session.usage.lock().unwrap_or_else(|e| e.into_inner());
            (u.open, u.last_used)
        };
        let idle_deadline = async {
            if open == 0 {
                tokio::time::sleep_until(last + session.ttl).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = session.wake.notified() => continue,
            () = stop.cancelled() => break,
            () = idle_deadline => {
                let u = session.usage.lock().unwrap_or_else(|e| e.into_inner());
                if u.open == 0 && u.last_used == last {
                    break;
                }
            }
        }
    }
    map.remove_if(&session.key, |_, s| Arc::ptr_eq(s, &session));
    on_end(&session);
    // Drop the session's hold on its lease: with no connection open, that releases it.
    session.lease.lock().await.current = None;
}
