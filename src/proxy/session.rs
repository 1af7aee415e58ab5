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
//!
//! A session exists for good only once its first lease succeeded: a session whose first
//! connection fails is forgotten at once (no entry, no task left behind). A consumer has at
//! most `limits.max_sessions_per_consumer` sessions, pending ones included; past that, new
//! session ids are refused with 429 `session_limit`. Each live session has one reaper task, on
//! the daemon's background tracker, that ends it at its TTL or at shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::held::HeldLease;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::model::ProxyId;

/// (consumer, pool, session id).
pub type SessionKey = (Arc<str>, Arc<str>, String);

/// A sticky session.
pub struct Session {
    key: SessionKey,
    ttl: Duration,
    /// The session's lease and the upstream to avoid next. Locked across a connection's
    /// upstream handshake.
    pub state: tokio::sync::Mutex<SessionState>,
    usage: Mutex<Usage>,
    wake: Notify,
    /// Cancelled when the session ends (TTL, rotation, shutdown).
    end: CancellationToken,
    /// The first lease succeeded: the session is live (counted, with a reaper).
    started: AtomicBool,
    /// Ended (forgotten by the map): a connection that finds it so starts over.
    ended: AtomicBool,
}

/// What a session's connections share.
#[derive(Default)]
pub struct SessionState {
    /// The lease the session's connections use (`None` before the first connection or after
    /// its upstream failed).
    pub current: Option<Arc<HeldLease>>,
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

    /// True once the session ended; a connection holding it must look it up again.
    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// True once its first lease succeeded.
    pub fn is_started(&self) -> bool {
        self.started.load(Ordering::Acquire)
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

type Map = DashMap<SessionKey, Arc<Session>>;

/// Every sticky session of a daemon.
#[derive(Default)]
pub struct Sessions {
    map: Map,
    /// Sessions per consumer, pending ones included.
    per_consumer: DashMap<Arc<str>, usize>,
    /// Upstreams to avoid for keys whose session an operator rotated.
    avoid: DashMap<SessionKey, ProxyId>,
}

impl Sessions {
    /// The session for `key`, created (pending: no lease, no task yet) if needed, unless
    /// the consumer already has `max` sessions.
    pub fn get_or_create(
        &self,
        key: SessionKey,
        ttl: Duration,
        max: usize,
    ) -> Result<Arc<Session>, ProxyError> {
        if let Some(s) = self.map.get(&key) {
            return Ok(s.clone());
        }
        let mut count = self.per_consumer.entry(key.0.clone()).or_insert(0);
        if *count >= max {
            return Err(ProxyError::SessionLimit(max));
        }
        let created = self.map.entry(key.clone()).or_insert_with(|| {
            *count += 1;
            Arc::new(Session {
                state: tokio::sync::Mutex::new(SessionState {
                    current: None,
                    avoid: self.avoid.remove(&key).map(|(_, p)| p),
                }),
                key,
                ttl,
                usage: Mutex::new(Usage {
                    open: 0,
                    last_used: Instant::now(),
                }),
                wake: Notify::new(),
                end: CancellationToken::new(),
                started: AtomicBool::new(false),
                ended: AtomicBool::new(false),
            })
        });
        Ok(created.clone())
    }

    /// Marks a session live after its first lease: counts it and starts its reaper on
    /// `tracker` (it ends at the TTL, at `stop`, or when the session is rotated).
    pub fn start(
        self: &Arc<Self>,
        session: &Arc<Session>,
        tracker: &TaskTracker,
        stop: CancellationToken,
        metrics: Arc<Metrics>,
    ) {
        if session.is_ended() || session.started.swap(true, Ordering::AcqRel) {
            return;
        }
        metrics.session(&session.key.1, 1.0);
        let (sessions, session) = (self.clone(), session.clone());
        tracker.spawn(async move {
            reap(&session, &stop).await;
            sessions.end(&session, Some(&metrics));
            // Drop the session's hold on its lease: with no connection open, that releases it.
            session.state.lock().await.current = None;
        });
    }

    /// Forgets a session whose first lease failed (it never started).
    pub fn abandon(&self, session: &Arc<Session>) {
        if !session.is_started() {
            self.end(session, None);
        }
    }

    /// Removes a session from the map and the counts, once.
    fn end(&self, session: &Arc<Session>, metrics: Option<&Metrics>) {
        if session.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        self.map
            .remove_if(&session.key, |_, s| Arc::ptr_eq(s, session));
        if let Some(mut n) = self.per_consumer.get_mut(&session.key.0) {
            *n = n.saturating_sub(1);
        }
        self.per_consumer.remove_if(&session.key.0, |_, n| *n == 0);
        if let (Some(m), true) = (metrics, session.is_started()) {
            m.session(&session.key.1, -1.0);
        }
        session.end.cancel();
    }

    /// Every session, live or pending.
    pub fn list(&self) -> Vec<Arc<Session>> {
        self.map.iter().map(|e| e.value().clone()).collect()
    }

    /// Ends a session now: the next connection with its key gets a new lease, on another
    /// upstream if one is free. Open connections keep their lease until they close. False
    /// if there is no such session.
    pub fn rotate(&self, key: &SessionKey, metrics: &Metrics) -> bool {
        let Some(session) = self.map.get(key).map(|e| e.value().clone()) else {
            return false;
        };
        if let Ok(state) = session.state.try_lock()
            && let Some(current) = &state.current
        {
            self.avoid.insert(key.clone(), current.proxy().id.clone());
        }
        self.end(&session, Some(metrics));
        true
    }

    /// Ends every session (shutdown); their reapers then release the leases.
    pub fn clear(&self, metrics: &Metrics) {
        for s in self.list() {
            self.end(&s, Some(metrics));
        }
        self.avoid.clear();
    }
}

/// Waits for the session to be idle for its TTL, or to be ended.
async fn reap(session: &Session, stop: &CancellationToken) {
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
            () = stop.cancelled() => return,
            () = session.end.cancelled() => return,
            () = idle_deadline => {
                let u = session.usage.lock().unwrap_or_else(|e| e.into_inner());
                if u.open == 0 && u.last_used == last {
                    return;
                }
            }
        }
    }
}
