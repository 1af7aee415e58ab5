-- statements.sql: every statement the Rust postgres backend prepares (fleet mode, SPEC §6).
--
-- pharox (Rust) copy: taken from the SQL lab (lab/pg/statements.sql) and adapted where the
-- Rust backend needs more; every adaptation is marked `RUST:` in the comment above it.
--
-- Format: each statement starts at a line `-- name: NAME` and ends with the first line that
-- ends in `;`. The comment block above the statement documents it. tests/ and bench/ load
-- the statements from this file by name (tools/pharox_sql.py), so what is tested here is
-- exactly this text. Rust: prepare each text as is (tokio-postgres prepare_typed /
-- prepare_cached); the trailing `;` is harmless in the extended protocol.
--
-- Schema: schema.sql (pharox 0.11) + migrate.sql (our additive columns/indexes).
-- Conventions:
--   * All times are the DATABASE clock: now() = start of the (single-statement) transaction.
--     Every statement returns now() AS db_now where the caller needs a clock; the daemon
--     turns a DB deadline into a local one as  t_sent + (expires_at - db_now) - margin.
--   * Every statement is one round trip in autocommit (no explicit BEGIN/COMMIT), except
--     the session-level ones marked "dedicated session".
--   * Parameter types are given explicitly with casts where PostgreSQL could not infer them,
--     so prepare() needs no type list. Rust types: uuid -> uuid::Uuid (with-uuid-1),
--     timestamptz -> SystemTime/chrono, json -> serde_json::Value (with-serde_json-1),
--     text[] -> Vec<&str>, uuid[] -> Vec<Uuid>, float8[] -> Vec<f64>.
--   * Lease statuses written: 'active' and 'released' only (pharox 0.11 parses LeaseStatus
--     and has no 'expired'); why a lease ended goes to lease.release_reason.
--   * Proxy statuses written: active | inactive | slow | banned only.
--
-- Eligibility (the same predicate in every acquire variant and in stats "available"):
--     p.pool_id = the pool
--     AND (p.status = 'active' OR (p.status = 'slow' AND lease_slow))
--     AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)   -- below cap
--     AND (p.rest_until IS NULL OR p.rest_until <= now())                      -- not resting
--     AND p.removed_at IS NULL                                                 -- not draining
--     AND coalesce(p.scheme, p.protocol) = ANY (protocols we speak)
--     AND p.id <> ALL (exclude)  AND (only IS NULL OR p.id = ANY (only))
--     AND <filter fragment>
--
-- ===========================================================================================
-- ACQUIRE — one statement per attempt: find + lock + bump current_leases + insert lease.
-- ===========================================================================================
-- Parameters (identical for all five selector variants):
--   $1  text      pool name
--   $2  uuid      lease id, made by the client (uuid v4). Never reuse an id for a second
--                 attempt: on an ambiguous failure (timeout, connection lost after send) call
--                 `release` with this id (idempotent) and use a fresh id for the next attempt.
--   $3  uuid      consumer id (from `consumer_upsert`, cached by name for the process life)
--   $4  float8    lease duration in seconds (> 0)
--   $5  text      holder = this daemon's node id (lease.holder)
--   $6  boolean   lease slow proxies too; NULL = use proxy_pool.lease_slow (NULL there = false)
--   $7  text[]    schemes this daemon can use, compared with coalesce(scheme, protocol),
--                 e.g. '{http,https,socks5,socks5h}' (Python rows may say socks4: skipped)
--   $8  uuid[]    exclude: proxies not to use (failover: those already tried). NULL or '{}'.
--   $9  uuid[]    only: restrict to these proxies; NULL = no restriction ('{}' = nothing).
--   $10.. filter parameters, see FILTERS below (round_robin: $10 is `strict`,
--                 random_sampled: $10 is the random start uuid; their filters start at $11).
--                 Every `TRUE /*FILTER*/` (in the pick CTEs) is replaced by the generated
--                 fragment; with no filter leave it as is.
-- Returns exactly ONE row:
--   hit:        hit = true; lease_id, acquired_at, expires_at, plus the proxy row AFTER the bump:
--               proxy_id, pool_id, host, port, protocol (as stored), scheme
--               (= coalesce(scheme, protocol): what the daemon speaks), credentials (json:
--               {"user": ..., "password": ...} or NULL), status, max_concurrency,
--               current_leases, source, country, city, isp, asn, latitude, longitude,
--               latency_us, checked_at; db_now. round_robin also returns cursor_found.
--   miss:       hit = false, lease_id IS NULL. pool_found = false: unknown pool. Otherwise
--               the caller runs `acquire_probe` (below) to tell a contended miss (a proxy
--               is eligible, but its row was locked by another transaction — SKIP LOCKED —
--               or filled up meanwhile: retry, up to 3 more attempts, pausing 0.5·k ms)
--               from a true miss (nothing eligible).
-- RUST: the probe was a scalar subquery of every acquire statement; it moved to a statement
-- of its own, run only after a miss. Planned on every execution (custom plans), it made a
-- quarter of each acquire's server CPU, for an answer only a miss needs (pgbench, one
-- session, acquire + release of first_available at 1 000 proxies: 870-980 pairs/s with it,
-- 1 090-1 380 without).
-- Why it cannot over-lease: the pick locks the proxy row (FOR UPDATE ... SKIP LOCKED) and
-- PostgreSQL re-evaluates the WHERE clause (cap included) on the newest row version before
-- returning a locked row (EvalPlanQual, READ COMMITTED); bump repeats the cap guard; Python's
-- create_lease takes the same row lock (blocking FOR UPDATE) and re-checks the counter.
-- So current_leases is only ever incremented by a holder of the row lock that saw it below
-- max_concurrency. The lease row and the bump commit together (one statement).
-- Locks taken, in this order: FOR KEY SHARE on the pool row (taken first, explicitly: the
-- lease insert's FK check needs it anyway, and Python's create_lease locks the pool row FOR
-- UPDATE — its `SELECT ... FROM proxy JOIN proxy_pool ... FOR UPDATE` has no OF — so we wait
-- for Python there, holding nothing, instead of waiting later while holding a proxy row that
-- Python's next create_lease may want: a convoy, and a deadlock cycle if Python's join ever
-- locked the pool row before the proxy row); round_robin: the cursor
-- row (blocking FOR UPDATE); the proxy row (FOR UPDATE, never waited for: SKIP LOCKED); FOR
-- KEY SHARE on the consumer row (FK check). Shared row locks create MultiXacts under
-- concurrency (see REPORT.md).
-- Selector orders (must match src/selector.rs / storage/index.rs):
--   first_available  p.created_at, p.id           (inventory order; index proxy_pool_created_idx)
--   least_used       p.current_leases, p.checked_at, p.id
--   round_robin      next p.id after the cursor, wrapping (index proxy_pool_id_idx)
--   lowest_latency   latency bucket NULLS LAST, p.current_leases, p.id
--                    bucket = floor(ln(max(latency_us,1)) / ln(1.25)) (selector.rs
--                    latency_bucket); NULL latency_us -> NULL bucket (sorted last). NB:
--                    greatest(NULL, 1) is 1 in PostgreSQL, hence the CASE.
--   random           random()
-- The pool id is a scalar subquery ((SELECT id FROM pool)) rather than a join, so the planner
-- can walk the (pool_id, ...) indexes in selector order and stop at the first unlocked row.
-- least_used in two steps, without indexing current_leases (an index on the counter makes
-- every acquire/release a non-HOT update: measured +40% CPU per pair for all selectors):
-- `idle` walks proxy_pool_checked_idx (pool_id, checked_at, id) for an unlocked eligible proxy
-- with current_leases = 0 — the minimum possible, so the first one is exactly the answer of
-- ORDER BY current_leases, checked_at, id; only when there is none (every eligible proxy
-- busy, or locked) does `busy` sort the pool. Cap-1 pools always take the fast path (an
-- eligible cap-1 proxy has 0 leases). A pool whose every proxy carries leases (unlimited
-- caps, more lessees than proxies) pays an O(pool) sort per acquire: fine for small pools;
-- for big saturated ones see REPORT.md (optional index).
-- The contention probe (`acquire_probe`) is written as an id-ordered LIMIT 1 (not EXISTS):
-- the generic plan of an EXISTS here was a Seq Scan of the whole proxy table (every pool),
-- measured.

-- name: acquire_first_available
WITH pool AS MATERIALIZED (
    SELECT id, name, coalesce($6::boolean, lease_slow, false) AS lease_slow
    FROM proxy_pool WHERE name = $1::text
    FOR KEY SHARE
),
pick AS MATERIALIZED (
    SELECT p.id FROM proxy p
    WHERE p.pool_id = (SELECT id FROM pool)
      AND (p.status = 'active' OR (p.status = 'slow' AND (SELECT lease_slow FROM pool)))
      AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
      AND (p.rest_until IS NULL OR p.rest_until <= now())
      AND p.removed_at IS NULL
      AND coalesce(p.scheme, p.protocol) = ANY ($7::text[])
      AND p.id <> ALL (coalesce($8::uuid[], '{}'))
      AND ($9::uuid[] IS NULL OR p.id = ANY ($9::uuid[]))
      AND TRUE /*FILTER*/
    ORDER BY p.created_at, p.id
    LIMIT 1
    FOR UPDATE OF p SKIP LOCKED
),
bump AS (
    UPDATE proxy p SET current_leases = p.current_leases + 1
    FROM pick
    WHERE p.id = pick.id
      AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
    RETURNING p.*
),
ins AS (
    INSERT INTO lease (id, proxy_id, pool_id, consumer_id, pool_name, status,
                       acquired_at, expires_at, holder)
    SELECT $2::uuid, b.id, b.pool_id, $3::uuid, pool.name, 'active',
           now(), now() + make_interval(secs => $4::float8), $5::text
    FROM bump b, pool
    RETURNING id, acquired_at, expires_at
)
SELECT ins.id IS NOT NULL AS hit, ins.id AS lease_id, ins.acquired_at, ins.expires_at, now() AS db_now,
       b.id AS proxy_id, b.pool_id, b.host, b.port, b.protocol,
       coalesce(b.scheme, b.protocol) AS scheme, b.credentials, b.status,
       b.max_concurrency, b.current_leases, b.source, b.country, b.city, b.isp, b.asn,
       b.latitude, b.longitude, b.latency_us, b.checked_at,
       EXISTS (SELECT 1 FROM pool) AS pool_found
FROM (SELECT 1) AS one
LEFT JOIN ins ON true
LEFT JOIN bump b ON true;

-- acquire_probe: after a miss of any acquire statement, is some proxy of the pool eligible
-- (the same predicate, without locks)? true = the miss was contended: retry.
-- $1 text pool name, $2 boolean lease_slow (as acquire's $6), $3 text[] schemes (as $7),
-- $4 uuid[] exclude (as $8), $5 uuid[] only (as $9); the filter fragment's parameters start
-- at $6. Returns one row: contended.
-- name: acquire_probe
WITH pool AS MATERIALIZED (
    SELECT id, coalesce($2::boolean, lease_slow, false) AS lease_slow
    FROM proxy_pool WHERE name = $1::text
)
SELECT (
    SELECT p.id FROM proxy p
    WHERE p.pool_id = (SELECT id FROM pool)
      AND (p.status = 'active' OR (p.status = 'slow' AND (SELECT lease_slow FROM pool)))
      AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
      AND (p.rest_until IS NULL OR p.rest_until <= now())
      AND p.removed_at IS NULL
      AND coalesce(p.scheme, p.protocol) = ANY ($3::text[])
      AND p.id <> ALL (coalesce($4::uuid[], '{}'))
      AND ($5::uuid[] IS NULL OR p.id = ANY ($5::uuid[]))
      AND TRUE /*FILTER*/
    ORDER BY p.id LIMIT 1
) IS NOT NULL AS contended;

-- name: acquire_least_used
WITH pool AS MATERIALIZED (
    SELECT id, name, coalesce($6::boolean, lease_slow, false) AS lease_slow
    FROM proxy_pool WHERE name = $1::text
    FOR KEY SHARE
),
idle AS MATERIALIZED (
    SELECT p.id FROM proxy p
    WHERE p.pool_id = (SELECT id FROM pool)
      AND p.current_leases = 0
      AND (p.status = 'active' OR (p.status = 'slow' AND (SELECT lease_slow FROM pool)))
      AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
      AND (p.rest_until IS NULL OR p.rest_until <= now())
      AND p.removed_at IS NULL
      AND coalesce(p.scheme, p.protocol) = ANY ($7::text[])
      AND p.id <> ALL (coalesce($8::uuid[], '{}'))
      AND ($9::uuid[] IS NULL OR p.id = ANY ($9::uuid[]))
      AND TRUE /*FILTER*/
    ORDER BY p.checked_at, p.id
    LIMIT 1
    FOR UPDATE OF p SKIP LOCKED
),
busy AS MATERIALIZED (
    SELECT p.id FROM proxy p
    WHERE NOT EXISTS (SELECT 1 FROM idle)
      AND p.pool_id = (SELECT id FROM pool)
      AND (p.status = 'active' OR (p.status = 'slow' AND (SELECT lease_slow FROM pool)))
      AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
      AND (p.rest_until IS NULL OR p.rest_until <= now())
      AND p.removed_at IS NULL
      AND coalesce(p.scheme, p.protocol) = ANY ($7::text[])
      AND p.id <> ALL (coalesce($8::uuid[], '{}'))
      AND ($9::uuid[] IS NULL OR p.id = ANY ($9::uuid[]))
      AND TRUE /*FILTER*/
    ORDER BY p.current_leases, p.checked_at, p.id
    LIMIT 1
    FOR UPDATE OF p SKIP LOCKED
),
pick AS (
    SELECT id FROM idle UNION ALL SELECT id FROM busy
),
bump AS (
    UPDATE proxy p SET current_leases = p.current_leases + 1
    FROM pick
    WHERE p.id = pick.id
      AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
    RETURNING p.*
),
ins AS (
    INSERT INTO lease (id, proxy_id, pool_id, consumer_id, pool_name, status,
                       acquired_at, expires_at, holder)
    SELECT $2::uuid, b.id, b.pool_id, $3::uuid, pool.name, 'active',
           now(), now() + make_interval(secs => $4::float8), $5::text
    FROM bump b, pool
    RETURNING id, acquired_at, expires_at
)
SELECT ins.id IS NOT NULL AS hit, ins.id AS lease_id, ins.acquired_at, ins.expires_at, now() AS db_now,
       b.id AS proxy_id, b.pool_id, b.host, b.port, b.protocol,
       coalesce(b.scheme, b.protocol) AS scheme, b.credentials, b.status,
       b.max_concurrency, b.current_leases, b.source, b.country, b.city, b.isp, b.asn,
       b.latitude, b.longitude, b.latency_us, b.checked_at,
       EXISTS (SELECT 1 FROM pool) AS pool_found
FROM (SELECT 1) AS one
LEFT JOIN ins ON true
LEFT JOIN bump b ON true;

-- round_robin: the cursor is pool_selector_state(pool_id, strategy='round_robin').
-- last_proxy_id, shared with Python pharox 0.11 (same row, same meaning: the proxy picked
-- last; the next pick is the smallest eligible id > last, wrapping to the smallest id).
-- `cur` locks the cursor row (blocking FOR UPDATE): round-robin acquirers of one pool take
-- turns (~0.1-0.3 ms each, measured), which is what makes the rotation exact across the fleet.
-- Because FOR UPDATE in READ COMMITTED returns the NEWEST version of the row after waiting,
-- `cur` sees the cursor as advanced by whoever held it before us. The cursor advances only on
-- a hit (Python advances on find, even when its create_lease then fails).
-- `after` walks the (pool_id, id) index from the cursor; `wrap` (only evaluated when `after`
-- found nothing) starts again from the smallest id. Both skip locked rows. The cursor row is
-- created by the first hit (INSERT ... ON CONFLICT DO UPDATE).
-- Strictness ($10 boolean, round_robin only; its filter parameters start at $11): SKIP LOCKED
-- would silently pass over the next proxy while its row is locked for a moment by someone
-- else (a release, another selector's acquire, Python) — a rotation break, measured at ~1% of
-- picks with 16 sessions. `ideal` is the next proxy in the statement snapshot without locks;
-- with $10 = true the statement takes only that proxy, and when it was locked (or just
-- filled) it returns a miss with contended = true, so the caller retries. Policy (measured in
-- tests/test_round_robin.py): up to 4 attempts with $10 = true, pausing 0.5, 1, 1.5 ms
-- between them, then one with $10 = false (take the next unlocked one), so a row locked for
-- long (a stuck transaction) cannot stall the pool's rotation. With 16 sessions on 2 cores:
-- 2400 picks, a few fallbacks, every rotation break at a fallback (without strictness: 21
-- breaks in 2400 picks).
-- A strict attempt also requires the cursor row to exist: when several sessions start a
-- pool's rotation at once, none of them can lock a row that is not there yet, and two could
-- pick the same first proxy. Such an attempt returns cursor_found = false (a miss with
-- contended = true): run `rr_cursor_init` and retry (not counted as an attempt). Rust can
-- also run rr_cursor_init for every pool at inventory load.
-- Python interplay: Python reads this row FOR UPDATE SKIP LOCKED and holds it across several
-- round trips; while we hold it, Python sees "no state" and picks from the smallest id (its
-- bug); while Python holds it, we wait (bounded by lock_timeout/statement_timeout).

-- name: acquire_round_robin
WITH pool AS MATERIALIZED (
    SELECT id, name, coalesce($6::boolean, lease_slow, false) AS lease_slow
    FROM proxy_pool WHERE name = $1::text
    FOR KEY SHARE
),
cur AS MATERIALIZED (
    SELECT s.last_proxy_id FROM pool_selector_state s
    WHERE s.pool_id = (SELECT id FROM pool) AND s.strategy = 'round_robin'
    FOR UPDATE OF s
),
after AS MATERIALIZED (
    SELECT p.id FROM proxy p
    WHERE p.pool_id = (SELECT id FROM pool)
      AND p.id > (SELECT last_proxy_id FROM cur)
      AND (p.status = 'active' OR (p.status = 'slow' AND (SELECT lease_slow FROM pool)))
      AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
      AND (p.rest_until IS NULL OR p.rest_until <= now())
      AND p.removed_at IS NULL
      AND coalesce(p.scheme, p.protocol) = ANY ($7::text[])
      AND p.id <> ALL (coalesce($8::uuid[], '{}'))
      AND ($9::uuid[] IS NULL OR p.id = ANY ($9::uuid[]))
      AND TRUE /*FILTER*/
    ORDER BY p.id
    LIMIT 1
    FOR UPDATE OF p SKIP LOCKED
),
wrap AS MATERIALIZED (
    SELECT p.id FROM proxy p
    WHERE NOT EXISTS (SELECT 1 FROM after)
      AND p.pool_id = (SELECT id FROM pool)
      AND (p.status = 'active' OR (p.status = 'slow' AND (SELECT lease_slow FROM pool)))
      AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
      AND (p.rest_until IS NULL OR p.rest_until <= now())
      AND p.removed_at IS NULL
      AND coalesce(p.scheme, p.protocol) = ANY ($7::text[])
      AND p.id <> ALL (coalesce($8::uuid[], '{}'))
      AND ($9::uuid[] IS NULL OR p.id = ANY ($9::uuid[]))
      AND TRUE /*FILTER*/
    ORDER BY p.id
    LIMIT 1
    FOR UPDATE OF p SKIP LOCKED
),
ideal AS MATERIALIZED (
    SELECT coalesce(
        (SELECT p.id FROM proxy p
         WHERE p.pool_id = (SELECT id FROM pool)
           AND p.id > (SELECT last_proxy_id FROM cur)
           AND (p.status = 'active' OR (p.status = 'slow' AND (SELECT lease_slow FROM pool)))
           AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
           AND (p.rest_until IS NULL OR p.rest_until <= now())
           AND p.removed_at IS NULL
           AND coalesce(p.scheme, p.protocol) = ANY ($7::text[])
           AND p.id <> ALL (coalesce($8::uuid[], '{}'))
           AND ($9::uuid[] IS NULL OR p.id = ANY ($9::uuid[]))
           AND TRUE /*FILTER*/
         ORDER BY p.id LIMIT 1),
        (SELECT p.id FROM proxy p
         WHERE p.pool_id = (SELECT id FROM pool)
           AND (p.status = 'active' OR (p.status = 'slow' AND (SELECT lease_slow FROM pool)))
           AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
           AND (p.rest_until IS NULL OR p.rest_until <= now())
           AND p.removed_at IS NULL
           AND coalesce(p.scheme, p.protocol) = ANY ($7::text[])
           AND p.id <> ALL (coalesce($8::uuid[], '{}'))
           AND ($9::uuid[] IS NULL OR p.id = ANY ($9::uuid[]))
           AND TRUE /*FILTER*/
         ORDER BY p.id LIMIT 1)) AS id
),
pick AS (
    SELECT x.id FROM (SELECT id FROM after UNION ALL SELECT id FROM wrap) x
    WHERE NOT $10::boolean OR (x.id = (SELECT id FROM ideal) AND EXISTS (SELECT 1 FROM cur))
),
bump AS (
    UPDATE proxy p SET current_leases = p.current_leases + 1
    FROM pick
    WHERE p.id = pick.id
      AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
    RETURNING p.*
),
ins AS (
    INSERT INTO lease (id, proxy_id, pool_id, consumer_id, pool_name, status,
                       acquired_at, expires_at, holder)
    SELECT $2::uuid, b.id, b.pool_id, $3::uuid, pool.name, 'active',
           now(), now() + make_interval(secs => $4::float8), $5::text
    FROM bump b, pool
    RETURNING id, acquired_at, expires_at
),
adv AS (
    INSERT INTO pool_selector_state (pool_id, strategy, last_proxy_id)
    SELECT b.pool_id, 'round_robin', b.id FROM bump b
    ON CONFLICT (pool_id, strategy)
    DO UPDATE SET last_proxy_id = EXCLUDED.last_proxy_id, updated_at = now()
)
SELECT ins.id IS NOT NULL AS hit, ins.id AS lease_id, ins.acquired_at, ins.expires_at, now() AS db_now,
       b.id AS proxy_id, b.pool_id, b.host, b.port, b.protocol,
       coalesce(b.scheme, b.protocol) AS scheme, b.credentials, b.status,
       b.max_concurrency, b.current_leases, b.source, b.country, b.city, b.isp, b.asn,
       b.latitude, b.longitude, b.latency_us, b.checked_at,
       EXISTS (SELECT 1 FROM pool) AS pool_found,
       EXISTS (SELECT 1 FROM cur) AS cursor_found
FROM (SELECT 1) AS one
LEFT JOIN ins ON true
LEFT JOIN bump b ON true;

-- rr_cursor_init: create a pool's round-robin cursor row if it is missing (idempotent; Python
-- creates the same row the same way). $1 text pool name. Returns nothing.
-- name: rr_cursor_init
INSERT INTO pool_selector_state (pool_id, strategy, last_proxy_id)
SELECT id, 'round_robin', NULL FROM proxy_pool WHERE name = $1::text
ON CONFLICT (pool_id, strategy) DO NOTHING;

-- name: acquire_lowest_latency
WITH pool AS MATERIALIZED (
    SELECT id, name, coalesce($6::boolean, lease_slow, false) AS lease_slow
    FROM proxy_pool WHERE name = $1::text
    FOR KEY SHARE
),
pick AS MATERIALIZED (
    SELECT p.id FROM proxy p
    WHERE p.pool_id = (SELECT id FROM pool)
      AND (p.status = 'active' OR (p.status = 'slow' AND (SELECT lease_slow FROM pool)))
      AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
      AND (p.rest_until IS NULL OR p.rest_until <= now())
      AND p.removed_at IS NULL
      AND coalesce(p.scheme, p.protocol) = ANY ($7::text[])
      AND p.id <> ALL (coalesce($8::uuid[], '{}'))
      AND ($9::uuid[] IS NULL OR p.id = ANY ($9::uuid[]))
      AND TRUE /*FILTER*/
    ORDER BY CASE WHEN p.latency_us IS NOT NULL
                  THEN floor(ln(greatest(p.latency_us, 1)::float8) / ln(1.25::float8)) END
             NULLS LAST,
             p.current_leases, p.id
    LIMIT 1
    FOR UPDATE OF p SKIP LOCKED
),
bump AS (
    UPDATE proxy p SET current_leases = p.current_leases + 1
    FROM pick
    WHERE p.id = pick.id
      AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
    RETURNING p.*
),
ins AS (
    INSERT INTO lease (id, proxy_id, pool_id, consumer_id, pool_name, status,
                       acquired_at, expires_at, holder)
    SELECT $2::uuid, b.id, b.pool_id, $3::uuid, pool.name, 'active',
           now(), now() + make_interval(secs => $4::float8), $5::text
    FROM bump b, pool
    RETURNING id, acquired_at, expires_at
)
SELECT ins.id IS NOT NULL AS hit, ins.id AS lease_id, ins.acquired_at, ins.expires_at, now() AS db_now,
       b.id AS proxy_id, b.pool_id, b.host, b.port, b.protocol,
       coalesce(b.scheme, b.protocol) AS scheme, b.credentials, b.status,
       b.max_concurrency, b.current_leases, b.source, b.country, b.city, b.isp, b.asn,
       b.latitude, b.longitude, b.latency_us, b.checked_at,
       EXISTS (SELECT 1 FROM pool) AS pool_found
FROM (SELECT 1) AS one
LEFT JOIN ins ON true
LEFT JOIN bump b ON true;

-- name: acquire_random
WITH pool AS MATERIALIZED (
    SELECT id, name, coalesce($6::boolean, lease_slow, false) AS lease_slow
    FROM proxy_pool WHERE name = $1::text
    FOR KEY SHARE
),
pick AS MATERIALIZED (
    SELECT p.id FROM proxy p
    WHERE p.pool_id = (SELECT id FROM pool)
      AND (p.status = 'active' OR (p.status = 'slow' AND (SELECT lease_slow FROM pool)))
      AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
      AND (p.rest_until IS NULL OR p.rest_until <= now())
      AND p.removed_at IS NULL
      AND coalesce(p.scheme, p.protocol) = ANY ($7::text[])
      AND p.id <> ALL (coalesce($8::uuid[], '{}'))
      AND ($9::uuid[] IS NULL OR p.id = ANY ($9::uuid[]))
      AND TRUE /*FILTER*/
    ORDER BY random()
    LIMIT 1
    FOR UPDATE OF p SKIP LOCKED
),
bump AS (
    UPDATE proxy p SET current_leases = p.current_leases + 1
    FROM pick
    WHERE p.id = pick.id
      AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
    RETURNING p.*
),
ins AS (
    INSERT INTO lease (id, proxy_id, pool_id, consumer_id, pool_name, status,
                       acquired_at, expires_at, holder)
    SELECT $2::uuid, b.id, b.pool_id, $3::uuid, pool.name, 'active',
           now(), now() + make_interval(secs => $4::float8), $5::text
    FROM bump b, pool
    RETURNING id, acquired_at, expires_at
)
SELECT ins.id IS NOT NULL AS hit, ins.id AS lease_id, ins.acquired_at, ins.expires_at, now() AS db_now,
       b.id AS proxy_id, b.pool_id, b.host, b.port, b.protocol,
       coalesce(b.scheme, b.protocol) AS scheme, b.credentials, b.status,
       b.max_concurrency, b.current_leases, b.source, b.country, b.city, b.isp, b.asn,
       b.latitude, b.longitude, b.latency_us, b.checked_at,
       EXISTS (SELECT 1 FROM pool) AS pool_found
FROM (SELECT 1) AS one
LEFT JOIN ins ON true
LEFT JOIN bump b ON true;

-- acquire_random_sampled: O(log n) alternative to acquire_random for big pools ($10 uuid: a
-- fresh random uuid v4 per attempt; filters from $11). Takes the first eligible proxy at or
-- after a random point of the id space, wrapping. NOT exactly uniform: a proxy's chance is
-- proportional to the id gap before it (ids are v4/v5 UUIDs, so gaps are random, and a proxy
-- after a run of ineligible ones is favoured) — measured max/min pick ratio in
-- tests/test_selectors.py. Use when pools are large (acquire_random measured ~200 pairs/s at
-- 10 000 proxies: ORDER BY random() reads and sorts the whole pool).
-- name: acquire_random_sampled
WITH pool AS MATERIALIZED (
    SELECT id, name, coalesce($6::boolean, lease_slow, false) AS lease_slow
    FROM proxy_pool WHERE name = $1::text
    FOR KEY SHARE
),
after AS MATERIALIZED (
    SELECT p.id FROM proxy p
    WHERE p.pool_id = (SELECT id FROM pool)
      AND p.id >= $10::uuid
      AND (p.status = 'active' OR (p.status = 'slow' AND (SELECT lease_slow FROM pool)))
      AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
      AND (p.rest_until IS NULL OR p.rest_until <= now())
      AND p.removed_at IS NULL
      AND coalesce(p.scheme, p.protocol) = ANY ($7::text[])
      AND p.id <> ALL (coalesce($8::uuid[], '{}'))
      AND ($9::uuid[] IS NULL OR p.id = ANY ($9::uuid[]))
      AND TRUE /*FILTER*/
    ORDER BY p.id
    LIMIT 1
    FOR UPDATE OF p SKIP LOCKED
),
wrap AS MATERIALIZED (
    SELECT p.id FROM proxy p
    WHERE NOT EXISTS (SELECT 1 FROM after)
      AND p.pool_id = (SELECT id FROM pool)
      AND (p.status = 'active' OR (p.status = 'slow' AND (SELECT lease_slow FROM pool)))
      AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
      AND (p.rest_until IS NULL OR p.rest_until <= now())
      AND p.removed_at IS NULL
      AND coalesce(p.scheme, p.protocol) = ANY ($7::text[])
      AND p.id <> ALL (coalesce($8::uuid[], '{}'))
      AND ($9::uuid[] IS NULL OR p.id = ANY ($9::uuid[]))
      AND TRUE /*FILTER*/
    ORDER BY p.id
    LIMIT 1
    FOR UPDATE OF p SKIP LOCKED
),
pick AS (
    SELECT id FROM after UNION ALL SELECT id FROM wrap
),
bump AS (
    UPDATE proxy p SET current_leases = p.current_leases + 1
    FROM pick
    WHERE p.id = pick.id
      AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
    RETURNING p.*
),
ins AS (
    INSERT INTO lease (id, proxy_id, pool_id, consumer_id, pool_name, status,
                       acquired_at, expires_at, holder)
    SELECT $2::uuid, b.id, b.pool_id, $3::uuid, pool.name, 'active',
           now(), now() + make_interval(secs => $4::float8), $5::text
    FROM bump b, pool
    RETURNING id, acquired_at, expires_at
)
SELECT ins.id IS NOT NULL AS hit, ins.id AS lease_id, ins.acquired_at, ins.expires_at, now() AS db_now,
       b.id AS proxy_id, b.pool_id, b.host, b.port, b.protocol,
       coalesce(b.scheme, b.protocol) AS scheme, b.credentials, b.status,
       b.max_concurrency, b.current_leases, b.source, b.country, b.city, b.isp, b.asn,
       b.latitude, b.longitude, b.latency_us, b.checked_at,
       EXISTS (SELECT 1 FROM pool) AS pool_found
FROM (SELECT 1) AS one
LEFT JOIN ins ON true
LEFT JOIN bump b ON true;

-- ===========================================================================================
-- FILTERS — generated WHERE fragment (replaces `TRUE /*FILTER*/`), all values bound.
-- ===========================================================================================
-- Generator (reference implementation: tools/pharox_sql.py filter_sql; port it to Rust):
--   frag(f) = AND of, in this order, only for the fields that are set:
--     country   upper(p.country) = $k::text        ($k bound to the upper-cased value; Python
--                                                  rows may hold lower case)
--     city      p.city = $k::text                  (exact)
--     source    p.source = $k::text
--     isp       p.isp = $k::text
--     asn       p.asn = $k::int8                   (int8: a u32 > 2^31-1 simply matches
--                                                  nothing instead of failing the int4 cast)
--     geo with radius ($a lat, $b lon, $r km):
--               (p.latitude IS NOT NULL AND p.longitude IS NOT NULL AND
--                12742.0::float8 * atan2(sqrt(H), sqrt(1 - H)) <= $r::float8)
--               where H = power(sin(radians(p.latitude - $a::float8) / 2), 2)
--                       + cos(radians($a::float8)) * cos(radians(p.latitude))
--                         * power(sin(radians(p.longitude - $b::float8) / 2), 2)
--               (filter.rs haversine_km, R = 6371 km, inclusive `<=`)
--     geo without radius:
--               (abs(p.latitude - $a::float8) <= 1e-6 AND abs(p.longitude - $b::float8) <= 1e-6)
--               (NULL coordinates give NULL = not matched, as in Rust)
--     all_of    frag(c1) AND frag(c2) ...
--     any_of    (frag(c1) OR frag(c2) ...)          omitted when the list is empty (= TRUE);
--                                                  an empty child filter is TRUE
--     none_of   NOT coalesce(frag(c1) OR frag(c2) ..., false)
--                                                  NULL-safe: a proxy whose field is NULL
--                                                  does not match the child, so it passes;
--                                                  an empty child matches everything, so
--                                                  none_of with an empty child is FALSE
--   A child dropped this way (any_of/none_of with an empty child) binds no parameter: the
--   generator rolls back the numbers its siblings took (an unreferenced $n has no type and
--   fails prepare with "could not determine data type of parameter").
--   An empty filter is TRUE. Every positive comparison with a NULL column yields NULL, which
--   WHERE treats as false, exactly like Rust's is_some_and; negation goes only through
--   coalesce(..., false), so SQL three-valued logic never flips a result (Python 0.11's
--   `NOT (OR ...)` excludes NULL fields: a bug we do not copy). Predicates are refused before
--   SQL generation (FleetError::PredicateUnsupported).
--   Parameters are numbered from $10 in tree order (depth first: scalars, geo, all_of, any_of,
--   none_of) — the same numbering for both occurrences of the fragment.
-- Examples (exactly as generated by tools/pharox_sql.py filter_sql; tests/test_filters.py
-- checks the strings and runs them):
--   Filter::new().country("ar").city("Cordoba")                        params: 'AR', 'Cordoba'
--     upper(p.country) = $10::text AND p.city = $11::text
--   Filter::new().near(-31.4, -64.18, 50.0)                            params: -31.4, -64.18, 50.0
--     (p.latitude IS NOT NULL AND p.longitude IS NOT NULL AND 12742.0::float8 * atan2(sqrt((power(
--      sin(radians(p.latitude - $10::float8) / 2), 2) + cos(radians($10::float8)) *
--      cos(radians(p.latitude)) * power(sin(radians(p.longitude - $11::float8) / 2), 2))), sqrt(1 - (
--      power(sin(radians(p.latitude - $10::float8) / 2), 2) + cos(radians($10::float8)) *
--      cos(radians(p.latitude)) * power(sin(radians(p.longitude - $11::float8) / 2), 2)))) <= $12::float8)
--   Filter { latitude: -23.55, longitude: -46.63, radius_km: None }     params: -23.55, -46.63
--     (abs(p.latitude - $10::float8) <= 1e-6 AND abs(p.longitude - $11::float8) <= 1e-6)
--   Filter::new().source("prov-a").any_of([country("BR"), asn(7303)])  params: 'prov-a', 'BR', 7303
--     p.source = $10::text AND ((upper(p.country) = $11::text) OR (p.asn = $12::int8))
--   Filter::new().none_of([city("Rosario"), isp("bad-isp")]).any_of([]) params: 'Rosario', 'bad-isp'
--     NOT coalesce((p.city = $10::text) OR (p.isp = $11::text), false)
-- The haversine fragment is bit-identical to filter.rs haversine_km on the tested pairs
-- (PostgreSQL's radians() and Rust's to_radians() multiply by the same double; sin/cos/atan2
-- come from the same libm): the inclusive boundary radius = exact distance matches.
--
-- ===========================================================================================
-- RELEASE, RENEW, SWEEP
-- ===========================================================================================

-- release: give a lease back by id. Idempotent: only an 'active' row changes; a second
-- release, or one of an expired-and-swept / unknown lease, returns 0 rows and changes nothing.
--   $1 uuid  lease id
--   $2 text  release_reason: 'released' (normal), 'admin' (DELETE /api/v1/leases), 'lost', ...
-- Returns 0 rows (was not live) or 1 row: lease_id, proxy_id, pool_id, pool_name,
--   acquired_at, released_at (= db now), current_leases (after), was_full (the proxy was at
--   its cap before this release: send NOTIFY pharox_capacity for pool_id, outside this
--   statement).
-- Locks: the lease row, then the proxy row (both blocking, in this order; Python's
-- release_lease and cleanup lock in the same order, so no cycle with them).
-- RUST: `status || '' = 'active'` is the lab's `status = 'active'` written so that it does not
-- imply the partial indexes' predicate: a plan made while few leases were live (an almost
-- empty `lease_active_expires_idx`, two pages) reads that whole index for the id, and a
-- connection keeps its generic plan while the live leases grow into thousands — O(live
-- leases) per release until the next ANALYZE. The primary key is the only index left to it.
-- name: release
WITH rel AS (
    UPDATE lease
    SET status = 'released', released_at = now(), release_reason = coalesce($2::text, 'released')
    WHERE id = $1::uuid AND status || '' = 'active'
    RETURNING id, proxy_id, pool_id, pool_name, acquired_at, released_at
),
dec AS (
    UPDATE proxy p SET current_leases = greatest(p.current_leases - 1, 0)
    FROM rel
    WHERE p.id = rel.proxy_id
    RETURNING p.id, p.current_leases,
              (p.max_concurrency IS NOT NULL AND p.current_leases = p.max_concurrency - 1) AS was_full
)
SELECT rel.id AS lease_id, rel.proxy_id, rel.pool_id, rel.pool_name, rel.acquired_at,
       rel.released_at, dec.current_leases, dec.was_full
FROM rel JOIN dec ON dec.id = rel.proxy_id;

-- renew_batch: extend the live leases of this node, once per tick.
--   $1 uuid[]   lease ids
--   $2 float8[] new duration from now, seconds, per id (same length as $1)
--   $3 text     holder (node id): a node only renews its own leases
-- Returns one row per renewed lease: lease_id, expires_at, db_now. An id NOT returned is
-- LOST (released by someone — our sweeper, Python's cleanup, an admin — or already past its
-- expires_at on the DB clock): close its connection now, and release it (idempotent) in case
-- it is merely expired-not-swept. Renewing a lease whose expires_at has passed is refused on
-- purpose: the sweeper may be handing that slot out right now.
-- Locks each lease row (blocking; ids sorted ascending by the caller keeps two of our own
-- statements from ever locking in opposite orders).
-- name: renew_batch
UPDATE lease l
SET expires_at = now() + make_interval(secs => u.secs)
FROM unnest($1::uuid[], $2::float8[]) AS u(id, secs)
WHERE l.id = u.id
  AND l.status = 'active'
  AND l.holder = $3::text
  AND l.expires_at > now()
RETURNING l.id AS lease_id, l.expires_at, now() AS db_now;

-- sweep: release up to $1 expired leases (expires_at <= now() on the DB clock), decrementing
-- each proxy's counter once per lease, grouped. Run every second by the sweeper leader (the
-- pg_try_advisory_xact_lock at the top lets exactly one daemon sweep at a time, with no
-- leader state to lose: whoever gets the lock in this tick sweeps; the others get swept = 0,
-- leader = false). Repeat immediately while `released` = $1 (a backlog).
--   $1 int4  batch size (we use 500)
-- Returns one row: leader (got the lock), due (expired rows locked), released,
--   woken_pools uuid[] (pools where a proxy went from full to not full: NOTIFY them).
-- RUST: also `leases`, a json array describing each released lease (id, pool, consumer,
--   holder, proxy, host, port, scheme, acquired_at / expires_at / released_at as Unix
--   seconds), so the engine can fire release events for them. The proxy row read there is
--   this statement's snapshot (host and port do not change with the counter).
-- Never waits for any lock (both lease and proxy rows are taken with SKIP LOCKED), so it
-- cannot deadlock with Python's cleanup_expired_leases (which locks expired leases with a
-- blocking FOR UPDATE, then the proxies one by one in arbitrary order) nor with releases.
-- A lease whose proxy row is locked right now stays active and is swept next tick. Python's
-- cleanup, waiting on rows we locked, re-checks status after our commit and skips them, so
-- nothing is decremented twice (tests/test_lifecycle.py).
-- name: sweep
WITH leader AS MATERIALIZED (
    SELECT pg_try_advisory_xact_lock(hashtextextended('pharox:sweeper', 0)) AS ok
),
due AS MATERIALIZED (
    SELECT l.id, l.proxy_id FROM lease l
    WHERE (SELECT ok FROM leader)
      AND l.status = 'active' AND l.expires_at <= now()
    ORDER BY l.expires_at
    LIMIT $1::int4
    FOR UPDATE OF l SKIP LOCKED
),
px AS MATERIALIZED (
    SELECT p.id FROM proxy p
    WHERE p.id IN (SELECT proxy_id FROM due)
    ORDER BY p.id
    FOR UPDATE OF p SKIP LOCKED
),
rel AS (
    UPDATE lease l
    SET status = 'released', released_at = now(), release_reason = 'expired'
    FROM due
    WHERE l.id = due.id AND due.proxy_id IN (SELECT id FROM px)
    RETURNING l.id, l.proxy_id, l.pool_name, l.consumer_id, l.holder, l.acquired_at,
              l.expires_at, l.released_at
),
cnt AS (
    SELECT proxy_id, count(*)::int4 AS n FROM rel GROUP BY proxy_id
),
dec AS (
    UPDATE proxy p SET current_leases = greatest(p.current_leases - cnt.n, 0)
    FROM cnt
    WHERE p.id = cnt.proxy_id
    RETURNING p.pool_id,
              (p.max_concurrency IS NOT NULL
               AND p.current_leases < p.max_concurrency
               AND p.current_leases + cnt.n >= p.max_concurrency) AS was_full
)
SELECT (SELECT ok FROM leader) AS leader,
       (SELECT count(*) FROM due) AS due,
       (SELECT count(*) FROM rel) AS released,
       ARRAY(SELECT DISTINCT pool_id FROM dec WHERE was_full) AS woken_pools,
       (SELECT coalesce(json_agg(json_build_object(
                  'id', rel.id, 'pool', rel.pool_name, 'consumer', c.name,
                  'holder', rel.holder, 'proxy', rel.proxy_id, 'host', p.host,
                  'port', p.port, 'scheme', coalesce(p.scheme, p.protocol),
                  'acquired_at', extract(epoch FROM rel.acquired_at)::float8,
                  'expires_at', extract(epoch FROM rel.expires_at)::float8,
                  'released_at', extract(epoch FROM rel.released_at)::float8)), '[]')
        FROM rel
        LEFT JOIN consumer c ON c.id = rel.consumer_id
        LEFT JOIN proxy p ON p.id = rel.proxy_id) AS leases;

-- ===========================================================================================
-- NODE IDENTITY, SWEEPER LEADER, WAKE-UP  (dedicated session: one per daemon, outside the pool)
-- ===========================================================================================
-- The dedicated session holds the node lock, LISTENs for wake-ups and heartbeats. Use a direct
-- connection (session advisory locks and LISTEN do not survive a transaction-pooling
-- PgBouncer). If this session drops, the daemon has lost its node lock: it stops leasing,
-- closes tunnels at their local deadlines, reconnects and runs node_claim again (which fails
-- if another process took the id meanwhile -> exit).

-- node_claim: refuse a duplicate node id. 64-bit key (hashtextextended), so two different
-- node ids collide with probability ~n^2/2^65.
--   $1 text node id.  Returns claimed boolean; false = another live session holds this id:
--   refuse to start ("node id scraper-host-3 is held by backend pid N", see node_holder).
-- name: node_claim
SELECT pg_try_advisory_lock(hashtextextended('pharox:node:' || $1::text, 0)) AS claimed;

-- node_unclaim: give a node id back, on a start that failed after node_claim (the session
-- would release it when it ends, but only once the server notices the closed socket: a
-- restart right away would find the id still held). $1 text node id.
-- name: node_unclaim
SELECT pg_advisory_unlock(hashtextextended('pharox:node:' || $1::text, 0)) AS released;

-- node_holder: who holds a node id (for the error message). $1 text node id.
-- name: node_holder
SELECT l.pid, a.client_addr, a.application_name, a.backend_start
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
  AND l.classid = ((hashtextextended('pharox:node:' || $1::text, 0) >> 32) & 4294967295)::oid
  AND l.objid = (hashtextextended('pharox:node:' || $1::text, 0) & 4294967295)::oid
  AND l.objsubid = 1;

-- RUST: session_pid: this session's backend pid (remembered, see terminate_own_session).
-- name: session_pid
SELECT pg_backend_pid() AS pid;

-- RUST: terminate_own_session: after the dedicated session was lost (a network partition),
-- its old backend may still hold the node lock until the server notices the connection is
-- gone; the daemon ends that backend, and only that one (its remembered pid, and only when
-- node_holder names that pid). $1 int4 pid. Needs the same role (or pg_signal_backend).
-- name: terminate_own_session
SELECT pg_terminate_backend($1::int4) AS terminated;

-- node_register: record the node (informational), after node_claim succeeded, on the
-- dedicated session. $1 text node id, $2 text hostname, $3 text version.
-- name: node_register
INSERT INTO pharox_node (node_id, backend_pid, hostname, version, started_at, heartbeat_at)
VALUES ($1::text, pg_backend_pid(), $2::text, $3::text, now(), now())
ON CONFLICT (node_id) DO UPDATE
SET backend_pid = EXCLUDED.backend_pid, hostname = EXCLUDED.hostname,
    version = EXCLUDED.version, started_at = now(), heartbeat_at = now()
RETURNING node_id, started_at;

-- node_heartbeat: on the dedicated session each tick; an error here = node lock lost.
-- $1 text node id.
-- name: node_heartbeat
UPDATE pharox_node SET heartbeat_at = now() WHERE node_id = $1::text RETURNING heartbeat_at;

-- release_holder_batch: after node_claim, release the leases a previous incarnation of this
-- node left behind (holder = $1). Same non-blocking shape as sweep; loop until remaining = 0
-- (rows momentarily locked by Python's cleanup are picked up by the next call).
--   $1 text node id, $2 int4 batch size (500)
-- Returns: released, remaining (active rows of this holder not released by this call),
-- woken_pools uuid[].
-- name: release_holder_batch
WITH due AS MATERIALIZED (
    SELECT l.id, l.proxy_id FROM lease l
    WHERE l.status = 'active' AND l.holder = $1::text
    LIMIT $2::int4
    FOR UPDATE OF l SKIP LOCKED
),
px AS MATERIALIZED (
    SELECT p.id FROM proxy p
    WHERE p.id IN (SELECT proxy_id FROM due)
    ORDER BY p.id
    FOR UPDATE OF p SKIP LOCKED
),
rel AS (
    UPDATE lease l
    SET status = 'released', released_at = now(), release_reason = 'node_restart'
    FROM due
    WHERE l.id = due.id AND due.proxy_id IN (SELECT id FROM px)
    RETURNING l.proxy_id
),
cnt AS (
    SELECT proxy_id, count(*)::int4 AS n FROM rel GROUP BY proxy_id
),
dec AS (
    UPDATE proxy p SET current_leases = greatest(p.current_leases - cnt.n, 0)
    FROM cnt
    WHERE p.id = cnt.proxy_id
    RETURNING p.pool_id,
              (p.max_concurrency IS NOT NULL
               AND p.current_leases < p.max_concurrency
               AND p.current_leases + cnt.n >= p.max_concurrency) AS was_full
)
SELECT (SELECT count(*) FROM rel) AS released,
       (SELECT count(*) FROM lease WHERE status = 'active' AND holder = $1::text)
         - (SELECT count(*) FROM rel) AS remaining,
       ARRAY(SELECT DISTINCT pool_id FROM dec WHERE was_full) AS woken_pools;

-- sweeper_leader_session (alternative to the xact lock inside `sweep`): a long-lived
-- leadership on the dedicated session. Take it with this statement every few seconds until
-- true; it is released when the session ends (crash = instant failover). Not needed when
-- `sweep` is used as is; kept for a design that wants a stable leader (metrics, logs).
-- name: sweeper_leader_session
SELECT pg_try_advisory_lock(hashtextextended('pharox:sweeper-leader', 0)) AS leader;

-- notify_capacity: wake waiters of a pool on every daemon. Send it AFTER the release/sweep
-- statement committed, as its own autocommit statement (a NOTIFY inside the lease
-- transaction takes the global notify-queue lock at commit and serialises all committing
-- notifiers). Only on was_full / woken_pools / a proxy turning eligible; coalesce to at
-- most one per pool per 10 ms. $1 text payload = pool id (uuid text, 36 bytes).
-- LISTEN side (dedicated session): `LISTEN pharox_capacity` once after connect (and after
-- every reconnect, then wake all local waiters: notifications sent while disconnected are
-- lost). tokio-postgres delivers them as AsyncMessage::Notification from
-- Connection::poll_message; a notification is delivered only after the sender commits, so a
-- woken waiter's next acquire sees the free slot. Never leave the listening session idle in
-- a transaction (it would pin the notification queue). A NOTIFY from our own session is
-- delivered to ourselves too (ignore or use it). Python never notifies: keep polling as the
-- fallback (max_backoff <= 1 s for pools shared with Python).
-- name: notify_capacity
SELECT pg_notify('pharox_capacity', $1::text);

-- name: listen_capacity
LISTEN pharox_capacity;

-- ===========================================================================================
-- CONSUMERS
-- ===========================================================================================
-- consumer_upsert: resolve a consumer name to its id, creating the row if missing. Called
-- once per name per process (cache name -> id; consumers are never deleted by pharox 0.11,
-- and an FK error on acquire invalidates the cache entry). Not folded into acquire because
--   * "create if missing" in the same statement as the lease needs the new id in the same
--     snapshot: a concurrent creator that commits after our snapshot makes ON CONFLICT DO
--     NOTHING return nothing AND hides the row from our SELECT, so the lease insert would
--     fail (NOT NULL) or need DO UPDATE, which writes and row-locks the consumer row on every
--     acquire (serialising all acquires of a consumer);
--   * the cached id costs nothing per acquire.
--   $1 text consumer name (<= 128 chars: consumer.name is VARCHAR(128))
--   $2 uuid id to use if we create it (uuid v5 of the name, see inventory; Python's are v4)
-- Returns 1 row (id), or 0 rows in the rare race above: simply run it again.
-- RUST: ON CONFLICT without a target: two daemons creating the same name at once insert the
-- same v5 id too, and a conflict target of (name) alone left the primary key out of the
-- arbiters, so the second insert failed with a unique violation on consumer_pkey instead of
-- doing nothing (seen under a fleet of daemons and Python workers; tests/pg_backend.rs
-- concurrent_creators_of_one_consumer_and_pool_agree).
-- name: consumer_upsert
WITH ins AS (
    INSERT INTO consumer (id, name) VALUES ($2::uuid, $1::text)
    ON CONFLICT DO NOTHING
    RETURNING id
)
SELECT id FROM ins
UNION ALL
SELECT id FROM consumer WHERE name = $1::text
LIMIT 1;

-- ===========================================================================================
-- STATS AND LISTS
-- ===========================================================================================
-- pool_stats: SPEC §2 pool stats from the database, one row per pool.
--   $1 text pool name, NULL = all pools
--   $2 boolean lease_slow override (NULL = the pool's setting), as in acquire
-- total: proxies not removed; active: leasable status (active, or slow when lease_slow);
-- available: eligible now (active status, below cap, not resting, not removed); leased:
-- proxies with current_leases > 0 (removed ones included); total_leases: sum of
-- current_leases; resting: active-status proxies in a passive-health rest; db_now.
-- (Python's get_pool_stats counts status='active' only and ignores rests/removal; for a pool
-- with no slow/rest/removed proxy both agree.)
-- RUST: `active` leaves out resting proxies (the in-memory storage reports a resting proxy
-- as inactive, and so does get_proxy here); description and lease_slow are returned for
-- list_pools.
-- name: pool_stats
SELECT pool.id AS pool_id, pool.name AS pool_name, pool.description,
       coalesce(pool.lease_slow, false) AS lease_slow,
       count(p.id) FILTER (WHERE p.removed_at IS NULL) AS total,
       count(p.id) FILTER (WHERE p.removed_at IS NULL AND (p.status = 'active'
              OR (p.status = 'slow' AND coalesce($2::boolean, pool.lease_slow, false)))
              AND (p.rest_until IS NULL OR p.rest_until <= now())) AS active,
       count(p.id) FILTER (WHERE p.removed_at IS NULL
              AND (p.status = 'active'
                   OR (p.status = 'slow' AND coalesce($2::boolean, pool.lease_slow, false)))
              AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
              AND (p.rest_until IS NULL OR p.rest_until <= now())) AS available,
       count(p.id) FILTER (WHERE p.current_leases > 0) AS leased,
       coalesce(sum(p.current_leases), 0)::int8 AS total_leases,
       count(p.id) FILTER (WHERE p.removed_at IS NULL AND p.rest_until > now()) AS resting,
       now() AS db_now
FROM proxy_pool pool
LEFT JOIN proxy p ON p.pool_id = pool.id
WHERE $1::text IS NULL OR pool.name = $1::text
GROUP BY pool.id, pool.name
ORDER BY pool.name;

-- list_leases: live leases of the fleet (admin GET /api/v1/leases), with their holder
-- (NULL = Python / API). $1 text pool name or NULL, $2 text holder or NULL, $3 int8 limit.
-- RUST: returns the whole proxy row (a Lease carries its proxy), like acquire.
-- name: list_leases
SELECT l.id AS lease_id, l.pool_name, c.name AS consumer_name,
       l.holder, l.acquired_at, l.expires_at, now() AS db_now,
       p.id AS proxy_id, p.pool_id, p.host, p.port, p.protocol,
       coalesce(p.scheme, p.protocol) AS scheme, p.credentials, p.status, p.max_concurrency,
       p.current_leases, p.source, p.country, p.city, p.isp, p.asn, p.latitude, p.longitude,
       p.latency_us, p.checked_at
FROM lease l
JOIN consumer c ON c.id = l.consumer_id
JOIN proxy p ON p.id = l.proxy_id
WHERE l.status = 'active'
  AND ($1::text IS NULL OR l.pool_name = $1::text)
  AND ($2::text IS NULL OR l.holder = $2::text)
ORDER BY l.acquired_at, l.id
LIMIT $3::int8;

-- get_lease: one lease by id (any status). $1 uuid.
-- RUST: returns the whole proxy row too.
-- name: get_lease
SELECT l.id AS lease_id, l.pool_name, c.name AS consumer_name,
       l.status, l.holder, l.acquired_at, l.expires_at, l.released_at, l.release_reason,
       now() AS db_now,
       p.id AS proxy_id, p.pool_id, p.host, p.port, p.protocol,
       coalesce(p.scheme, p.protocol) AS scheme, p.credentials, p.status, p.max_concurrency,
       p.current_leases, p.source, p.country, p.city, p.isp, p.asn, p.latitude, p.longitude,
       p.latency_us, p.checked_at
FROM lease l JOIN consumer c ON c.id = l.consumer_id
JOIN proxy p ON p.id = l.proxy_id
WHERE l.id = $1::uuid;

-- list_proxies: a pool's proxies with live figures (admin GET /api/v1/pools/{name}, and the
-- daemon's periodic inventory refresh for DB-only proxies). Credentials are returned (the
-- daemon needs them to connect); the admin API masks them. $1 text pool name.
-- RUST: also returns the pool's name (the Rust Proxy names its pool).
-- name: list_proxies
SELECT pool.name AS pool_name, p.id AS proxy_id, p.pool_id, p.host, p.port, p.protocol,
       coalesce(p.scheme, p.protocol) AS scheme, p.credentials, p.status, p.max_concurrency,
       p.current_leases, p.source, p.country, p.city, p.isp, p.asn, p.latitude, p.longitude,
       p.latency_us, p.rest_until, p.owner, p.removed_at, p.checked_at, p.created_at,
       now() AS db_now
FROM proxy p JOIN proxy_pool pool ON pool.id = p.pool_id
WHERE pool.name = $1::text
ORDER BY p.created_at, p.id;

-- RUST: get_proxy: one proxy by id, same columns as list_proxies. $1 uuid.
-- name: get_proxy
SELECT pool.name AS pool_name, p.id AS proxy_id, p.pool_id, p.host, p.port, p.protocol,
       coalesce(p.scheme, p.protocol) AS scheme, p.credentials, p.status, p.max_concurrency,
       p.current_leases, p.source, p.country, p.city, p.isp, p.asn, p.latitude, p.longitude,
       p.latency_us, p.rest_until, p.owner, p.removed_at, p.checked_at, p.created_at,
       now() AS db_now
FROM proxy p JOIN proxy_pool pool ON pool.id = p.pool_id
WHERE p.id = $1::uuid;

-- RUST: pool_lookup: a pool's id and settings by name (0 rows: unknown). $1 text.
-- name: pool_lookup
SELECT id, name, description, coalesce(lease_slow, false) AS lease_slow
FROM proxy_pool WHERE name = $1::text;

-- RUST: pool_name_of: a pool's name by id (mapping a NOTIFY payload). $1 uuid.
-- name: pool_name_of
SELECT name FROM proxy_pool WHERE id = $1::uuid;

-- audit_counters: proxies whose counter disagrees with their live lease rows, or exceeds
-- the cap (must return no row; tests run it after every stress run). $1 text pool or NULL.
-- name: audit_counters
SELECT p.id AS proxy_id, p.current_leases, p.max_concurrency, coalesce(a.n, 0) AS active_rows
FROM proxy p
JOIN proxy_pool pool ON pool.id = p.pool_id
LEFT JOIN (SELECT proxy_id, count(*) AS n FROM lease WHERE status = 'active' GROUP BY proxy_id) a
       ON a.proxy_id = p.id
WHERE ($1::text IS NULL OR pool.name = $1::text)
  AND (p.current_leases <> coalesce(a.n, 0)
       OR (p.max_concurrency IS NOT NULL AND p.current_leases > p.max_concurrency));

-- ===========================================================================================
-- INVENTORY (config upsert at start and on reload) — never touches current_leases
-- ===========================================================================================
-- Stable ids, UUIDv5 (RFC 4122 §4.3, SHA-1), computed by the daemon (uuid crate new_v5):
--   PHAROX_NS   = uuid5(NAMESPACE_URL, 'urn:pharox') = 4724b937-d9a2-5c0b-87db-695177fb7bbf
--   pool id     = uuid5(PHAROX_NS, 'pool:'     || pool name)
--   proxy id    = uuid5(PHAROX_NS, 'proxy:'    || the daemon's ProxyId string)
--   consumer id = uuid5(PHAROX_NS, 'consumer:' || consumer name)
-- (test vectors in REPORT.md, checked against uuid-ossp's uuid_generate_v5 by
-- tests/test_lifecycle.py inventory_ids_and_pool_adoption). A pool is identified by its
-- NAME: if Python already created the
-- pool (random uuid4), pool_upsert returns that id and the daemon uses it.

-- pool_upsert: $1 uuid v5 id (used only when creating), $2 text name, $3 text description,
-- $4 boolean lease_slow. Returns id (the existing one when the name exists); 0 rows only in
-- a creation race: run again. No write when nothing changed.
-- RUST: insert-or-nothing, then an update, rather than ON CONFLICT (name) DO UPDATE: DO
-- UPDATE needs a conflict target, and with (name) as the only arbiter two daemons creating
-- the pool at once (same name, same v5 id) made the second fail on the primary key. A row
-- a concurrent creator committed after this statement's snapshot is invisible to both `upd`
-- and the final SELECT: 0 rows, run again (the next run sees it and updates it).
-- name: pool_upsert
WITH ins AS (
    INSERT INTO proxy_pool (id, name, description, lease_slow)
    VALUES ($1::uuid, $2::text, $3::text, $4::boolean)
    ON CONFLICT DO NOTHING
    RETURNING id
),
upd AS (
    UPDATE proxy_pool pp SET description = $3::text, lease_slow = $4::boolean
    WHERE pp.name = $2::text AND NOT EXISTS (SELECT 1 FROM ins)
      AND (pp.description, pp.lease_slow) IS DISTINCT FROM ($3::text, $4::boolean)
    RETURNING id
)
SELECT id FROM ins
UNION ALL
SELECT id FROM upd
UNION ALL
SELECT id FROM proxy_pool WHERE name = $2::text
LIMIT 1;

-- proxy_upsert_batch: upsert the config proxies of ONE pool in one statement (arrays of
-- equal length, one element per proxy, in config order).
--   $1  uuid      pool id (from pool_upsert)
--   $2  text      owner = node id
--   $3  uuid[]    ids (v5)            $4  text[]   hosts (<= 255 chars)
--   $5  int4[]    ports (1..65535)    $6  text[]   protocol as Python knows it: http |
--                 https | socks5 (socks5h -> 'socks5'); never socks5h/direct (see REPORT)
--   $7  text[]    scheme: NULL, or 'socks5h' when the daemon's scheme differs from protocol
--   $8  json[]    credentials: NULL or {"user": U, "password": P}, both non-blank (Python
--                 rejects blank ones); a user without password cannot be shared with Python
--   $9  text[]    status on INSERT (normally 'active'); an existing row keeps its status
--                 (health/ban state survives a reload) unless it was removed (re-added)
--   $10 text[] source  $11 text[] country (upper-cased, <= 8)  $12 text[] city (<= 128)
--   $13 float8[] latitude  $14 float8[] longitude  $15 text[] isp  $16 int4[] asn
--   $17 int4[] max_concurrency (NULL = unlimited; > 0)
--   $18 timestamptz[] checked_at on INSERT, $19 int8[] latency_us on INSERT (NULL = unmeasured)
-- RUST: $18/$19 added: a new proxy starts with the check time and latency its record carries
-- (selector tie-breaks then agree with the in-memory storage); an existing row keeps its
-- own (they are live health state, written by proxy_health only).
-- created_at = now() + ordinal µs on INSERT, so first_available follows config order even
-- though all rows are inserted by one statement; an existing row keeps its created_at (its
-- place in inventory order). current_leases, checked_at, latency_us, rest_until are never
-- written here. Rows are rewritten only when a config field changed.
-- Returns one row per inserted or changed proxy: proxy_id, inserted (xmax = 0).
-- name: proxy_upsert_batch
INSERT INTO proxy AS p (id, pool_id, host, port, protocol, scheme, credentials, status,
                        source, country, city, latitude, longitude, isp, asn,
                        max_concurrency, owner, created_at, checked_at, latency_us)
SELECT u.id, $1::uuid, u.host, u.port, u.protocol, u.scheme, u.credentials, u.status,
       u.source, u.country, u.city, u.latitude, u.longitude, u.isp, u.asn,
       u.max_concurrency, $2::text, now() + u.ord * interval '1 microsecond',
       coalesce(u.checked_at, now()), u.latency_us
FROM unnest($3::uuid[], $4::text[], $5::int4[], $6::text[], $7::text[], $8::json[],
            $9::text[], $10::text[], $11::text[], $12::text[], $13::float8[],
            $14::float8[], $15::text[], $16::int4[], $17::int4[], $18::timestamptz[],
            $19::int8[])
     WITH ORDINALITY AS u(id, host, port, protocol, scheme, credentials, status, source,
                          country, city, latitude, longitude, isp, asn, max_concurrency,
                          checked_at, latency_us, ord)
ON CONFLICT (id) DO UPDATE
SET pool_id = EXCLUDED.pool_id, host = EXCLUDED.host, port = EXCLUDED.port,
    protocol = EXCLUDED.protocol, scheme = EXCLUDED.scheme,
    credentials = EXCLUDED.credentials,
    status = CASE WHEN p.removed_at IS NOT NULL THEN EXCLUDED.status ELSE p.status END,
    source = EXCLUDED.source, country = EXCLUDED.country, city = EXCLUDED.city,
    latitude = EXCLUDED.latitude, longitude = EXCLUDED.longitude, isp = EXCLUDED.isp,
    asn = EXCLUDED.asn, max_concurrency = EXCLUDED.max_concurrency,
    owner = coalesce(p.owner, EXCLUDED.owner), removed_at = NULL
WHERE p.removed_at IS NOT NULL
   OR (p.pool_id, p.host, p.port, p.protocol, p.scheme, p.credentials::text, p.source,
       p.country, p.city, p.latitude, p.longitude, p.isp, p.asn, p.max_concurrency)
      IS DISTINCT FROM
      (EXCLUDED.pool_id, EXCLUDED.host, EXCLUDED.port, EXCLUDED.protocol, EXCLUDED.scheme,
       EXCLUDED.credentials::text, EXCLUDED.source, EXCLUDED.country, EXCLUDED.city,
       EXCLUDED.latitude, EXCLUDED.longitude, EXCLUDED.isp, EXCLUDED.asn,
       EXCLUDED.max_concurrency)
RETURNING p.id AS proxy_id, (p.xmax = 0) AS inserted;

-- proxy_remove: the daemon dropped proxies from its config. Only rows it owns are touched:
-- they stop being leased by daemons (removed_at) and by Python (status 'inactive'); live
-- leases finish normally. Rows are never deleted (lease history references them).
--   $1 uuid[] proxy ids, $2 text owner (node id). Returns proxy_id, pool_id, current_leases.
-- name: proxy_remove
UPDATE proxy
SET removed_at = now(), status = 'inactive'
WHERE id = ANY ($1::uuid[]) AND owner = $2::text AND removed_at IS NULL
RETURNING id AS proxy_id, pool_id, current_leases;

-- inventory_duplicates: the same endpoint stored twice in a pool (e.g. added by Python with
-- a uuid4 and by a daemon with its v5 id): the cap is NOT shared between the two rows, so
-- the real upstream can be over-used. `pharox check --connect` should warn. $1 text pool/NULL.
-- name: inventory_duplicates
SELECT pool.name AS pool_name, p.host, p.port, array_agg(p.id ORDER BY p.created_at) AS ids
FROM proxy p JOIN proxy_pool pool ON pool.id = p.pool_id
WHERE p.removed_at IS NULL AND ($1::text IS NULL OR pool.name = $1::text)
GROUP BY pool.name, p.host, p.port
HAVING count(*) > 1;

-- ===========================================================================================
-- HEALTH (shared with the fleet and with Python)
-- ===========================================================================================
-- proxy_health: apply an active-check result or an operator status change, and append a
-- proxy_health_record (the format Python writes and reads).
--   $1 uuid proxy id
--   $2 text new status (active | inactive | slow | banned)
--   $3 timestamptz checked_at (NULL = keep: an operator ban is not a check)
--   $4 int8 latency_us to store (the EWMA; NULL = keep)
--   $5 int4 this sample's latency in ms for the record (NULL for an operator change)
--   $6 boolean reachable (for the record)
--   $7 text error (NULL if none)
--   $8 boolean clear_rest: true ends a passive rest now (a successful probe)
-- The record's protocol is the proxy's stored protocol (Python parses it with its enum, so
-- never 'socks5h'); checked_at of the record = $3 or now().
-- Returns: proxy_id, pool_id, status_before, status_after, became_eligible (status turned
-- leasable from not leasable, or a rest was cleared: NOTIFY the pool), db_now.
-- Daemon sessions run with pharox.node set, so the latency trigger does not overwrite $4.
-- name: proxy_health
WITH old AS MATERIALIZED (
    SELECT id, status, rest_until FROM proxy WHERE id = $1::uuid FOR NO KEY UPDATE
),
upd AS (
    UPDATE proxy p
    SET status = $2::text,
        checked_at = coalesce($3::timestamptz, p.checked_at),
        latency_us = coalesce($4::int8, p.latency_us),
        rest_until = CASE WHEN $8::boolean THEN NULL ELSE p.rest_until END
    FROM old
    WHERE p.id = old.id
    RETURNING p.id, p.pool_id, p.protocol, p.status, old.status AS status_before,
              (old.rest_until > now() AND p.rest_until IS NULL) AS rest_cleared
),
rec AS (
    INSERT INTO proxy_health_record (id, proxy_id, checked_at, reachable, latency_ms,
                                     protocol, status_before, status_after, error)
    SELECT gen_random_uuid(), upd.id, coalesce($3::timestamptz, now()), $6::boolean,
           $5::int4, upd.protocol, upd.status_before, upd.status, $7::text
    FROM upd
)
SELECT upd.id AS proxy_id, upd.pool_id, upd.status_before, upd.status AS status_after,
       ((upd.status IN ('active', 'slow') AND upd.status_before NOT IN ('active', 'slow'))
        OR upd.rest_cleared) AS became_eligible,
       now() AS db_now
FROM upd;

-- proxy_rest: passive health — N consecutive connect failures put the proxy out of rotation
-- for the whole fleet until now() + $2 seconds (the deadline is stored; nobody has to end the
-- rest: acquire compares rest_until with now()). Python 0.11 ignores rest_until.
-- An existing longer rest is kept (greatest). Appends a health record (reachable = false,
-- status unchanged).
--   $1 uuid proxy id, $2 float8 rest seconds, $3 text reason (e.g. '3 consecutive connect
--   failures'). Returns proxy_id, pool_id, rest_until, db_now.
-- RUST: only an active or slow proxy rests (0 rows otherwise), as in the in-memory storage.
-- name: proxy_rest
WITH upd AS (
    UPDATE proxy p
    SET rest_until = greatest(coalesce(p.rest_until, now()), now() + make_interval(secs => $2::float8))
    WHERE p.id = $1::uuid AND p.status IN ('active', 'slow')
    RETURNING p.id, p.pool_id, p.protocol, p.status, p.rest_until
),
rec AS (
    INSERT INTO proxy_health_record (id, proxy_id, checked_at, reachable, latency_ms,
                                     protocol, status_before, status_after, error)
    SELECT gen_random_uuid(), upd.id, now(), false, NULL, upd.protocol, upd.status,
           upd.status, 'rest: ' || $3::text
    FROM upd
)
SELECT upd.id AS proxy_id, upd.pool_id, upd.rest_until, now() AS db_now FROM upd;

-- RUST: rest_end: end the passive rests that are due (rest_until <= now()), so that the
-- proxies' pools can be woken (acquire already ignores a past rest_until; this only clears it
-- and reports the pools). Run by whoever wins the sweeper's advisory lock in this tick, right
-- after `sweep`. Skips locked rows (next tick). $1 int4 batch size.
-- Returns one row: leader, ended, woken_pools uuid[].
-- name: rest_end
WITH leader AS MATERIALIZED (
    SELECT pg_try_advisory_xact_lock(hashtextextended('pharox:sweeper', 0)) AS ok
),
due AS MATERIALIZED (
    SELECT p.id FROM proxy p
    WHERE (SELECT ok FROM leader) AND p.rest_until IS NOT NULL AND p.rest_until <= now()
    LIMIT $1::int4
    FOR NO KEY UPDATE OF p SKIP LOCKED
),
upd AS (
    UPDATE proxy p SET rest_until = NULL FROM due WHERE p.id = due.id
    RETURNING p.pool_id, (p.removed_at IS NULL AND p.status IN ('active', 'slow')) AS eligible
)
SELECT (SELECT ok FROM leader) AS leader,
       (SELECT count(*) FROM upd) AS ended,
       ARRAY(SELECT DISTINCT pool_id FROM upd WHERE eligible) AS woken_pools;

-- RUST: pool_withdraw: the daemon dropped a whole pool from its config: proxy_remove for every
-- proxy of that pool this node owns. The pool row stays (other daemons and Python may use it).
--   $1 text pool name, $2 text owner (node id). Returns proxy_id, current_leases.
-- name: pool_withdraw
UPDATE proxy p
SET removed_at = now(), status = 'inactive'
FROM proxy_pool pool
WHERE pool.id = p.pool_id AND pool.name = $1::text AND p.owner = $2::text
  AND p.removed_at IS NULL
RETURNING p.id AS proxy_id, p.current_leases;

-- RUST: schema_missing: which of the (table, column) pairs the backend needs are missing in
-- the schema the session sees (search_path). $1 text[] tables, $2 text[] columns (same length).
-- Returns one row per missing pair: tab, col, table_missing.
-- name: schema_missing
SELECT r.tab, r.col, to_regclass(quote_ident(r.tab)) IS NULL AS table_missing
FROM unnest($1::text[], $2::text[]) AS r(tab, col)
WHERE NOT EXISTS (
    SELECT 1 FROM pg_attribute a
    WHERE a.attrelid = to_regclass(quote_ident(r.tab)) AND a.attname = r.col
      AND NOT a.attisdropped);

-- RUST: server_info: the server's version and whether this session is encrypted.
-- name: server_info
SELECT current_setting('server_version') AS version,
       coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false) AS ssl;

-- RUST: migrations_table: is pharox_schema_migrations there? (no argument)
-- name: migrations_table
SELECT to_regclass('pharox_schema_migrations') IS NOT NULL AS present;

-- RUST: migration_version: the highest applied migration (only when migrations_table).
-- name: migration_version
SELECT max(version) AS version FROM pharox_schema_migrations;

-- ===========================================================================================
-- MAINTENANCE
-- ===========================================================================================
-- prune_released: delete released lease history older than $1 seconds, $2 rows at a time
-- (pharox 0.11 never deletes lease rows; its FKs then block delete_proxy forever).
-- RUST: run with every sweep, by the sweeper leader only (the same transaction-scoped
-- advisory lock as `sweep`; deleted = 0 elsewhere), repeated while deleted = $2;
-- retention `[storage] keep_released_hours` (default 24; 0 keeps the history for good).
-- name: prune_released
WITH leader AS MATERIALIZED (
    SELECT pg_try_advisory_xact_lock(hashtextextended('pharox:sweeper', 0)) AS ok
),
old AS (
    SELECT id FROM lease
    WHERE (SELECT ok FROM leader)
      AND status = 'released' AND released_at < now() - make_interval(secs => $1::float8)
    ORDER BY released_at
    LIMIT $2::int4
    FOR UPDATE SKIP LOCKED
),
del AS (
    DELETE FROM lease l USING old WHERE l.id = old.id RETURNING 1
)
SELECT count(*) AS deleted FROM del;

-- session_setup: run once per pooled connection (deadpool post_create), or pass as startup
-- options: options='-c pharox.node=ID -c statement_timeout=2000 -c lock_timeout=500
-- -c idle_in_transaction_session_timeout=5000' and application_name='pharox/ID'.
-- lock_timeout bounds the blocking waits that remain (round-robin cursor, release, renew).
-- $1 text node id, $2 text statement_timeout ('2000'), $3 text lock_timeout ('500').
-- name: session_setup
SELECT set_config('pharox.node', $1::text, false),
       set_config('application_name', 'pharox/' || $1::text, false),
       set_config('statement_timeout', $2::text, false),
       set_config('lock_timeout', $3::text, false),
       set_config('idle_in_transaction_session_timeout', '5000', false);
