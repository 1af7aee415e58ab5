//! Acquire: one `acquire_<selector>` statement per attempt; after a miss, `acquire_probe`
//! tells whether it was contended (an eligible proxy was locked by someone else or filled
//! meanwhile), and a contended miss is retried at once, up to
//! [`ATTEMPTS`] attempts with pauses of 0.5·k ms, the lab's policy. `round_robin` is strict
//! (takes only the rotation's next proxy) on every attempt but the last, and creates the
//! pool's cursor row when it is missing (one extra, uncounted attempt).
//!
//! Every attempt has a fresh lease id. When an attempt fails without a definite answer (the
//! connection broke or the call timed out after the statement was sent) its id is queued
//! for a background release: the lease may exist, and releasing an unknown id is a no-op.
//! The same holds when the acquire's future is dropped (the daemon's client left while its
//! acquire was in flight): the statement still runs on the server, and nobody else knows
//! the lease it makes ([`Unclaimed`]).

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::filter::filter_sql;
use super::rows::LeaseRow;
use super::sql::{self, FILTER_TOKEN};
use super::{Core, Op, PgError};
use crate::model::{DEFAULT_CONSUMER_NAME, Lease, LeaseId, ProxyId, default_consumer};
use crate::selector::Selector;
use crate::storage::{AcquireRequest, Acquired, LeaseError, expiry};

/// Attempts per acquire while contended.
pub(crate) const ATTEMPTS: u32 = 4;

/// Prepared statements kept per connection before the cache is cleared.
const STATEMENT_CACHE_MAX: usize = 512;

/// Where `acquire_probe`'s filter parameters start.
const PROBE_FILTER_START: usize = 6;

/// Schemes this daemon can speak (Python rows may also say `socks4`: skipped).
const SCHEMES: &[&str] = &["http", "https", "socks5", "socks5h"];

/// One acquire's fixed parameters.
struct Ask<'a> {
    text: std::borrow::Cow<'static, str>,
    req: &'a AcquireRequest,
    pool: &'a str,
    consumer: Uuid,
    secs: f64,
    exclude: Vec<Uuid>,
    only: Option<Vec<Uuid>>,
    round_robin: bool,
    filter: Vec<super::filter::Param>,
}

/// What one attempt answered.
enum Answer {
    Hit(Row, LeaseId),
    Miss,
    NoCursor,
    NoPool,
}

/// What an acquire's attempts came to.
enum Outcome {
    Hit(Row, LeaseId),
    Miss,
    NoPool,
}

impl Core {
    /// [`Storage::acquire`](crate::storage::Storage::acquire) for this backend.
    pub(crate) async fn acquire(&self, req: &AcquireRequest) -> Result<Acquired, LeaseError> {
        expiry(SystemTime::now(), req.duration)?;
        if self.withdrawn_pools.contains(&*req.pool) {
            return Err(LeaseError::UnknownPool(req.pool.to_string()));
        }
        let filter = filter_sql(req.filter.as_deref(), sql::filter_start(req.selector))?;
        if !self.session_up.load(std::sync::atomic::Ordering::SeqCst) {
            // Refused, not sent: counted as a failed acquire, not timed.
            self.observe("acquire", None, false);
            return Err(PgError::NodeLockLost(self.node.to_string()).into());
        }
        let consumer = req.consumer.clone().unwrap_or_else(default_consumer);
        let exclude = self.excluded(&req.exclude);
        let ask = Ask {
            text: sql::acquire_text(
                req.selector,
                &filter.sql,
                !exclude.is_empty(),
                req.only.is_some(),
            ),
            req,
            pool: &req.pool,
            consumer: self.consumer_id(&consumer).await?,
            secs: req.duration.as_secs_f64(),
            exclude,
            only: req
                .only
                .as_ref()
                .map(|ids| ids.iter().map(ProxyId::uuid).collect()),
            round_robin: req.selector == Selector::RoundRobin,
            filter: filter.params,
        };
        let mut unclaimed = Unclaimed {
            core: self,
            duration: req.duration,
            in_flight: Mutex::new(None),
            made: None,
        };
        let result = self
            .run("acquire", self.attempts(&ask, &unclaimed.in_flight))
            .await;
        let lease = match result {
            Ok(Outcome::Hit(row, id)) => {
                // Released if the lease cannot be read, or this future is dropped before
                // the lease is handed over.
                unclaimed.made = Some(id);
                self.lease_of(&row, req, consumer)?
            }
            Ok(Outcome::Miss) => None,
            Ok(Outcome::NoPool) => return Err(LeaseError::UnknownPool(req.pool.to_string())),
            Err(e) => {
                // `unclaimed` releases the id of a statement sent but not answered.
                if is_fk_violation(&e) {
                    self.consumers.remove(&*consumer);
                }
                return Err(e.into());
            }
        };
        let stats = self.cached_stats(&req.pool).await;
        unclaimed.handed_over();
        Ok(Acquired {
            lease,
            stats,
            expired: Vec::new(),
        })
    }

    /// The attempts of one acquire. `in_flight` holds the lease id of a statement sent but
    /// not answered.
    async fn attempts(
        &self,
        ask: &Ask<'_>,
        in_flight: &Mutex<Option<LeaseId>>,
    ) -> Result<Outcome, PgError> {
        let mut cursor_made = false;
        let mut k = 1;
        loop {
            let strict = ask.round_robin && k < ATTEMPTS;
            match self.attempt(ask, strict, in_flight).await? {
                Answer::Hit(row, id) => return Ok(Outcome::Hit(row, id)),
                Answer::NoPool => return Ok(Outcome::NoPool),
                Answer::NoCursor if !cursor_made => {
                    cursor_made = true;
                    let rr = sql::stmt("rr_cursor_init");
                    self.query_now("acquire", rr, &[&ask.pool]).await?;
                    continue;
                }
                Answer::NoCursor if k < ATTEMPTS => pause(&mut k).await,
                Answer::Miss if k < ATTEMPTS && self.contended(ask).await? => pause(&mut k).await,
                _ => return Ok(Outcome::Miss),
            }
        }
    }

    /// After a miss: is some proxy of the pool eligible, locks aside (`acquire_probe`)?
    async fn contended(&self, ask: &Ask<'_>) -> Result<bool, PgError> {
        let filter = filter_sql(ask.req.filter.as_deref(), PROBE_FILTER_START).map_err(|e| {
            PgError::Statement {
                op: "acquire",
                reason: e.to_string(),
            }
        })?;
        let text = sql::stmt("acquire_probe").replace(FILTER_TOKEN, &filter.sql);
        let lease_slow: Option<bool> = None;
        let mut params: Vec<&(dyn ToSql + Sync)> =
            vec![&ask.pool, &lease_slow, &SCHEMES, &ask.exclude, &ask.only];
        params.extend(filter.params.iter().map(|p| p.as_sql()));
        let rows = self.query_now("acquire", &text, &params).await?;
        let contended = rows
            .first()
            .map(|row| row.try_get::<_, Option<bool>>("contended"))
            .transpose()
            .op(self, "acquire")?;
        Ok(contended.flatten().unwrap_or(false))
    }

    /// One statement.
    async fn attempt(
        &self,
        ask: &Ask<'_>,
        strict: bool,
        in_flight: &Mutex<Option<LeaseId>>,
    ) -> Result<Answer, PgError> {
        let client = self.client("acquire").await?;
        if client.statement_cache.size() > STATEMENT_CACHE_MAX {
            // Many filter shapes (library callers): start over rather than grow forever.
            client.statement_cache.clear();
        }
        let prepared = tokio::time::timeout(
            self.timeout,
            client.prepare_typed_cached(&ask.text, sql::ACQUIRE_TYPES),
        )
        .await;
        let st = match prepared {
            Ok(st) => st.op(self, "acquire")?,
            Err(_) => return Err(self.timed_out(client)),
        };
        let lease_id = LeaseId::new();
        let uuid = lease_id.as_uuid();
        let lease_slow: Option<bool> = None;
        let node: &str = &self.node;
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![
            &ask.pool,
            &uuid,
            &ask.consumer,
            &ask.secs,
            &node,
            &lease_slow,
            &SCHEMES,
            &ask.exclude,
            &ask.only,
        ];
        if ask.round_robin {
            params.push(&strict);
        }
        params.extend(ask.filter.iter().map(|p| p.as_sql()));
        *in_flight.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease_id);
        let rows = match tokio::time::timeout(self.timeout, client.query(&st, &params)).await {
            Ok(rows) => rows,
            Err(_) => {
                drop(params);
                return Err(self.timed_out(client));
            }
        };
        if rows.as_ref().is_ok() || rows.as_ref().is_err_and(|e| e.as_db_error().is_some()) {
            *in_flight.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        let row = rows
            .op(self, "acquire")?
            .into_iter()
            .next()
            .ok_or_else(|| PgError::Statement {
                op: "acquire",
                reason: "no result row".into(),
            })?;
        answer(row, lease_id, ask.round_robin)
    }

    /// A statement without an answer in time: its connection goes.
    fn timed_out(&self, client: deadpool_postgres::Object) -> PgError {
        self.discard(client);
        PgError::Timeout {
            op: "acquire",
            after: self.timeout,
        }
    }

    /// The lease of a hit row (and the pool's id, learnt).
    fn lease_of(
        &self,
        row: &Row,
        req: &AcquireRequest,
        consumer: std::sync::Arc<str>,
    ) -> Result<Option<Lease>, LeaseError> {
        let pool_id: Uuid = row.try_get("pool_id").op(self, "acquire")?;
        if !self.pool_ids.contains_key(&*req.pool) {
            self.learn_pool(&req.pool, pool_id);
        }
        let lease = LeaseRow {
            pool: req.pool.clone(),
            consumer,
            holder: Some(self.node.clone()),
            ids: &self.ids,
        }
        .lease(row)
        .op(self, "acquire")?;
        if lease.is_none() {
            // Cannot happen: the statement only picks schemes we speak.
            return Err(PgError::Statement {
                op: "acquire",
                reason: "leased a proxy of an unknown scheme".into(),
            }
            .into());
        }
        Ok(lease)
    }

    /// The proxies not to lease: the request's, plus those this node withdrew.
    fn excluded(&self, exclude: &[ProxyId]) -> Vec<Uuid> {
        let mut v: Vec<Uuid> = exclude.iter().map(ProxyId::uuid).collect();
        v.extend(self.withdrawn_proxies.iter().map(|id| *id));
        v
    }

    /// A consumer's id, resolved once per name (`consumer_upsert`).
    pub(crate) async fn consumer_id(&self, name: &str) -> Result<Uuid, PgError> {
        let name = if name.is_empty() {
            DEFAULT_CONSUMER_NAME
        } else {
            name
        };
        if let Some(id) = self.consumers.get(name) {
            return Ok(*id);
        }
        let new_id = crate::model::stable_id("consumer", name);
        for _ in 0..3 {
            let rows = self
                .query("consumer", sql::stmt("consumer_upsert"), &[&name, &new_id])
                .await?;
            if let Some(row) = rows.first() {
                let id: Uuid = row.try_get("id").op(self, "consumer")?;
                self.consumers.insert(name.into(), id);
                return Ok(id);
            }
        }
        Err(PgError::Statement {
            op: "consumer",
            reason: format!("consumer `{name}` could not be created (concurrent creation)"),
        })
    }
}

/// The lease an acquire may have made, until the acquire returns it: dropped earlier (the
/// acquire failed, or its future was dropped because the caller stopped waiting, e.g. a
/// client that left while its acquire statement was in flight), it queues the release of
/// that lease. Without it such a lease would hold its slot, held by nobody, until it expired.
struct Unclaimed<'a> {
    core: &'a Core,
    duration: Duration,
    /// The lease id of a statement sent but not answered: the lease may exist.
    in_flight: Mutex<Option<LeaseId>>,
    /// A lease made, not handed over yet.
    made: Option<LeaseId>,
}

impl Unclaimed<'_> {
    /// The acquire returns its lease (or its miss): nothing to release.
    fn handed_over(mut self) {
        self.made = None;
        *self.in_flight.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Drop for Unclaimed<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.made.take() {
            self.core.release_later(id);
        }
        if let Some(id) = self
            .in_flight
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            self.core.release_unknown_acquire(id, self.duration);
        }
    }
}

/// Reads an attempt's result row.
fn answer(row: Row, id: LeaseId, round_robin: bool) -> Result<Answer, PgError> {
    let get = |k: &str| -> Result<bool, PgError> {
        row.try_get::<_, Option<bool>>(k)
            .map(Option::unwrap_or_default)
            .map_err(|e| PgError::Statement {
                op: "acquire",
                reason: e.to_string(),
            })
    };
    if get("hit")? {
        return Ok(Answer::Hit(row, id));
    }
    if !get("pool_found")? {
        return Ok(Answer::NoPool);
    }
    if round_robin && !get("cursor_found")? {
        return Ok(Answer::NoCursor);
    }
    Ok(Answer::Miss)
}

/// The pause before attempt `k + 1` (0.5·k ms), counting it.
async fn pause(k: &mut u32) {
    tokio::time::sleep(Duration::from_micros(500 * u64::from(*k))).await;
    *k += 1;
}

/// A lease insert failed on its consumer's foreign key (the consumer row was deleted).
fn is_fk_violation(e: &PgError) -> bool {
    matches!(e, PgError::Statement { reason, .. }
        if reason.contains(SqlState::FOREIGN_KEY_VIOLATION.code()))
}
