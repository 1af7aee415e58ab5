-- migrate.sql: pharox fleet-mode migration (version 1). ADDITIVE and IDEMPOTENT.
--
-- * Creates the pharox 0.11 tables if they are missing, with exactly the DDL that pharox 0.11's
--   metadata.create_all() emits (schema.sql), so a daemon can start on an empty database and
--   Python's create_all() later finds its tables and does nothing.
-- * Adds only nullable columns without defaults (a metadata-only change: no table rewrite), a
--   few partial/ordinary indexes, two small tables of our own (pharox_node,
--   pharox_schema_migrations), one trigger function + trigger on proxy_health_record, and
--   storage parameters (fillfactor, autovacuum). Nothing is dropped, renamed, retyped or made
--   NOT NULL; Python pharox 0.11 keeps working (proved by tests/test_python_on_migrated.py).
-- * Safe to run any number of times and from several daemons at once: everything runs in one
--   transaction serialised by pg_advisory_xact_lock, and every DDL statement is guarded by a
--   catalog check, so a second run takes no table lock at all (ALTER TABLE ... IF NOT EXISTS
--   would still take an ACCESS EXCLUSIVE lock before noticing the column exists).
-- * lock_timeout bounds how long we queue behind a long Python transaction: ACCESS EXCLUSIVE
--   waiters block every later reader of the table, so we give up after 5 s (the daemon retries
--   with back-off) instead of stalling the fleet.
-- * Objects are created unqualified, i.e. in the first schema of search_path (tests use one
--   schema per test). Run it with: psql -v ON_ERROR_STOP=1 -X -q -f migrate.sql "$URL"
--   (or send the whole text as one simple-query string from Rust: batch_execute).
--
-- Big existing lease tables: CREATE INDEX inside this transaction blocks writes to lease while
-- it builds. On a database with millions of lease rows, create the lease indexes beforehand
-- with CREATE INDEX CONCURRENTLY and the same names/definitions; this file then skips them.

BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended('pharox:migrate', 0));
SET LOCAL lock_timeout = '5s';
SET LOCAL statement_timeout = '120s';

-- ---------------------------------------------------------------------------------------
-- 1. pharox 0.11 base tables (verbatim from create_all; no-op when they exist).
-- ---------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS consumer (
	id UUID NOT NULL,
	name VARCHAR(128) NOT NULL,
	created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (name)
);
CREATE TABLE IF NOT EXISTS proxy_pool (
	id UUID NOT NULL,
	name VARCHAR(128) NOT NULL,
	description TEXT,
	created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (name)
);
CREATE TABLE IF NOT EXISTS pool_selector_state (
	pool_id UUID NOT NULL,
	strategy VARCHAR(32) NOT NULL,
	last_proxy_id UUID,
	created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	CONSTRAINT pk_pool_selector_state PRIMARY KEY (pool_id, strategy),
	FOREIGN KEY(pool_id) REFERENCES proxy_pool (id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS proxy (
	id UUID NOT NULL,
	pool_id UUID NOT NULL,
	host VARCHAR(255) NOT NULL,
	port INTEGER NOT NULL,
	protocol VARCHAR(6) NOT NULL,
	status VARCHAR(8) DEFAULT 'inactive' NOT NULL,
	credentials JSON,
	source VARCHAR(255),
	country VARCHAR(8),
	city VARCHAR(128),
	latitude FLOAT,
	longitude FLOAT,
	isp VARCHAR(255),
	asn INTEGER,
	max_concurrency INTEGER,
	current_leases INTEGER DEFAULT 0 NOT NULL,
	checked_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	PRIMARY KEY (id),
	FOREIGN KEY(pool_id) REFERENCES proxy_pool (id)
);
CREATE TABLE IF NOT EXISTS lease (
	id UUID NOT NULL,
	proxy_id UUID NOT NULL,
	pool_id UUID NOT NULL,
	consumer_id UUID NOT NULL,
	pool_name VARCHAR(128) NOT NULL,
	status VARCHAR(8) DEFAULT 'active' NOT NULL,
	acquired_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	expires_at TIMESTAMP WITH TIME ZONE NOT NULL,
	released_at TIMESTAMP WITH TIME ZONE,
	PRIMARY KEY (id),
	FOREIGN KEY(proxy_id) REFERENCES proxy (id),
	FOREIGN KEY(pool_id) REFERENCES proxy_pool (id),
	FOREIGN KEY(consumer_id) REFERENCES consumer (id)
);
CREATE TABLE IF NOT EXISTS proxy_health_record (
	id UUID NOT NULL,
	proxy_id UUID NOT NULL,
	checked_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	reachable BOOLEAN NOT NULL,
	latency_ms INTEGER,
	protocol VARCHAR(16) NOT NULL,
	status_before VARCHAR(32),
	status_after VARCHAR(32) NOT NULL,
	error TEXT,
	PRIMARY KEY (id),
	FOREIGN KEY(proxy_id) REFERENCES proxy (id) ON DELETE CASCADE
);

-- ---------------------------------------------------------------------------------------
-- 2. Our own tables.
-- ---------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS pharox_schema_migrations (
	version     integer PRIMARY KEY,
	applied_at  timestamptz NOT NULL DEFAULT now(),
	description text
);
-- One row per daemon node id ever seen. Informational (admin API, ops): the exclusion of a
-- duplicate node id is the session advisory lock of statements.sql "node_claim", not this row.
CREATE TABLE IF NOT EXISTS pharox_node (
	node_id      text PRIMARY KEY,
	backend_pid  integer,           -- pg_backend_pid() of the session holding the node lock
	hostname     text,
	version      text,
	started_at   timestamptz NOT NULL DEFAULT now(),
	heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------------------------------
-- 3. Additive nullable columns (catalog-guarded: no lock when present).
-- ---------------------------------------------------------------------------------------
DO $mig$
DECLARE
	c record;
BEGIN
	FOR c IN
		SELECT * FROM (VALUES
			-- proxy: measured latency in microseconds (NULL = unmeasured, sorts last in
			-- lowest_latency). Written by daemons; filled from Python health records by
			-- the trigger below.
			('proxy',      'latency_us',     'bigint'),
			-- proxy: passive-health rest deadline (DB clock). NULL or past = not resting.
			('proxy',      'rest_until',     'timestamptz'),
			-- proxy: node id / config owner that upserts this row (NULL = Python/admin).
			('proxy',      'owner',          'text'),
			-- proxy: the daemon's exact scheme when it is not one Python knows (e.g.
			-- 'socks5h' stored with protocol='socks5'). NULL = same as protocol.
			('proxy',      'scheme',         'varchar(16)'),
			-- proxy: removed from its owner's inventory; daemons no longer lease it
			-- (draining). The owner also sets status='inactive' so Python stops too.
			('proxy',      'removed_at',     'timestamptz'),
			-- proxy_pool: lease 'slow' proxies too (NULL = false).
			('proxy_pool', 'lease_slow',     'boolean'),
			-- lease: node id of the daemon holding it (NULL = Python / API).
			('lease',      'holder',         'text'),
			-- lease: why it ended: released | expired | node_restart | admin | lost (NULL for
			-- Python's releases and cleanups). status stays 'active'/'released' for Python.
			('lease',      'release_reason', 'varchar(16)')
		) AS t(tab, col, typ)
	LOOP
		IF NOT EXISTS (
			SELECT 1 FROM pg_attribute
			WHERE attrelid = to_regclass(quote_ident(c.tab)) AND attname = c.col AND NOT attisdropped
		) THEN
			EXECUTE format('ALTER TABLE %I ADD COLUMN %I %s', c.tab, c.col, c.typ);
		END IF;
	END LOOP;
END
$mig$;

-- ---------------------------------------------------------------------------------------
-- 4. Indexes. None contains proxy.current_leases (or rest_until, latency bookkeeping aside):
--    the counter is updated by every acquire and release, and any index on it turns those HOT
--    updates into updates that insert into every index of the table (measured in REPORT.md:
--    HOT 99.9% -> 0%, +40% server CPU per acquire+release pair). checked_at is indexed (for
--    least_used); it changes only on health checks.
-- ---------------------------------------------------------------------------------------
DO $mig$
DECLARE
	i record;
BEGIN
	FOR i IN
		SELECT * FROM (VALUES
			-- sweep + Python's cleanup_expired_leases (status='active' AND expires_at <= t)
			('lease_active_expires_idx',
			 'CREATE INDEX lease_active_expires_idx ON lease (expires_at) WHERE status = ''active'''),
			-- node claim (release own stale leases), admin list by node
			('lease_active_holder_idx',
			 'CREATE INDEX lease_active_holder_idx ON lease (holder) WHERE status = ''active'' AND holder IS NOT NULL'),
			-- audits and per-proxy lease lists; also FK checks on proxy delete for live leases
			('lease_active_proxy_idx',
			 'CREATE INDEX lease_active_proxy_idx ON lease (proxy_id) WHERE status = ''active'''),
			-- released-history pruning (statements.sql prune_released)
			('lease_released_at_idx',
			 'CREATE INDEX lease_released_at_idx ON lease (released_at) WHERE status = ''released'''),
			-- first_available: inventory order
			('proxy_pool_created_idx',
			 'CREATE INDEX proxy_pool_created_idx ON proxy (pool_id, created_at, id)'),
			-- least_used fast path: idle proxies in (checked_at, id) order. checked_at changes
			-- only on health checks, so leasing stays HOT
			('proxy_pool_checked_idx',
			 'CREATE INDEX proxy_pool_checked_idx ON proxy (pool_id, checked_at, id)'),
			-- round_robin (id order after the cursor), pool scans, FK proxy.pool_id
			('proxy_pool_id_idx',
			 'CREATE INDEX proxy_pool_id_idx ON proxy (pool_id, id)'),
			-- lowest_latency: the latency bucket, exactly the ORDER BY expression of
			-- acquire_lowest_latency (incremental sort then orders each bucket by
			-- current_leases, id). NULL latency -> NULL bucket, last in ASC order.
			('proxy_pool_latency_bucket_idx',
			 'CREATE INDEX proxy_pool_latency_bucket_idx ON proxy (pool_id, (CASE WHEN latency_us IS NOT NULL THEN floor(ln(greatest(latency_us, 1)::float8) / ln(1.25::float8)) END))'),
			-- Python's get_last_health_result / list_health_records, and FK cascades
			('proxy_health_record_proxy_idx',
			 'CREATE INDEX proxy_health_record_proxy_idx ON proxy_health_record (proxy_id, checked_at DESC)')
		) AS t(name, ddl)
	LOOP
		IF to_regclass(quote_ident(i.name)) IS NULL THEN
			EXECUTE i.ddl;
		END IF;
	END LOOP;
END
$mig$;

-- ---------------------------------------------------------------------------------------
-- 5. Storage parameters: room on each page for HOT versions of the hot rows (proxy counter,
--    round-robin cursor). Only pages written from now on honour a new fillfactor; to repack
--    existing rows run VACUUM FULL proxy in a maintenance window (not done here: it takes an
--    ACCESS EXCLUSIVE lock). Guarded so a re-run takes no lock.
-- ---------------------------------------------------------------------------------------
DO $mig$
DECLARE
	s record;
BEGIN
	FOR s IN
		SELECT * FROM (VALUES
			('proxy', 'fillfactor=70'),
			('proxy', 'autovacuum_vacuum_scale_factor=0.05'),
			('pool_selector_state', 'fillfactor=50'),
			('lease', 'autovacuum_vacuum_scale_factor=0.05'),
			('lease', 'autovacuum_analyze_scale_factor=0.05')
		) AS t(tab, opt)
	LOOP
		IF NOT EXISTS (
			SELECT 1 FROM pg_class
			WHERE oid = to_regclass(quote_ident(s.tab)) AND s.opt = ANY (coalesce(reloptions, '{}'))
		) THEN
			EXECUTE format('ALTER TABLE %I SET (%s)', s.tab, s.opt);
		END IF;
	END LOOP;
END
$mig$;

-- ---------------------------------------------------------------------------------------
-- 6. Latency from Python's health records. Python's HealthCheckOrchestrator writes
--    proxy_health_record(reachable, latency_ms) but never a latency on proxy; this trigger
--    copies a reachable sample into proxy.latency_us so the daemons' lowest_latency sees it.
--    Daemon sessions set the custom GUC pharox.node (connection option -c pharox.node=ID)
--    and write latency_us themselves (an EWMA, in µs), so the trigger skips them.
-- ---------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pharox_health_latency() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
BEGIN
	IF coalesce(current_setting('pharox.node', true), '') = '' THEN
		UPDATE proxy SET latency_us = NEW.latency_ms::bigint * 1000
		WHERE id = NEW.proxy_id AND latency_us IS DISTINCT FROM NEW.latency_ms::bigint * 1000;
	END IF;
	RETURN NULL;
END
$fn$;

DO $mig$
BEGIN
	IF NOT EXISTS (
		SELECT 1 FROM pg_trigger
		WHERE tgrelid = to_regclass('proxy_health_record') AND tgname = 'pharox_health_latency'
	) THEN
		CREATE TRIGGER pharox_health_latency
			AFTER INSERT ON proxy_health_record
			FOR EACH ROW
			WHEN (NEW.reachable AND NEW.latency_ms IS NOT NULL)
			EXECUTE FUNCTION pharox_health_latency();
	END IF;
END
$mig$;

INSERT INTO pharox_schema_migrations (version, description)
VALUES (1, 'fleet mode: latency_us, rest_until, owner, scheme, removed_at, lease_slow, holder, release_reason, indexes, pharox_node')
ON CONFLICT (version) DO NOTHING;

COMMIT;
